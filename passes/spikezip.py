"""SpikeZIP-TF (seed 004) as graph rewrites: a quantized ANN becomes an equivalent SNN.

* Every activation quantizer (a QDQ pair, or passes/quantize.py's own) becomes an ST-BIF+ neuron
  (Eq. 1) with threshold = the quantizer's scale and spike tracer bounds = its clamp range. With
  V_0 = theta/2 its spikes sum to the quantized value once the network is quiet.
* Sum semantics: input charge, biases and other time-invariant tensors count at the first step only;
  outputs are sums over steps (passes/timing.py).
* Activation x activation MatMuls use SESA (Eq. 4):
  O_t = S_A(t) B_t + A_t S_B(t) - A_t B_t, with S the running sums (spike tracers), so the outputs
  sum to S_A S_B. Computed as S_A(t) S_B(t) - S_A(t-1) S_B(t-1), the same in exact arithmetic with one
  product per step instead of three.
* Softmax, LayerNorm, GELU and every other op that is not affine: Spike-Softmax/LayerNorm of Eq. 5,
  O_t = F(S_X(t)) - F(S_X(t-1)).
* Parallel parameter normalization as in ECMT: spike codes +-1 reach weights pre-scaled by theta.

In this float form (``integer=False``) equivalence holds up to float rounding: a quantizer whose input
lands within rounding error of a level boundary may round the other way in the SNN. QDQ pairs round half
to even, ST-BIF+ half up: they differ only on exact ties.

Integer-exact mode (``integer``, the default) removes that rounding: every neuron is an
STBIFIntegerNeuron, whose membrane and tracer count in integer units of its threshold, and whose input
current is the change of the level (rounded as the quantizer rounds) of the running total its quantizer
reads. The synapses sum integer spikes (exact), and every op between neurons runs on those totals,
tracer x theta, exactly as the QANN runs it on its levels: no per-step increments of float values, so nothing for float sums to
round differently. Once quiet, each tracer is its quantizer's level and every tensor the QANN's, bit
for bit. Weight products run on the totals too (the sum over steps of spikes x W equals tracer x W
in integer arithmetic), in int32 where both operands are levels (a QDQ model's int8/uint8 weights, or
attention's two quantized operands): MatMulInteger, as onnxruntime's integer kernels accumulate. A burst
of up to ``burst`` spikes per step divides T_eq by about ``burst``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.ecmt import fold_thresholds_into_weights
from spikec.passes.patterns import Region
from spikec.passes.regions import detach
from spikec.passes.timing import (
    SUM,
    accumulate,
    attach_neuron,
    convert_time,
    fresh_like,
    neuron_outputs,
    refuse_float_in_regions,
    replace_uses,
    running_sum_product,
    varying_tensors,
)
from spikec.runtime.layout import integer_product_node, tracer_value_node

from spikec.errors import SpikecError


def take_over(graph: gs.Graph, region: Region, replacement: gs.Variable) -> None:
    """``replacement`` stands for the quantizer's output wherever it is read, as a graph output under its
    name too, and the quantizer's own nodes go."""
    quantized = region.outputs[0]
    replace_uses(quantized, replacement)
    if quantized in graph.outputs:
        graph.outputs = [replacement if t is quantized else t for t in graph.outputs]
        replacement.name, quantized.name = quantized.name, f"{quantized.name}.qann"
    detach(region)


def _stbif_params(region: Region) -> dict[str, np.ndarray]:
    """The quantizer's scale and level bounds as an ST-BIF+ neuron's parameters (float32; scalars, or [C]
    per channel)."""
    attrs = region.attrs
    return {
        "theta": np.asarray(attrs["scale"], np.float32),
        "s_min": np.asarray(attrs["low"], np.float32),
        "s_max": np.asarray(attrs["high"], np.float32),
    }


def _neuron_record(region: Region, op: str, **extra) -> dict:
    """The compile report's entry of the neuron ``op`` standing in for the quantizer ``region``."""
    attrs = region.attrs
    source = attrs["input"]
    return {
        "tensor": source.name,
        "node": f"{source.name}/{op}",
        "region": region.name,
        "format": attrs["format"],
        "threshold": np.asarray(attrs["scale"], np.float32).tolist(),
        "s_min": np.asarray(attrs["low"]).tolist(),
        "s_max": np.asarray(attrs["high"]).tolist(),
        "rounding": attrs["rounding"],
        **extra,
    }


def replace_quantizer(graph: gs.Graph, region: Region) -> dict:
    """The quantizer's consumers read ST-BIF+ spikes * scale instead."""
    scaled = attach_neuron(graph, region.attrs["input"], "STBIFNeuron", _stbif_params(region), "theta")
    take_over(graph, region, scaled)
    return _neuron_record(region, "STBIFNeuron")


