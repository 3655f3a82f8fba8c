"""Time semantics of a spiking graph: which tensors vary over time steps, and compensation.

A tensor varies over time only downstream of a neuron; everything computed from inputs and constants
alone (embeddings, masks and their huge negative constants, shapes) is *time-invariant*: the same
value at every step. Two semantics give a per-step tensor its meaning:

* **mean** (ECMT, STA): the input is presented at every step and biases act at every step; a tensor's
  value is the running mean of its per-step values. Time-invariant tensors are used as they are.
* **sum** (SpikeZIP-TF): a tensor's value is the sum of its per-step values. A time-invariant tensor
  (input charge, bias, position embedding, class token) must count once: where it enters a per-step
  computation additively (a neuron's input, an operand of Add/Sub/Concat/Where, Gemm's C) it is gated
  to the first step (spikec ``Onset``, lowered by passes/emit.py). Used multiplicatively (weights,
  scales) it stays as it is.

An op whose outputs are affine in its time-varying inputs runs unchanged on the per-step values. Any
other op F is compensated: ECAccumulate turns each varying input into its running mean (or sum), F
runs in float on those, and ECCompensate turns F's outputs back into per-step increments
(t*Y(t) - (t-1)*Y(t-1), or Y(t) - Y(t-1)). A method may rewrite activation x activation products its
own way (SpikeZIP-TF's SESA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeGuard

import numpy as np
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.regions import DATA_MOVEMENT
from spikec.runtime.layout import spike_value_node

from spikec.errors import SpikecError

MEAN, SUM = "mean", "sum"
# ops whose outputs vary per step (a UGO emits the weighted sum of its hidden neurons' spikes)
NEURON_OPS = frozenset({"MTNeuron", "STBIFNeuron", "STBIFIntegerNeuron", "IFNeuron", "X2XEncoder", "UGO"})

# Ops whose outputs are linear functions of each input, or pure data movement.
_LINEAR_IN_EVERY_INPUT = {
    "Add",
    "Sub",
    "Neg",
    "Identity",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "Expand",
    "Tile",
    "ReduceSum",
    "ReduceMean",
    "Pad",
    "Dropout",
    "SpaceToDepth",
    "DepthToSpace",
    "GlobalAveragePool",
    "AveragePool",
    "Resize",  # interpolation weights depend on the sizes alone (MobileViT's fold back to the feature map)
}
# Bilinear ops: affine as long as at most one operand varies over time.
_BILINEAR = {"Mul", "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
# Affine in their first input while the others (parameters) are fixed: inference-mode BatchNormalization is
# x * scale / sqrt(var + eps) + (B - mean * scale / sqrt(var + eps)) per channel.
_AFFINE_IN_FIRST = {"BatchNormalization"}
# Ops whose output depends on the input's shape or type only.
SHAPE_ONLY = {"Shape", "Size", "EyeLike", "ConstantOfShape"}
# Ops that cannot be evaluated on running means: their outputs are not float or they hold control flow.
_UNCONVERTIBLE = {
    "If",
    "Loop",
    "Scan",
    "ArgMax",
    "ArgMin",
    "TopK",
    "NonZero",
    "Unique",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "NonMaxSuppression",
    "StringNormalizer",
}


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def varying_tensors(graph: gs.Graph, sources: Iterable[str]) -> set[str]:
    """Names of all tensors downstream of ``sources`` (neuron outputs), shape-only ops excepted."""
    varying = set(sources)
    for node in graph.nodes:  # graph is topologically sorted
        if node.op in SHAPE_ONLY:
            continue
        if any(t.name in varying for t in node.inputs if not is_constant(t) and t.name):
            varying.update(t.name for t in node.outputs)
    return varying


def _varying_inputs(node: gs.Node, varying: set[str]) -> list[int]:
    return [i for i, t in enumerate(node.inputs) if t.name in varying and not is_constant(t)]


def is_affine(node: gs.Node, varying: set[str]) -> bool:
    """Whether ``node``'s outputs are affine in its time-varying inputs (so it commutes with the mean)."""
    moving = _varying_inputs(node, varying)
    if not moving or node.op in SHAPE_ONLY:
        return True
    if node.op in _LINEAR_IN_EVERY_INPUT:
        # Gather/Slice/Pad/Expand/Tile/Reshape index operands must not vary: only the data may.
        return node.op in {"Add", "Sub", "Concat"} or moving == [0]
    if node.op == "Div" or node.op in _AFFINE_IN_FIRST:
        return moving == [0]
    if node.op == "Where":
        return 0 not in moving
    if node.op == "Cast":
        return node.attrs.get("to") in (1, 10, 11, 16)  # float types only
    if node.op in _BILINEAR:
        operand_count = 2 if node.op != "Einsum" else len(node.inputs)
        return len([i for i in moving if i < operand_count]) <= 1
    return False


