"""The one energy model of `spikec report`, the same terms and counting rules for every method.

E = MACs x E_MAC + ACs x E_AC per sample, E_MAC = 4.6 pJ and E_AC = 0.9 pJ (Horowitz 2014, as ECMT's
Eq. 30 and TTFSFormer's Eq. 28 use them). Every SNN term below is listed for every method (zero where
the method has none of that work), so two reports compare term by term. The ANN counts its products
and its nonlinear modules once per sample.

Two ratios: ``ratio`` charges all work the spikec model does; ``ratio_paper_convention`` is the papers'
(ECMT: "MACs_SNN estimated to be zero"; TTFSFormer Eq. 28): the spike-driven ACs only, activation x
activation products of two spike trains evaluated event-driven (ECMT Eq. 16), TTFS constructions by
their Table 3 operations, against the ANN's product MACs.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from typing import Any

import onnx

from spikec import graphinfo
from spikec.passes.regions import DATA_MOVEMENT
from spikec.runtime.layout import is_spike_value, is_tracer_value

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
# ECMT Table 1: E_SNN / E_ANN on ImageNet-1k (n = 8), by T.
ECMT_TABLE1 = {
    "ViT-S/16": {1: 0.06, 2: 0.15, 4: 0.37, 6: 0.59, 8: 0.82, 10: 1.03, 12: 1.25},
    "ViT-B/16": {1: 0.04, 2: 0.12, 4: 0.30, 6: 0.48, 8: 0.66, 10: 0.84, 12: 1.01},
    "ViT-L/16": {1: 0.04, 2: 0.12, 4: 0.27, 6: 0.43, 8: 0.58, 10: 0.74, 12: 0.89},
    "EVA": {1: 0.06, 2: 0.15, 4: 0.35, 6: 0.55, 8: 0.74, 10: 0.93, 12: 1.13},
}
# TTFSFormer Table 2 (TTFS coding, at most one spike per neuron): E_SNN / E_ANN.
TTFSFORMER_RATIOS = {"ViT-S/16": 0.223, "ViT-B/16": 0.210, "ViT-L/16": 0.207}

# term: (operation kind, counting rule). "Step": a time step of a stepped model; a TTFS model has one.
TERMS = {
    "spike_products": (
        "AC",
        "weight products fed by spikes: each spike costs one accumulate per output feature "
        "it reaches (the product's MACs / its input elements). A spike is one event: an MT "
        "neuron's spike at any level, an ST-BIF+ spike, each of an IF neuron's burst spikes, "
        "a UGO's hidden spikes (its w2 folded into the weights), a TTFS first spike. A TTFS "
        "weight product that reads a construction's output belongs to its layer II weighted sum, "
        "whose inputs fire at most once: 1 AC per MAC",
    ),
    "float_products": (
        "MAC",
        "products not fed by spikes, at every step: activation x activation products on "
        "running means/sums (expectation compensation, SESA, TCSA) and products of analog "
        "inputs (e.g. the patch embedding)",
    ),
    "nonlinear": (
        "MAC",
        "LayerNorm, GELU and Softmax modules still evaluated in floating point (F of "
        "compensation, or time-invariant), one operation per output element (ECMT Table 3) at "
        "every step",
    ),
    "ec_accumulate": (
        "AC+MAC",
        "ECAccumulate: running sum, 1 AC per element and step; a running mean (mean "
        "semantics) also divides by t, 1 MAC",
    ),
    "ec_compensate": (
        "MAC/AC",
        "ECCompensate: mean semantics t*y(t) - (t-1)*y(t-1), 2 MACs per element and step; "
        "sum semantics y(t) - y(t-1), 1 AC",
    ),
    "neuron_updates": (
        "AC",
        "membrane updates, 1 AC per neuron and step (an STA X2X encoder is 2 IF neurons per "
        "element, a UGO N per element). TTFS neurons integrate only their input spikes "
        "(counted above) and fire once: none",
    ),
    "ugo_inputs": ("MAC", "UGO hidden neurons' inputs w1_j x + b1_j: 1 MAC per hidden neuron and step"),
    "ugo_readout": ("AC", "UGO output w2 . spikes where it feeds no weight product: 1 AC per hidden spike"),
    "ttfs_constructions": (
        "AC",
        "TTFS constructions (softmax, LayerNorm, activations, activation x activation "
        "products): their operations by TTFSFormer Table 3",
    ),
}
# the AC terms the papers' convention keeps (with the event-driven activation x activation ACs)
PAPER_TERMS = ("spike_products", "ttfs_constructions")
ANN_RULES = {
    "products": "MatMul / Gemm / Conv multiply-accumulates",
    "nonlinear": "LayerNorm, GELU, Softmax: one operation per output element",
}
NOT_COUNTED = (
    "Not counted, in either model: elementwise work (bias and residual additions, constant scalings, "
    "the code x threshold scaling of spikes, elementwise products such as STA's TCSA squares, clamps) "
    "and data movement."
)


def spike_source(
    tensor: str, producer: Mapping[str, onnx.NodeProto], sources: Container[str], *, through_accumulation: bool
) -> str | None:
    """The spike tensor behind a product operand, through data movement, the spike's scaling by its
    threshold, TTFS decoding (still one event per spike) and an integer-exact neuron's tracer (its spikes
    summed: a product of it at every step is the running sum of the products of the spikes); with
    ``through_accumulation`` also through running sums/means (the operands of a compensated activation x
    activation product)."""
    tracer = False
    while tensor not in sources:
        node = producer.get(tensor)
        if node is None:
            return None
        op = graphinfo.base_op(node)
        accumulation = node.domain == graphinfo.SPIKEC_DOMAIN and op == "ECAccumulate"
        passes = (
            op in DATA_MOVEMENT
            or is_spike_value(node.name)
            or is_tracer_value(node.name)
            or (node.domain == graphinfo.SPIKEC_DOMAIN and op.startswith("TTFSReceive"))
            or (accumulation and (through_accumulation or (tracer and not _average(node))))
        )
        if not passes:
            return None
        tracer = tracer or is_tracer_value(node.name)
        tensor = node.input[0]
    return tensor


def _average(node: onnx.NodeProto) -> bool:
    return next((a.i for a in node.attribute if a.name == "average"), 1) == 1


def snn_work(
    model: onnx.ModelProto,
    shapes: graphinfo.Shapes,
    spikes: Mapping[str, float],
    steps: int,
    claimed: Mapping[str, str],
    ann_nonlinear: Sequence[dict],
) -> tuple[list[dict], dict[str, dict[str, float]], float]:
    """The SNN's products, the counts of the terms the graph decides (products, float nonlinear modules,
    compensation) and the event-driven ACs of its activation x activation products. ``spikes``: spikes
    per sample of every spike tensor; ``claimed``: product nodes a method counts itself, and in which term."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = graphinfo.constant_tensors(model)
    products, spike_acs, float_macs, event_acs = [], 0.0, 0, 0.0
    for product in graphinfo.product_macs(model, shapes):
        row = {"node": product["node"], "op": product["op"], "macs": product["macs"]}
        operands = product["inputs"]
        if product["node"] in claimed:
            row.update(counted_as=claimed[product["node"]], claimed=True)
        elif any(t in constants for t in operands):
            activation = next((t for t in operands if t not in constants), None)
            source = activation and spike_source(activation, producer, spikes, through_accumulation=False)
            if activation is not None and source is not None:
                elements = shapes.elements(activation)
                fan_out = None if product["macs"] is None or not elements else product["macs"] / elements
                row.update(
                    counted_as="spike_products",
                    source=source,
                    fan_out=fan_out,
                    acs=None if fan_out is None else spikes[source] * fan_out,
                )
                spike_acs += row["acs"] or 0.0
        if "counted_as" not in row:
            row["counted_as"] = "float_products"
            float_macs += steps * (product["macs"] or 0)
            a, b = (spike_source(t, producer, spikes, through_accumulation=True) for t in operands[:2])
            out = shapes.shapes.get(product["output"])
            if (
                a
                and b
                and product["op"] in ("MatMul", "MatMulInteger")
                and out
                and all(isinstance(d, int) for d in out[-2:])
            ):
                # ECMT Eq. 16 evaluated event-driven: a spike of A[m, k] adds S_B[k, :] (N ACs), one of B[k, n]
                # adds S_A[:, k] (M ACs); the product of the two spike trains is neglected.
                row["event_driven_acs"] = spikes[a] * out[-1] + spikes[b] * out[-2]
                event_acs += row["event_driven_acs"]
        products.append(row)
    accumulate: dict[str, float] = {"AC": 0, "MAC": 0}
    compensate: dict[str, float] = {"AC": 0, "MAC": 0}
    for node in model.graph.node:
        op = graphinfo.base_op(node) if node.domain == graphinfo.SPIKEC_DOMAIN else None
        if op not in ("ECAccumulate", "ECCompensate"):
            continue
        elements = steps * (shapes.elements(node.input[0]) or 0)
        if op == "ECAccumulate":
            accumulate["AC"] += elements
            accumulate["MAC"] += elements if _average(node) else 0
        elif _average(node):
            compensate["MAC"] += 2 * elements
        else:
            compensate["AC"] += elements
    kept = {n.name for n in model.graph.node}
    nonlinear = sum(r["elements"] or 0 for r in ann_nonlinear if r["region"] in kept)
    counts: dict[str, dict[str, float]] = {
        "spike_products": {"AC": spike_acs},
        "float_products": {"MAC": float_macs},
        "nonlinear": {"MAC": steps * nonlinear},
        "ec_accumulate": accumulate,
        "ec_compensate": compensate,
    }
    return products, counts, event_acs