def replace_quantizer_integer(graph: gs.Graph, region: Region, burst: int, levels: dict[str, Levels]) -> dict:
    """The quantizer's consumers read the integer neuron's tracer (its spikes summed) times the scale:
    DequantizeLinear's (q - z) * s once the tracer is the level. The tracer goes into ``levels``."""
    attrs = region.attrs
    source = attrs["input"]
    params = _stbif_params(region)
    b = GraphBuilder(graph, source.name)
    spikes = b.spikec(
        "STBIFIntegerNeuron",
        source,
        *(b.const(v, name=f"{source.name}.{k}") for k, v in params.items()),
        out=fresh_like(source, ".spikes"),
        name=f"{source.name}/STBIFIntegerNeuron",
        burst=burst,
        half_even=int(attrs["rounding"] == "half_even"),
    )
    tracer = accumulate(graph, spikes, f"{source.name}/Tracer", SUM)
    value = b.op(
        "Mul",
        tracer,
        b.const(params["theta"], None, name=f"{source.name}.scale"),
        out=fresh_like(source, ".level_value"),
        name=tracer_value_node(source.name),
    )
    take_over(graph, region, value)
    levels[value.name] = Levels(tracer, params["theta"], attrs["low"], attrs["high"])
    return _neuron_record(region, "STBIFIntegerNeuron", burst=burst)


def dequantize_weights(graph: gs.Graph) -> int:
    """Fold every DequantizeLinear of constants (the QDQ model's int8/uint8 weights) into a float32 constant,
    (q - z) * s as DequantizeLinear computes it. Left in the graph, onnxruntime fuses it with the MatMul
    it feeds into a kernel that quantizes the other operand on the fly: a product the QANN does not have."""
    folded = 0
    for node in [n for n in graph.nodes if n.op == "DequantizeLinear" and n.domain in (None, "", "ai.onnx")]:
        if not all(isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        q, scale = node.inputs[0].values, np.asarray(node.inputs[1].values, np.float32)
        zero = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale)
        if scale.ndim == 1 and q.ndim > 1:  # per axis
            shape = [1] * q.ndim
            shape[node.attrs.get("axis", 1)] = scale.size
            scale, zero = scale.reshape(shape), np.asarray(zero).reshape(shape)
        value = (q.astype(np.int32) - np.asarray(zero).astype(np.int32)).astype(np.float32) * scale
        node.outputs[0].to_constant(value.astype(np.float32))
        node.outputs.clear()
        folded += 1
    return folded


@dataclass(frozen=True)
class Levels:
    """A tensor of integer levels in [low, high] (float32 values) whose value tensor is levels * theta; the
    bounds are ints, or [C] arrays where a per-channel quantizer splits its levels per channel."""

    tensor: gs.Variable
    theta: np.ndarray
    low: int | np.ndarray
    high: int | np.ndarray