Unit = tuple[str, str, list[gs.Node]]  # (name, region kind or "node", nodes): what convert_time converts as one


def kept_in_float(node: gs.Node, allow_float: set[str]) -> bool:
    return node.op in allow_float or node.name in allow_float


def unconvertible_nodes(units: list[Unit], varying: set[str], allow_float: set[str]) -> list[gs.Node]:
    """Nodes with time-varying inputs that no expectation can be computed for, unless kept in float.

    A recognized region is judged as it is converted: as a whole. Compensation runs its function on running
    means (sums), so whatever its nodes compute inside (sdpa's IsNaN guard) is as convertible as the
    function; only what leaves it must be float, to be averaged."""
    bad = []
    for _, kind, nodes in units:
        if kind == "node":
            node = nodes[0]
            if node.op in _UNCONVERTIBLE and _varying_inputs(node, varying) and not kept_in_float(node, allow_float):
                bad.append(node)
            continue
        inside = {id(n) for n in nodes}
        bad += [
            n
            for n in nodes
            if any(_leaves(t, inside) and not _is_float(t) for t in n.outputs)
            and any(_varying_inputs(m, varying) for m in nodes)
        ]
    return bad


def _leaves(tensor: gs.Tensor, inside: set[int]) -> bool:
    return not tensor.outputs or any(id(c) not in inside for c in tensor.outputs)


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is None or np.dtype(tensor.dtype).kind == "f"


def require_convertible(units: list[Unit], varying: set[str], allow_float: set[str]) -> None:
    bad = unconvertible_nodes(units, varying, allow_float)
    if bad:
        listing = ", ".join(f"{n.name} ({n.op})" for n in bad)
        raise SpikecError(
            f"cannot convert {len(bad)} node(s) whose inputs vary over time: {listing}; "
            f"keep them in floating point with --allow-float {','.join(sorted({n.op for n in bad}))}"
        )


def refuse_float_in_regions(regions: list, allow_float: set[str]) -> None:
    """--allow-float keeps an op outside every recognized region in float (evaluated on per-step values).
    Inside a region it would take the node, and with it the region, out of the conversion the method
    gives the region (compensation, SESA, a UGO, a neuron): the SNN would silently drift from its ANN
    (SpikeZIP-TF from its QANN). Refused, naming the entry, the node and the region."""
    for region in regions:
        for node in region.nodes:
            entry = node.name if node.name in allow_float else node.op if node.op in allow_float else None
            if entry is not None:
                raise SpikecError(
                    f"argument allow_float: {entry!r} names node {node.name} ({node.op}) of the recognized "
                    f"{region.kind} region {region.name}, which is converted as a whole (nothing in it needs "
                    f"float); keeping part of it in float would silently change that conversion: leave {entry!r} out"
                )


def neuron_outputs(graph: gs.Graph) -> list[str]:
    return [n.outputs[0].name for n in graph.nodes if n.domain == "spikec" and n.op in NEURON_OPS]


