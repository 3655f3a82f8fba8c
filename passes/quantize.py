"""Post-training quantization into a QANN: SpikeZIP-TF's pipeline step 1, without training.

The paper quantizes by LSQ-QAT; here scales come from calibration data. Quantizers go before every
activation operand of a MatMul/Gemm or of a gated MLP's act(gate) * up and after every product (after its
bias), as in the reference
code, which also leaves the attention scores Q K^T unquantized (the softmax output is quantized
instead). A product output that reaches the next product through data movement only (the q/k/v
projections' head reshapes) is quantized once. Each quantizer is per tensor,
clamp(floor(x/s + 1/2), low, high) * s (the reference code's LSQ forward), with L levels:
[-L/2, L/2 - 1] for a tensor calibration saw negative, [0, L - 1] otherwise.

The quantizer is written with standard ops (Div, Add, Floor, Clip, Mul), so the QANN runs in stock
onnxruntime; passes/patterns.py recognizes it (region kind "quantizer") as it recognizes QDQ pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from spikec.passes.ecmt import PRODUCT_KINDS, product_operands
from spikec.passes.patterns import Region
from spikec.passes.timing import is_constant, varying_tensors

# Ops that only move values: quantized values stay quantized through them.
_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split",
                            "Slice", "Gather"})
# Clipping thresholds tried, as fractions of the tensor's largest magnitude: outlier channels (MiniLM's
# LayerNorm inputs reach 100x their median) make the best clip far below the maximum.
SCALE_GRID = np.geomspace(1 / 256, 1.0, 97)


@dataclass(frozen=True)
class Site:
    tensor: str
    consumers: tuple[tuple[gs.Node, int], ...] | None  # None: every consumer reads the quantized tensor
    role: str  # "before" (a product's operand) or "after" (a product's output)


def _feeds_softmax(tensor: gs.Tensor, softmax_inputs: set[str]) -> bool:
    """Whether ``tensor`` reaches a softmax through single-input scaling/masking/movement ops."""
    frontier = [tensor]
    seen = set()
    while frontier:
        current = frontier.pop()
        if current.name in softmax_inputs:
            return True
        if current.name in seen:
            continue
        seen.add(current.name)
        for consumer in current.outputs:
            if consumer.op in _DATA_MOVEMENT | {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Max"}:
                frontier.extend(consumer.outputs)
    return False


def _source_through_movement(tensor: gs.Tensor) -> list[str]:
    """``tensor`` and the tensors it is a data-movement view of."""
    chain = [tensor.name]
    while tensor.inputs and tensor.inputs[0].op in _DATA_MOVEMENT:
        tensor = tensor.inputs[0].inputs[0]
        chain.append(tensor.name)
    return chain


def activation_tensors(graph: gs.Graph) -> set[str]:
    """Tensors computed from the data a sample carries: float inputs and table lookups (embeddings) and what
    follows from them. What is computed from integer inputs by arithmetic only (positions cast to float:
    rotary angles; masks) is not an activation: a quantizer there would round positions to a few levels."""
    integer_lookups = [t.name for n in graph.nodes if n.op in ("Gather", "GatherElements", "GatherND")
                       and not all(is_constant(t) for t in n.inputs) for t in n.outputs]
    float_inputs = [t.name for t in graph.inputs if np.issubdtype(np.dtype(t.dtype or np.float32), np.floating)]
    return varying_tensors(graph, float_inputs + integer_lookups)


def quantizer_sites(regions: list[Region], activations: set[str]) -> list[Site]:
    """Where quantizers go: see the module docstring; product operands that are no ``activations`` stay
    float (the product is then affine in its one activation operand)."""
    products = [r for r in regions if r.kind in PRODUCT_KINDS
                and any(node.inputs[index].name in activations for node, index in product_operands(r))]
    softmax_inputs = {t.name for r in regions if r.kind == "softmax" for t in r.inputs}
    after: dict[str, Site] = {}
    for region in products:
        output = region.outputs[0] if region.outputs else product_operands(region)[0][0].outputs[0]
        if region.kind == "act_matmul" and _feeds_softmax(output, softmax_inputs):
            continue
        after.setdefault(output.name, Site(output.name, None, "after"))
    before: dict[str, list[tuple[gs.Node, int]]] = {}
    for region in products:
        for node, index in product_operands(region):
            tensor = node.inputs[index]
            if (is_constant(tensor) or tensor.name not in activations
                    or any(name in after for name in _source_through_movement(tensor))):
                continue
            before.setdefault(tensor.name, []).append((node, index))
    return [*after.values(), *(Site(name, tuple(consumers), "before") for name, consumers in before.items())]


@dataclass(frozen=True)
class Quantizer:
    scale: float
    low: int
    high: int

    @classmethod
    def for_levels(cls, levels: int, signed: bool, clip: float) -> "Quantizer":
        """Levels [-L/2, L/2-1] (signed) or [0, L-1], the clip threshold mapped to the top level."""
        low, high = (-(levels // 2), levels // 2 - 1) if signed else (0, levels - 1)
        magnitude = -low if signed else high
        return cls(float(np.float32(clip / magnitude)) if clip > 0 else 1.0, low, high)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        s = np.float32(self.scale)
        return np.clip(np.floor(x / s + np.float32(0.5)), self.low, self.high) * s


def choose_quantizer(stats, levels: int) -> Quantizer:
    """The clip threshold (a SCALE_GRID fraction of the largest magnitude) with the least squared error."""
    signed = bool(stats.min() < 0)
    clip = stats.mmse(lambda x, thr: Quantizer.for_levels(levels, signed, float(thr))(x), grid=SCALE_GRID)
    return Quantizer.for_levels(levels, signed, float(clip))


def insert_quantizers(graph: gs.Graph, sites: list[Site], quantizers: dict[str, Quantizer]) -> list[dict]:
    """Write each site's quantizer into the graph as Div -> Add(0.5) -> Floor -> Clip -> Mul."""
    tensors = graph.tensors()
    report = []
    for site in sites:
        tensor, q = tensors[site.tensor], quantizers[site.tensor]
        name = f"{site.tensor}/Quantize"
        scale = gs.Constant(f"{site.tensor}.quant_scale", np.array(q.scale, np.float32))

        def variable(suffix: str) -> gs.Variable:
            return gs.Variable(f"{site.tensor}.{suffix}", dtype=np.float32, shape=tensor.shape)

        divided, shifted, floored, clipped, quantized = (variable(s) for s in
                                                         ("quant_div", "quant_shift", "quant_floor", "quant_clip",
                                                          "quantized"))
        graph.nodes += [
            gs.Node("Div", f"{name}/Div", inputs=[tensor, scale], outputs=[divided]),
            gs.Node("Add", f"{name}/Add", inputs=[divided, gs.Constant(f"{site.tensor}.quant_half",
                                                                       np.array(0.5, np.float32))],
                    outputs=[shifted]),
            gs.Node("Floor", f"{name}/Floor", inputs=[shifted], outputs=[floored]),
            gs.Node("Clip", f"{name}/Clip", inputs=[floored,
                                                    gs.Constant(f"{site.tensor}.quant_low", np.array(q.low, np.float32)),
                                                    gs.Constant(f"{site.tensor}.quant_high", np.array(q.high, np.float32))],
                    outputs=[clipped]),
        ]
        consumers = site.consumers if site.consumers is not None else \
            [(c, i) for c in list(tensor.outputs) if c.name != f"{name}/Div" for i, t in enumerate(c.inputs)
             if t is tensor]
        for node, index in consumers:
            node.inputs[index] = quantized
        if site.consumers is None and tensor in graph.outputs:
            graph.outputs = [quantized if t is tensor else t for t in graph.outputs]
            quantized.name, tensor.name = tensor.name, f"{tensor.name}.unquantized"
        graph.nodes.append(gs.Node("Mul", f"{name}/Mul", inputs=[clipped, scale], outputs=[quantized]))
        report.append({"tensor": site.tensor, "role": site.role, "scale": q.scale, "low": q.low, "high": q.high})
    graph.toposort()
    return report