# Ops that only move, select or reshape elements: on levels * theta (one theta) they commute with the Mul.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _weight_levels(tensor: gs.Tensor) -> tuple[gs.Constant, gs.Constant, np.ndarray] | None:
    """A MatMul's [K, N] weight as its DequantizeLinear's values and zero point as uint8 (int8 ones shifted
    by 128: onnxruntime's uint8 x int8 kernels on AVX2 without VNNI add pairs of products in int16 with
    saturation, uint8 x uint8 ones do not), and its scale (one, or one per column N: a scale per row K does
    not factor out of the sum); None where it is anything else."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if (
        node is None
        or node.op != "DequantizeLinear"
        or node.domain not in (None, "", "ai.onnx")
        or not all(isinstance(t, gs.Constant) for t in node.inputs if t.name)
    ):
        return None
    q, scale = node.inputs[0], np.asarray(node.inputs[1].values, np.float32)
    if q.values.ndim != 2 or q.values.dtype not in (np.int8, np.uint8):
        return None
    if scale.size > 1 and (scale.ndim != 1 or node.attrs.get("axis", 1) % 2 != 1 or scale.size != q.values.shape[1]):
        return None
    zero = node.inputs[2].values if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(scale.shape)
    shift = 128 if q.values.dtype == np.int8 else 0
    return (
        gs.Constant(f"{q.name}.uint8", (q.values.astype(np.int16) + shift).astype(np.uint8)),
        gs.Constant(f"{q.name}.zero_uint8", np.asarray(np.asarray(zero).astype(np.int16) + shift, np.uint8)),
        scale,
    )


def _as_uint8(b: GraphBuilder, level: Levels, prefix: str) -> tuple[gs.Variable, gs.Constant]:
    """levels - low as uint8 (exact: 0..high-low <= 255) and the zero point -low that gives the levels back."""
    shifted = b.op("Sub", level.tensor, b.const(level.low), name=tracer_value_node(prefix, "Shift"))
    return (
        b.op("Cast", shifted, to=onnx.TensorProto.UINT8, name=tracer_value_node(prefix, "Uint8")),
        b.const(-level.low, np.uint8),
    )


def _propagate_layout(graph: gs.Graph, levels: dict[str, Levels]) -> None:
    """A layout op of a level value is the same layout op of its levels times theta: its output becomes a
    level value too, so that a product behind K's transpose or the heads' reshapes finds its levels."""
    for node in [n for n in graph.nodes if n.op in LAYOUT_OPS]:  # in order: chains of layout ops follow
        level, out = levels.get(node.inputs[0].name), node.outputs[0]
        if level is None or level.theta.size != 1 or out.name in levels:
            continue
        b = GraphBuilder(graph, f"{out.name}/Levels")
        moved = b.op(node.op, level.tensor, *node.inputs[1:], name=f"{out.name}/Levels{node.op}", **node.attrs)
        levels[out.name] = Levels(moved, level.theta, level.low, level.high)


def integer_products(graph: gs.Graph, levels: dict[str, Levels]) -> int:
    """Every MatMul of a quantizer's levels by a QDQ model's int8/uint8 weight, or by another quantizer's
    levels (attention's Q K^T and P V), accumulates in int32 as onnxruntime's MatMulInteger/QLinearMatMul
    kernels do: MatMulInteger(levels - low as uint8, other operand, zero points) is exact, and one float32
    Mul by the product of the scales turns it into the QANN's value. A float32 product of the dequantized
    values would round its partial sums. The scales must factor out of the sum: the left operand's per
    tensor, the right one's per tensor or per column (last axis); and the sum must fit int32. The others
    (spikec's per-channel quantizers of a left operand, levels wider than uint8, float weights) keep
    float32 MatMuls. Expects a sorted graph; returns the products rewritten."""
    _propagate_layout(graph, levels)

    def factored(level: Levels | None, per_column: bool) -> Levels | None:
        """``level`` where it fits uint8 and its scale factors out of the sum (one, or one per column); its
        bounds must be one pair (one zero point for the uint8 shift)."""
        if level is None or np.ndim(level.low) or not level.low <= 0 <= level.high - level.low <= 255:
            return None
        column = per_column and level.theta.size == np.prod(level.theta.shape[-1:])
        return level if level.theta.size == 1 or column else None

    rewritten, weights = 0, {}  # one uint8 copy of a weight that several products read
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        left = factored(levels.get(node.inputs[0].name), per_column=False)
        right = factored(levels.get(node.inputs[1].name), per_column=True)
        if node.inputs[1].name not in weights:
            weights[node.inputs[1].name] = _weight_levels(node.inputs[1])
        weight = weights[node.inputs[1].name]
        if left is None:
            continue
        if right is not None:
            shape = node.inputs[1].shape
            terms, largest = (shape[-2] if shape else None), max(-right.low, right.high)
            scale = left.theta.reshape(()) * right.theta.reshape(-1)
        elif weight is not None:
            q, zero, column = weight
            terms, largest = q.values.shape[0], int(np.abs(q.values.astype(np.int64) - zero.values).max())
            scale = left.theta.reshape(()) * column
        else:
            continue
        # a sum over a dynamic axis (P V's keys) is assumed shorter than 2^31 / 255^2 = 33,000 terms
        if isinstance(terms, int) and terms * max(-left.low, left.high) * largest >= 2**31:
            continue
        b = GraphBuilder(graph, node.name)
        a, a_zero = _as_uint8(b, left, f"{node.name}/A")
        other, other_zero = _as_uint8(b, right, f"{node.name}/B") if right is not None else (q, zero)
        output = node.outputs[0]
        node.outputs.clear()
        acc = b.op("MatMulInteger", a, other, a_zero, other_zero, name=integer_product_node(node.name))
        wide = b.op("Cast", acc, to=onnx.TensorProto.FLOAT)
        b.op("Mul", wide, b.const(scale), out=output, name=f"{node.name}/Scale")
        rewritten += 1
    return rewritten


def quantizers_as_levels(graph: gs.Graph, regions: list[Region], levels: dict[str, Levels] | None = None) -> int:
    """The integer QANN that integer-exact mode equals: each quantizer written out as its definition,
    clamp(round(x/s), low, high) * s (QuantizeLinear's rounding where it is one), the products of levels
    accumulated in integers (``integer_products``; ``levels``: level tensors besides these quantizers',
    the integer neurons' tracers), and the other weights dequantized, so that onnxruntime runs these ops
    as they are, with none of its QDQ fusions (their requantization rounds otherwise). Leaves the graph
    sorted; returns the integer products."""
    levels = dict(levels or {})
    for region in [r for r in regions if r.kind == "quantizer"]:
        attrs, name = region.attrs, region.attrs["input"].name
        b = GraphBuilder(graph, name)
        theta = b.const(attrs["scale"], name=f"{name}.scale")
        steps = [
            ("Div", [theta]),
            ("Round" if attrs["rounding"] == "half_even" else "Floor", []),
            ("Max", [b.const(attrs["low"], name=f"{name}.low")]),
            ("Min", [b.const(attrs["high"], name=f"{name}.high")]),
            ("Mul", [theta]),
        ]
        if attrs["rounding"] != "half_even":
            steps.insert(1, ("Add", [b.const(0.5, name=f"{name}.half")]))
        quantized, value = region.outputs[0], attrs["input"]
        detach(region)
        for index, (op, operands) in enumerate(steps):
            level = value
            value = b.op(
                op,
                value,
                *operands,
                name=f"{name}/Level{index}",
                out=quantized if index == len(steps) - 1 else fresh_like(attrs["input"], f".level{index}"),
            )
        levels[quantized.name] = Levels(level, np.asarray(attrs["scale"], np.float32), attrs["low"], attrs["high"])
    graph.toposort()
    products = integer_products(graph, levels)
    dequantize_weights(graph)
    graph.cleanup().toposort()
    return products


def totals_as_increments(graph: gs.Graph) -> list[str]:
    """In integer-exact mode every tensor is a running total; sum semantics wants a graph output's
    per-step increments. Each time-varying output gets an ECCompensate, which the readout emit adds
    cancels (passes/emit.py): the output is the total itself, not a float sum of its increments.
    Expects a sorted graph."""
    varying = varying_tensors(graph, neuron_outputs(graph))
    wrapped = []
    for output in [t for t in graph.outputs if t.name in varying]:
        total = fresh_like(output, ".total")
        replace_uses(output, total, producer=True)
        GraphBuilder(graph, output.name).spikec(
            "ECCompensate", total, out=output, name=f"{output.name}/Increments", average=0
        )
        wrapped.append(output.name)
    return wrapped


def sesa(graph: gs.Graph, node: gs.Node, name: str) -> dict:
    """Spike-equivalent self-attention product (Eq. 4) in place of MatMul(A, B), telescoped:
    S_A(t) B_t + A_t S_B(t) - A_t B_t = S_A(t) S_B(t) - S_A(t-1) S_B(t-1), so one product of the running
    sums per step and an ECCompensate (sum semantics) stand for the paper's three products."""
    return running_sum_product(graph, node, name, label="SESA", rewrite="SESA")


def rewrite(
    graph: gs.Graph,
    regions: list[Region],
    *,
    allow_float: frozenset[str] = frozenset(),
    integer: bool = True,
    burst: int = 1,
) -> dict:
    """Rewrite a canonicalized QANN graph into its SpikeZIP-TF SNN (generic spikec ops, no time structure
    yet); with ``integer``, its integer-exact form with bursts of up to ``burst`` spikes."""
    refuse_float_in_regions(regions, set(allow_float))
    quantizers = [r for r in regions if r.kind == "quantizer"]
    if not quantizers:
        raise SpikecError(
            "model has no activation quantizers (QuantizeLinear/DequantizeLinear pairs) to turn "
            "into ST-BIF+ neurons; compile with --levels L to quantize it after training"
        )
    if integer:
        # a quantizer of a tensor that no input varies (position embeddings) has one level for good: no
        # neuron to fire it, and none whose spikes would count towards a sample
        data = varying_tensors(graph, [t.name for t in graph.inputs])
        levels: dict[str, Levels] = {}
        neurons = [
            replace_quantizer_integer(graph, r, burst, levels) for r in quantizers if r.attrs["input"].name in data
        ]
        products = quantizers_as_levels(graph, [r for r in quantizers if r.attrs["input"].name not in data], levels)
        outputs = totals_as_increments(graph)
        graph.toposort()
        return {
            "neurons": neurons,
            "integer": True,
            "burst": burst,
            "compensated": [],
            "gated_to_first_step": 0,
            "ppn_folded_products": 0,
            "total_outputs": outputs,
            "integer_products": products,
        }
    neurons = [replace_quantizer(graph, r) for r in quantizers]
    graph.cleanup()
    timing = convert_time(graph, [r for r in regions if r.kind != "quantizer"], set(allow_float), SUM, product=sesa)
    folded = fold_thresholds_into_weights(graph)
    return {
        "neurons": neurons,
        "compensated": timing["compensated"],
        "gated_to_first_step": timing["gated_to_first_step"],
        "ppn_folded_products": folded,
    }