def attach_neuron(
    graph: gs.Graph,
    tensor: gs.Variable,
    op: str,
    params: dict[str, np.ndarray],
    scale: str | np.ndarray,
    **attrs,
) -> gs.Variable:
    """A neuron ``op`` reading ``tensor``; returns its spike value, code * ``scale`` (a param's name, or
    values of its own), which fold_thresholds_into_weights may later fold into the weights that read it."""
    b = GraphBuilder(graph, tensor.name)
    constants = {k: b.const(v, name=f"{tensor.name}.{k}") for k, v in params.items()}
    spikes = b.spikec(
        op, tensor, *constants.values(), out=fresh_like(tensor, ".spikes"), name=f"{tensor.name}/{op}", **attrs
    )
    value = constants[scale] if isinstance(scale, str) else b.const(scale, name=f"{tensor.name}.spike_scale")
    return b.op("Mul", spikes, value, out=fresh_like(tensor, ".spike_value"), name=spike_value_node(tensor.name))


def replace_uses(tensor: gs.Tensor, replacement: gs.Tensor, *, producer: bool = False) -> None:
    """Make every consumer of ``tensor`` (and with ``producer``, the node producing it) use
    ``replacement`` instead. graphsurgeon's synchronized lists only support item assignment."""
    for node in list(tensor.outputs):
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = replacement
    if producer:
        for node in list(tensor.inputs):
            for i, t in enumerate(node.outputs):
                if t is tensor:
                    node.outputs[i] = replacement


def fresh_like(tensor: gs.Variable, suffix: str) -> gs.Variable:
    return gs.Variable(f"{tensor.name}{suffix}", dtype=tensor.dtype or np.float32, shape=tensor.shape)


def accumulate(graph: gs.Graph, tensor: gs.Variable, name: str, semantics: str) -> gs.Variable:
    """Running mean (mean semantics) or running sum (sum semantics) of a per-step tensor."""
    return GraphBuilder(graph, name).spikec(
        "ECAccumulate",
        tensor,
        out=fresh_like(tensor, f".ec_{semantics}.{name}"),
        name=f"{name}/ECAccumulate.{tensor.name}",
        average=int(semantics == MEAN),
    )


def running_sum_product(
    graph: gs.Graph, node: gs.Node, name: str, *, label: str, rewrite: str, weight: float | None = None
) -> dict:
    """A product of two per-step operands, telescoped: P(t) = S_A(t) S_B(t) - S_A(t-1) S_B(t-1) from the
    running sums (one product per step and an ECCompensate in sum semantics), times ``weight`` if given.
    ``label`` names the nodes (and, lower-cased, the tensors); ``rewrite`` is the report's name for it."""
    a, b = node.inputs
    out = node.outputs[0]
    tag = label.lower()
    product = fresh_like(out, f".{tag}_product")
    node.inputs[0], node.inputs[1] = accumulate(graph, a, name, SUM), accumulate(graph, b, name, SUM)
    node.outputs[0] = product
    builder = GraphBuilder(graph, name)
    increment = out if weight is None else fresh_like(out, f".{tag}_increment")
    builder.spikec("ECCompensate", product, out=increment, name=f"{name}/{label}", average=0)
    if weight is not None:
        builder.op(
            "Mul", increment, builder.const(weight, name=f"{name}.weight"), out=out, name=f"{name}/{label}Weight"
        )
    return {"inputs": [a.name, b.name], "outputs": [out.name], "rewrite": rewrite}


