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

Equivalence holds up to float rounding: a quantizer whose input lands within rounding error of a
level boundary may round the other way in the SNN. QDQ pairs round half to even, ST-BIF+ half up:
they differ only on exact ties.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from spikec.passes.ecmt import fold_thresholds_into_weights
from spikec.passes.patterns import Region
from spikec.passes.regions import detach
from spikec.passes.timing import (
    SUM,
    attach_neuron,
    convert_time,
    refuse_float_in_regions,
    replace_uses,
    running_sum_product,
)

from spikec.errors import SpikecError


def replace_quantizer(graph: gs.Graph, region: Region) -> dict:
    """The quantizer's consumers read ST-BIF+ spikes * scale instead."""
    attrs = region.attrs
    source, quantized = attrs["input"], region.outputs[0]
    scaled = attach_neuron(graph, source, "STBIFNeuron",
                           {"theta": np.asarray(attrs["scale"], np.float32), "s_min": np.float32(attrs["low"]),
                            "s_max": np.float32(attrs["high"])}, "theta")
    replace_uses(quantized, scaled)
    if quantized in graph.outputs:
        graph.outputs = [scaled if t is quantized else t for t in graph.outputs]
        scaled.name, quantized.name = quantized.name, f"{quantized.name}.qann"
    detach(region)
    return {"tensor": source.name, "node": f"{source.name}/STBIFNeuron", "region": region.name, "format": attrs["format"],
            "threshold": np.asarray(attrs["scale"], np.float32).tolist(), "s_min": attrs["low"], "s_max": attrs["high"],
            "rounding": attrs["rounding"]}


def sesa(graph: gs.Graph, node: gs.Node, name: str) -> dict:
    """Spike-equivalent self-attention product (Eq. 4) in place of MatMul(A, B), telescoped:
    S_A(t) B_t + A_t S_B(t) - A_t B_t = S_A(t) S_B(t) - S_A(t-1) S_B(t-1), so one product of the running
    sums per step and an ECCompensate (sum semantics) stand for the paper's three products."""
    return running_sum_product(graph, node, name, label="SESA", rewrite="SESA")


def rewrite(graph: gs.Graph, regions: list[Region], *, allow_float: frozenset[str] = frozenset()) -> dict:
    """Rewrite a canonicalized QANN graph into its SpikeZIP-TF SNN (generic spikec ops, no time structure yet)."""
    refuse_float_in_regions(regions, set(allow_float))
    quantizers = [r for r in regions if r.kind == "quantizer"]
    if not quantizers:
        raise SpikecError("model has no activation quantizers (QuantizeLinear/DequantizeLinear pairs) to turn "
                          "into ST-BIF+ neurons; compile with --levels L to quantize it after training")
    neurons = [replace_quantizer(graph, r) for r in quantizers]
    graph.cleanup()
    timing = convert_time(graph, [r for r in regions if r.kind != "quantizer"], set(allow_float), SUM,
                          product=sesa)
    folded = fold_thresholds_into_weights(graph)
    return {"neurons": neurons, "compensated": timing["compensated"],
            "gated_to_first_step": timing["gated_to_first_step"], "ppn_folded_products": folded}