def merge(counts: dict[str, dict[str, float]], more: Mapping[str, Mapping[str, float]]) -> None:
    """Add ``more`` into ``counts``, term by term and operation by operation."""
    for term, ops in more.items():
        for op, value in ops.items():
            counts.setdefault(term, {})[op] = counts.get(term, {}).get(op, 0) + value


def energy(
    ann_products: Sequence[dict],
    ann_nonlinear: Sequence[dict],
    snn_products: Sequence[dict],
    counts: Mapping[str, Mapping[str, float]],
    event_driven_acs: float,
    steps: int,
) -> dict:
    """E_SNN / E_ANN per sample from the ANN's products and nonlinear modules and the SNN's term counts
    (every term of TERMS; a term missing from ``counts`` is zero)."""
    ann_macs = sum(p["macs"] or 0 for p in ann_products)
    ann_nonlinear_ops = sum(r["elements"] or 0 for r in ann_nonlinear)
    terms: list[dict[str, Any]] = []
    for term, (ops, rule) in TERMS.items():
        acs, macs = float(counts.get(term, {}).get("AC", 0)), float(counts.get(term, {}).get("MAC", 0))
        terms.append(
            {
                "term": term,
                "ops": ops,
                "rule": rule,
                "acs": acs,
                "macs": macs,
                "energy_pj": acs * E_AC_PJ + macs * E_MAC_PJ,
            }
        )
    ann_terms: list[dict[str, Any]] = [
        {
            "term": term,
            "ops": "MAC",
            "rule": ANN_RULES[term],
            "acs": 0.0,
            "macs": float(macs),
            "energy_pj": macs * E_MAC_PJ,
        }
        for term, macs in (("products", ann_macs), ("nonlinear", ann_nonlinear_ops))
    ]
    ann_pj = sum(t["energy_pj"] for t in ann_terms)
    snn_pj = sum(t["energy_pj"] for t in terms)
    paper_pj = (sum(t["acs"] for t in terms if t["term"] in PAPER_TERMS) + event_driven_acs) * E_AC_PJ
    return {
        "e_mac_pj": E_MAC_PJ,
        "e_ac_pj": E_AC_PJ,
        "steps": steps,
        "ann": {
            "product_macs": int(ann_macs),
            "nonlinear_ops": int(ann_nonlinear_ops),
            "terms": ann_terms,
            "energy_pj": ann_pj,
            "products": list(ann_products),
            "nonlinear": list(ann_nonlinear),
        },
        "snn": {
            "terms": terms,
            "energy_pj": snn_pj,
            "products": list(snn_products),
            "act_act_event_driven_acs": float(event_driven_acs),
        },
        "ratio": snn_pj / ann_pj if ann_pj else None,
        "ratio_paper_convention": paper_pj / (ann_macs * E_MAC_PJ) if ann_macs else None,
        "uncounted": [p["node"] for p in [*ann_products, *snn_products] if p["macs"] is None]
        + [r["region"] for r in ann_nonlinear if r["elements"] is None],
    }