def compensate_region(
    graph: gs.Graph, nodes: list[gs.Node], varying: set[str], name: str, semantics: str = MEAN
) -> dict:
    """Wrap ``nodes`` (a region evaluating one function F) in compensation.

    Returns a description of what was inserted, for reports."""
    inside = {id(n) for n in nodes}
    produced = {t.name for n in nodes for t in n.outputs}
    entering: dict[str, gs.Variable] = {}
    for node in nodes:
        for i, tensor in enumerate(node.inputs):
            if is_constant(tensor) or tensor.name not in varying or tensor.name in produced:
                continue
            if tensor.name not in entering:
                # A tensor may enter several regions: each gets its own accumulator, named after it.
                entering[tensor.name] = accumulate(graph, tensor, name, semantics)
            node.inputs[i] = entering[tensor.name]
    graph_outputs = {t.name for t in graph.outputs}
    builder = GraphBuilder(graph, name)
    leaving: list[str] = []
    for node in nodes:
        for tensor in node.outputs:
            outside = [c for c in tensor.outputs if id(c) not in inside]
            if not outside and tensor.name not in graph_outputs:
                continue
            increment = fresh_like(tensor, ".expectation")
            for consumer in outside:
                for i, t in enumerate(consumer.inputs):
                    if t is tensor:
                        consumer.inputs[i] = increment
            graph.outputs = [increment if t is tensor else t for t in graph.outputs]
            builder.spikec(
                "ECCompensate",
                tensor,
                out=increment,
                name=f"{name}/ECCompensate{len(leaving)}",
                average=int(semantics == MEAN),
            )
            # Downstream sees the compensated increments under the original name (graph outputs keep
            # theirs); F's output on the running means is the expectation.
            tensor.name, increment.name = increment.name, tensor.name
            leaving.append(increment.name)
    return {"inputs": sorted(entering), "outputs": leaving}


# Inputs through which a time-invariant operand adds to the output of an op affine in its varying inputs.
def _additive_inputs(node: gs.Node) -> Iterable[int]:
    if node.op in ("Add", "Sub", "Sum", "Concat"):
        return range(len(node.inputs))
    if node.op == "Where":
        return (1, 2)
    if node.op == "Gemm":
        return (2,)
    return ()


def _rank_of(node: gs.Node) -> int:
    ranks = [len(t.shape) for t in [*node.outputs, *node.inputs] if t.shape is not None]
    if not ranks:
        raise SpikecError(f"node {node.name} ({node.op}): rank unknown, cannot gate its time-invariant inputs")
    return max(ranks)


def gate_to_first_step(graph: gs.Graph, node: gs.Node, index: int, rank: int, like: gs.Tensor) -> None:
    """Sum semantics: node.inputs[index], a time-invariant tensor, counts at the first step only.

    ``like`` is a tensor whose leading axis holds the steps' rows (a per-step input of ``node``): in the
    time-unrolled form the gate keeps the first T-th of those rows."""
    tensor = node.inputs[index]
    # The rank is known (neuron states need it); the leading axis may grow to the steps' rows.
    shape = [None, *tensor.shape[1:]] if tensor.shape is not None and len(tensor.shape) == rank else None
    gated = gs.Variable(f"{tensor.name}.onset.{node.name}", dtype=tensor.dtype or np.float32, shape=shape)
    GraphBuilder(graph, node.name).spikec("Onset", tensor, like, out=gated, name=f"{node.name}/Onset{index}", rank=rank)
    node.inputs[index] = gated


def _gate_invariant_operands(graph: gs.Graph, node: gs.Node, varying: set[str]) -> int:
    moving = _varying_inputs(node, varying)
    if not moving:
        return 0
    if node.op == "Pad" and len(node.inputs) > 2 and node.inputs[2].name and 0 in moving:
        value = node.inputs[2].values if is_constant(node.inputs[2]) else None
        if value is None or np.any(value != 0):
            raise SpikecError(
                f"node {node.name} (Pad): a non-zero pad value would be added at every step; "
                f"sum semantics needs it once"
            )
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2].name:
        _split_conv_bias(graph, node)
        return 1
    if node.op == "BatchNormalization":
        _split_batchnorm(graph, node)
        return 1
    gated = 0
    for index in _additive_inputs(node):
        if index >= len(node.inputs) or not node.inputs[index].name or index in moving:
            continue
        gate_to_first_step(graph, node, index, _rank_of(node), node.inputs[moving[0]])
        gated += 1
    return gated


