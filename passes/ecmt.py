"""ECMT (Expectation Compensation + Multi-Threshold neurons, seed 001) as graph rewrites.

* MT neurons sit before every activation x weight product and on both operands of every
  activation x activation product (Algorithm 1, lines 9-11): Q K^T and P V, and the elementwise
  act(gate) * up of gated MLPs (SwiGLU, GeGLU).
* Every op that is not affine in its time-varying inputs gets expectation compensation
  (Eq. 15); for an activation x activation MatMul this is the matrix-product EC of Eq. 16:
  t*(S_A/t)(S_B/t) - (t-1)*(S'_A/(t-1))(S'_B/(t-1)) = S_K(t)/t - S_K(t-1)/(t-1).
* Parallel parameter normalization (Eq. 27): neurons emit spike codes in units of their base
  threshold theta_1; the threshold is folded into the following weights.
* Not in the paper: a neuron's spike value is divided by its measured mean gain (Thresholds.gain), which
  PPN folds into the weights with theta_1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.patterns import Region
from spikec.passes.regions import PRODUCT_KINDS, Operands, operand_sites
from spikec.passes.timing import MEAN, attach_neuron, convert_time, is_constant, refuse_float_in_regions
from spikec.runtime.layout import is_spike_value


@dataclass(frozen=True)
class Thresholds:
    """Base thresholds of one MT neuron: theta_1 (positive) and theta_2 (negative side), scalar or per channel."""

    positive: np.ndarray
    negative: np.ndarray
    # The slope of the neurons' T-step mean over their input (least squares, per channel or scalar): Eq. 25
    # fires the largest power of two below the membrane (plus theta/2), so the residual left after T steps
    # leans towards the input's sign and the mean falls short of it by a fraction that grows as theta falls
    # below the input (docs/methods/ecmt.md, "Mean gain"). A shortfall at every site
    # compounds through a deep network (LeViT: 12 residual blocks without normalization) where the bare
    # rounding error of each site does not. The spike value is code * theta_pos / gain.
    gain: np.ndarray | float = 1.0

    @classmethod
    def from_percentiles(cls, high, low) -> Thresholds:
        """theta_1 = p-th percentile, theta_2 = -(100-p)-th percentile (Algorithm 1, line 4).

        A side the data never reaches mirrors the other side, so both stay positive: with the
        round-to-nearest rule that side then never fires."""
        pos = np.maximum(np.asarray(high, np.float32), 0)
        neg = np.maximum(-np.asarray(low, np.float32), 0)
        pos, neg = np.where(pos > 0, pos, neg), np.where(neg > 0, neg, pos)
        fallback = np.float32(1.0)  # a tensor that is identically zero
        return cls(
            np.where(pos > 0, pos, fallback).astype(np.float32), np.where(neg > 0, neg, fallback).astype(np.float32)
        )

    def covering(self, high, low, levels: int, coverage: float) -> Thresholds:
        """Raise theta so that the top level theta*2^(n-1) reaches ``coverage`` times the calibration
        extreme on each side. A percentile threshold far below the maximum (a sparse channel: its
        p-th percentile near zero, rare large values) leaves the neuron firing its top level at every
        step without catching up: the mean saturates. Not in the paper; coverage 0 turns it off."""
        top = np.float32(2.0 ** (levels - 1))
        pos = np.maximum(self.positive, coverage * np.maximum(np.asarray(high, np.float32), 0) / top)
        neg = np.maximum(self.negative, coverage * np.maximum(-np.asarray(low, np.float32), 0) / top)
        return Thresholds(pos.astype(np.float32), neg.astype(np.float32))


def neuron_sites(regions: list[Region]) -> dict[str, Operands]:
    """Tensor name -> the product operands it feeds, for every tensor that gets an MT neuron."""
    return operand_sites(regions, PRODUCT_KINDS)


def insert_neurons(
    graph: gs.Graph, sites: dict[str, list[tuple[gs.Node, int]]], thresholds: dict[str, Thresholds], levels: int
) -> list[dict]:
    """An MT neuron per site tensor, shared by all the products it feeds; they read code * theta_1."""
    report = []
    tensors = graph.tensors()
    for name, operands in sites.items():
        theta = thresholds[name]
        unbiased = np.all(np.asarray(theta.gain) == 1.0)
        scaled = attach_neuron(
            graph,
            tensors[name],
            "MTNeuron",
            {"theta_pos": theta.positive, "theta_neg": theta.negative},
            "theta_pos" if unbiased else (theta.positive / theta.gain).astype(np.float32),
            levels=levels,
        )
        for node, index in operands:
            node.inputs[index] = scaled
        report.append(
            {
                "tensor": name,
                "node": f"{name}/MTNeuron",
                "levels": levels,
                "theta_pos": theta.positive.tolist(),
                "theta_neg": theta.negative.tolist(),
                "gain": np.asarray(theta.gain, np.float64).tolist(),
                "consumers": sorted({node.name for node, _ in operands}),
            }
        )
    return report


def fold_thresholds_into_weights(graph: gs.Graph) -> int:
    """Parallel parameter normalization: Mul(code, theta) -> MatMul(., W) becomes MatMul(code, theta*W).

    Only products with a constant right-hand weight are folded; activation x activation products
    keep the explicit Mul. Returns how many products were folded."""
    folded = 0
    builder = GraphBuilder(graph, "ppn")
    for mul in [n for n in graph.nodes if n.op == "Mul" and is_spike_value(n.name)]:
        code, theta = mul.inputs
        scaled = mul.outputs[0]
        for consumer in list(scaled.outputs):
            weight_index = foldable_weight_index(consumer, scaled)
            if weight_index is None:
                continue
            weight = consumer.inputs[weight_index]
            transposed = consumer.op == "Gemm" and consumer.attrs.get("transB", 0)
            scale = theta.values.reshape(-1)
            # theta scales the rows of W (x @ W) or the columns of W^T (Gemm transB=1).
            factor = scale[None, :] if transposed else scale[:, None]
            consumer.inputs[weight_index] = builder.const(
                weight.values * factor, weight.values.dtype, name=f"{weight.name}.ppn.{consumer.name}"
            )
            consumer.inputs[0 if weight_index == 1 else 1] = code
            folded += 1
    graph.cleanup()
    return folded


def foldable_weight_index(node: gs.Node, activation) -> int | None:
    if (
        node.op == "MatMul"
        and node.inputs[0] is activation
        and is_constant(node.inputs[1])
        and node.inputs[1].values.ndim == 2
    ):
        return 1
    if (
        node.op == "Gemm"
        and node.inputs[0] is activation
        and is_constant(node.inputs[1])
        and not node.attrs.get("transA", 0)
        and node.attrs.get("alpha", 1.0) == 1.0
    ):
        return 1
    return None


def rewrite(
    graph: gs.Graph,
    regions: list[Region],
    thresholds: dict[str, Thresholds],
    *,
    levels: int = 8,
    allow_float: frozenset[str] = frozenset(),
) -> dict:
    """Rewrite a canonicalized ANN graph into its ECMT SNN (generic spikec ops, no time structure yet)."""
    refuse_float_in_regions(regions, set(allow_float))
    sites = neuron_sites(regions)
    neurons = insert_neurons(graph, sites, thresholds, levels)
    timing = convert_time(graph, regions, set(allow_float), MEAN)
    folded = fold_thresholds_into_weights(graph)
    return {"neurons": neurons, "compensated": timing["compensated"], "ppn_folded_products": folded}