def _split_conv_bias(graph: gs.Graph, conv: gs.Node) -> None:
    """Conv(x, W, B) -> Add(Conv(x, W), B as [C, 1, ..]) with B gated to the first step: Conv's B input
    must stay 1-D, the Add's operand can take the gate's leading rows axis."""
    bias = conv.inputs[2]
    out = conv.outputs[0]
    rank = _rank_of(conv)
    b = GraphBuilder(graph, conv.name)
    shaped = b.op(
        "Reshape",
        bias,
        b.const([-1] + [1] * (rank - 2), np.int64, name=f"{conv.name}.bias_shape"),
        out=gs.Variable(f"{bias.name}.channels.{conv.name}", dtype=bias.dtype or np.float32),
        name=f"{conv.name}/BiasShape",
    )
    product = fresh_like(out, ".unbiased")
    del conv.inputs[2]
    conv.outputs[0] = product
    b.op("Add", product, shaped, out=out, name=f"{conv.name}/Bias")
    gate_to_first_step(graph, out.inputs[0], 1, rank, product)


def _split_batchnorm(graph: gs.Graph, norm: gs.Node) -> None:
    """BatchNormalization(x) -> Add(Mul(x, a), c) with a = scale / sqrt(var + eps) and c = B - mean * a per
    channel (axis 1), c gated to the first step: the shift counts once in a sum, the scaling at every step."""
    params = norm.inputs[1:5]
    if len(params) != 4 or not all(is_constant(t) for t in params):
        raise SpikecError(
            f"node {norm.name} (BatchNormalization): its scale, bias, mean and variance must be "
            f"constants to split it into a per-step scaling and a shift counted once"
        )
    scale, bias, mean, var = (t.values.astype(np.float64) for t in params)
    rank = _rank_of(norm)
    factor = scale / np.sqrt(var + float(norm.attrs.get("epsilon", 1e-5)))
    channels = [-1] + [1] * (rank - 2)
    out = norm.outputs[0]
    b = GraphBuilder(graph, norm.name)
    scaled = b.op(
        "Mul",
        norm.inputs[0],
        b.const(factor.reshape(channels), name=f"{norm.name}.factor"),
        out=fresh_like(out, ".scaled"),
        name=f"{norm.name}/Scale",
    )
    b.op(
        "Add",
        scaled,
        b.const((bias - mean * factor).reshape(channels), name=f"{norm.name}.shift"),
        out=out,
        name=f"{norm.name}/Shift",
    )
    norm.outputs.clear()
    gate_to_first_step(graph, out.inputs[0], 1, rank, scaled)


# The product node each kind of unit rewrites with a ProductRewrite: elementwise for gated activations.
_PRODUCT_OPS = {"act_matmul": "MatMul", "act_mul": "Mul", "node": "MatMul"}
ProductRewrite = Callable[[gs.Graph, gs.Node, str], dict]


def convert_time(
    graph: gs.Graph, regions: list, allow_float: set[str], semantics: str, product: ProductRewrite | None = None
) -> dict:
    """Give every op downstream of a neuron its per-step form: affine ops run as they are, other regions
    are compensated (``product`` rewrites activation x activation MatMuls instead, if given), and in sum
    semantics time-invariant tensors are gated to the first step where they add to per-step values."""
    graph.toposort()
    varying = varying_tensors(graph, neuron_outputs(graph))
    in_region = {id(n) for r in regions for n in r.nodes}
    units: list[Unit] = [(r.name, r.kind, r.nodes) for r in regions]
    units += [(n.name, "node", [n]) for n in list(graph.nodes) if id(n) not in in_region and n.domain != "spikec"]
    require_convertible(units, varying, allow_float)
    compensated, gated = [], 0
    for name, kind, nodes in units:
        if kind == "node" and kept_in_float(nodes[0], allow_float):
            continue
        if all(is_affine(n, varying) for n in nodes):
            if semantics == SUM:
                gated += sum(_gate_invariant_operands(graph, n, varying) for n in nodes)
            continue
        products = [n for n in nodes if n.op == _PRODUCT_OPS.get(kind) and len(_varying_inputs(n, varying)) == 2]
        if product is not None and len(nodes) == 1 and products:
            inserted = product(graph, nodes[0], name)
        else:
            inserted = compensate_region(graph, nodes, varying, name, semantics)
        compensated.append({"region": name, "kind": kind, "ops": [n.op for n in nodes], **inserted})
    if semantics == SUM:
        for neuron in [n for n in graph.nodes if n.domain == "spikec" and n.op in NEURON_OPS]:
            if neuron.inputs[0].name not in varying:
                gate_to_first_step(graph, neuron, 0, _rank_of(neuron), neuron.inputs[0])
                gated += 1
    hoist_accumulations(graph)
    sink_compensations(graph)
    graph.toposort()
    return {"compensated": compensated, "gated_to_first_step": gated}


def _moves_data_only(node: gs.Node | None, tensor: gs.Tensor) -> TypeGuard[gs.Node]:
    """Whether ``node`` only moves its data input ``tensor`` around, keeping every element's steps: not
    reordering the rows of the leading axis (a Transpose only if it keeps axis 0), the per-step blocks of an
    unrolled tensor stay where they are, every element keeps its own series."""
    if node is None or node.op not in DATA_MOVEMENT or node.inputs[0] is not tensor:
        return False
    return node.op != "Transpose" or list(node.attrs.get("perm", [1]))[:1] == [0]


def hoist_accumulations(graph: gs.Graph) -> int:
    """Move each ECAccumulate above the data movement between it and the op computing its input (a
    neuron's spike value, reshaped and transposed into attention heads): running sums commute with data
    movement bit for bit, and an accumulator reading a neuron's spike value fuses with the neuron
    (runtime/fusion.py). Only where the moved op feeds the accumulator alone. Returns how many moves."""
    moves = 0
    moved = True
    while moved:
        moved = False
        for acc in [n for n in graph.nodes if n.domain == "spikec" and n.op == "ECAccumulate"]:
            moving = acc.inputs[0]
            mover = moving.inputs[0] if len(moving.inputs) == 1 else None
            if (
                len(moving.outputs) != 1
                or moving in graph.outputs
                or mover is None
                or not _moves_data_only(mover, mover.inputs[0])
            ):
                continue
            data, total = mover.inputs[0], acc.outputs[0]
            hoisted = gs.Variable(
                f"{total.name}.before.{mover.name}", dtype=total.dtype or np.float32, shape=data.shape
            )
            acc.inputs[0], acc.outputs[0] = data, hoisted
            mover.inputs[0], mover.outputs[0] = hoisted, total
            moves += 1
            moved = True
    return moves


def sink_compensations(graph: gs.Graph) -> int:
    """Move each ECCompensate below the data movement between it and the op reading its increments (a
    neuron or encoder behind the attention heads' Transpose and Reshape), the mirror of
    hoist_accumulations: the increments commute with data movement bit for bit, and a compensation
    feeding a neuron fuses with it. Only where the compensation feeds the moved op alone."""
    moves = 0
    moved = True
    while moved:
        moved = False
        for comp in [n for n in graph.nodes if n.domain == "spikec" and n.op == "ECCompensate"]:
            increments = comp.outputs[0]
            mover = increments.outputs[0] if len(increments.outputs) == 1 else None
            if increments in graph.outputs or not _moves_data_only(mover, increments):
                continue
            function_out, moved_out = comp.inputs[0], mover.outputs[0]
            sunk = gs.Variable(
                f"{moved_out.name}.before.{comp.name}", dtype=moved_out.dtype or np.float32, shape=moved_out.shape
            )
            mover.inputs[0], mover.outputs[0] = function_out, sunk
            comp.inputs[0], comp.outputs[0] = sunk, moved_out
            moves += 1
            moved = True
    return moves
