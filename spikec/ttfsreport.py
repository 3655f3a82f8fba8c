"""What a TTFS model does on data: spikes and clipping per site, neurons and operations per the paper's
Table 3, and the energy estimate of its Eq. 28."""
from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from spikec.errors import SpikecError
from spikec.evaluate import _with_outputs, compare, open_session, run_dataset
from spikec.graphinfo import metadata, product_macs, sample_shapes
from spikec.report import E_AC_PJ, E_MAC_PJ
from spikec.report import _load as load_file
from spikec.runtime.ttfs import EMIT


def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "(in memory)"
    return load_file(model, "model"), os.fspath(model)


def _ttfs_report(model: onnx.ModelProto, label: str) -> dict:
    from spikec.runtime.session import spikec_metadata

    meta = spikec_metadata(metadata(model), label)
    if meta.get("method") != "ttfs":
        raise SpikecError(f"model {label}: not a ttfs model (compile it with --method ttfs)")
    return meta["report"]["ttfs"]


def site_activity(snn: str | os.PathLike | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                  batch_size: int = 32) -> list[dict]:
    """Per site, over all samples: its shape and neurons per sample, spikes per sample (at most one per
    neuron), the fractions of potentials below the range (no spike: read as a) or above it (a spike at
    T_emit: read as b), and how many values were clipped either way."""
    model, label = _load(snn)
    report = _ttfs_report(model, label)
    sites = report["sites"]
    names = [n for s in sites for n in (s["potential"], s["spikes"])]
    values = run_dataset(open_session(_with_outputs(model, names)), feeds, batch_size=batch_size)
    count = len(next(iter(feeds.values())))
    rows = []
    for site in sites:
        potential, spikes = values[site["potential"]], values[site["spikes"]]
        inverse = EMIT[site["emit"]].inverse
        # beyond the range by more than the float rounding of a decode/encode round trip
        slack = 1e-5 * (site["upper"] - site["lower"])
        with np.errstate(divide="ignore", invalid="ignore"):
            low, high = inverse(np.float64(site["lower"] - slack)), inverse(np.float64(site["upper"] + slack))
        below, above = int((potential < low).sum()), int((potential > high).sum())
        rows.append({**site, "shape": list(spikes.shape[1:]), "neurons": spikes.size // count,
                     "spikes": float((spikes < report["delta"]).sum()) / count,
                     "clipped_low": below / potential.size, "clipped_high": above / potential.size,
                     "clipped_values": below + above})
    return rows


def spiking_depth(model: onnx.ModelProto) -> int:
    """Layers on the longest path from an input to an output: every emitting stage on it adds one window
    delta, so a sample's last output spike comes depth x delta after its input spikes (T_emit^(n) =
    T_emit^(0) + n delta). Paths that skip layers (residual connections) need delays of as many windows."""
    depth: dict[str, int] = {}
    for node in model.graph.node:  # topologically sorted
        level = max((depth.get(name, 0) for name in node.input), default=0)
        level += node.domain == "spikec" and node.op_type.startswith("TTFSEmit")
        for name in node.output:
            depth[name] = level
    return max((depth.get(o.name, 0) for o in model.graph.output), default=0)


def _rows_and_width(shape: list[int]) -> tuple[int, int]:
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def table3(constructions: list[dict], sites: Mapping[str, dict]) -> list[dict]:
    """Neurons and operations per sample of each construction, by Table 3's formulas: MatMul (M x K by
    K x N) MN(K+1) neurons and MN(3K+2) operations, Softmax over N 2(N+1) and 6N per row, LayerNorm over
    N 3N+3 and 9N+1 per row, an activation one neuron and one operation per element."""
    rows = []
    for c in constructions:
        if c["kind"] == "matmul":
            a, b = (sites[name]["shape"] for name in c["operands"])
            m, k, n = a[-2], a[-1], b[-1]
            instances = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])), dtype=np.int64))
            neurons, ops = instances * m * n * (k + 1), instances * m * n * (3 * k + 2)
        else:
            count, width = _rows_and_width(sites[c["output"]]["shape"])
            neurons, ops = {"softmax": (2 * (width + 1), 6 * width), "layernorm": (3 * width + 3, 9 * width + 1),
                            "activation": (width, width)}[c["kind"]]
            neurons, ops = count * neurons, count * ops
        rows.append({**c, "neurons": int(neurons), "operations": int(ops)})
    return rows


def summary(ann: str | os.PathLike | onnx.ModelProto, snn: str | os.PathLike | onnx.ModelProto,
            feeds: Mapping[str, np.ndarray], *, batch_size: int = 32) -> dict:
    """Sites with their activity, constructions with Table 3 counts, and the energy estimate: OP_SNN =
    the weight products' synaptic operations (one accumulate per weight and input spike; every neuron
    spikes at most once, so at most the ANN's MACs) + the constructions' operations; E_SNN / E_ANN =
    OP_SNN E_AC / (MAC_ANN E_MAC) (Eq. 28)."""
    ann_model, _ = _load(ann)
    snn_model, label = _load(snn)
    report = _ttfs_report(snn_model, label)
    activity = site_activity(snn_model, feeds, batch_size=batch_size)
    sites = {s["site"]: s for s in activity}
    constructions = table3(report["constructions"], sites)
    shapes = sample_shapes(ann_model, {k: v.shape for k, v in feeds.items()})
    # where inference lost dims (heads reshaped from computed shapes), one sample's tensors tell
    tensors = sorted({t for p in product_macs(ann_model, shapes) for t in (p["inputs"][0], p["output"])})
    one = run_dataset(open_session(_with_outputs(ann_model, tensors)), {k: v[:1] for k, v in feeds.items()})
    products = product_macs(ann_model, shapes.observe(one, 1))
    if any(p["macs"] is None for p in products):
        unknown = next(p["node"] for p in products if p["macs"] is None)
        raise SpikecError(f"model {label}: cannot size product node {unknown} (unknown shapes)")
    replaced = {c["name"] for c in constructions if c["kind"] == "matmul"}
    ann_macs = sum(p["macs"] for p in products)
    weight_ops = sum(p["macs"] for p in products if p["node"] not in replaced)
    snn_ops = weight_ops + sum(c["operations"] for c in constructions)
    neurons = sum(s["neurons"] for s in activity)
    spikes = sum(s["spikes"] for s in activity)
    return {
        "sites": activity, "constructions": constructions, "float_nodes": report["float_nodes"],
        "neurons": neurons, "spikes": spikes, "spikes_per_neuron": spikes / neurons if neurons else 0.0,
        "layers": len(activity), "depth": spiking_depth(snn_model),
        "clipped_sites": sum(1 for s in activity if s["clipped_low"] or s["clipped_high"]),
        "energy": {"ann_macs": int(ann_macs), "snn_operations": int(snn_ops), "weight_operations": int(weight_ops),
                   "ann_joules": ann_macs * E_MAC_PJ * 1e-12, "snn_joules": snn_ops * E_AC_PJ * 1e-12,
                   "snn_over_ann": snn_ops * E_AC_PJ / (ann_macs * E_MAC_PJ) if ann_macs else None},
        "precision": report["precision"], "margin": report["margin"],
    }


def build(ann: str | os.PathLike, snn: str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
          labels: np.ndarray | None = None, batch_size: int = 32) -> dict:
    """The report's data: fidelity of every output (and accuracy with labels) plus ``summary``."""
    fidelity = {name: {**{k: v for k, v in data["per_t"][0].items() if k != "t"},
                       **({"ann_accuracy": data["ann_accuracy"]} if "ann_accuracy" in data else {})}
                for name, data in compare(ann, snn, feeds, labels=labels, batch_size=batch_size).items()}
    return {"ann": os.fspath(ann), "snn": os.fspath(snn), "method": "ttfs",
            "samples": len(next(iter(feeds.values()))), "fidelity": fidelity,
            **summary(ann, snn, feeds, batch_size=batch_size)}


def render_html(data: dict) -> str:
    from spikec.report import _STYLE, _table

    e = data["energy"]
    sections = [f"<h1>spikec TTFS report: {html.escape(Path(data['snn']).name)}</h1>",
                f"<p>ANN <code>{html.escape(data['ann'])}</code>, SNN <code>{html.escape(data['snn'])}</code>, "
                f"{data['samples']} samples, time precision "
                f"{'float spike times' if not data['precision'] else data['precision']}, range margin {data['margin']}.</p>",
                "<h2>Fidelity</h2>",
                _table(["output", "cosine", "relative max error", "top-1 agreement", "accuracy", "ANN accuracy"],
                       [[name, f["cosine"], f["relative_max_error"], f.get("top1_agreement", "—"),
                         f.get("accuracy", "—"), f.get("ann_accuracy", "—")] for name, f in data["fidelity"].items()]),
                "<h2>Spikes and energy</h2>",
                _table(["layers (sites)", "depth (windows)", "neurons / sample", "spikes / sample", "spikes / neuron", "sites that clipped",
                        "ANN MACs", "SNN operations", "E_SNN / E_ANN"],
                       [[data["layers"], data["depth"], data["neurons"], data["spikes"], data["spikes_per_neuron"],
                         data["clipped_sites"], e["ann_macs"], e["snn_operations"], e["snn_over_ann"]]]),
                "<p class=note>Operations: the weight products' accumulates (one per weight and input spike, at "
                "most the ANN's MACs) plus each construction's count by the paper's Table 3; energy by its Eq. 28 "
                "(E_AC 0.9 pJ, E_MAC 4.6 pJ).</p>",
                "<h2>Constructions (Table 3)</h2>",
                _table(["construction", "kind", "neurons / sample", "operations / sample"],
                       [[c["name"], c["kind"], c["neurons"], c["operations"]] for c in data["constructions"]]),
                "<h2>Sites</h2>",
                _table(["site", "role", "emit", "receives", "range [a, b]", "range from", "neurons", "spikes",
                        "below a", "above b", "values clipped"],
                       [[s["site"], s["role"], s["emit"], " ".join(s["receives"]), f"[{s['lower']:.4g}, {s['upper']:.4g}]",
                         "construction" if s["analytic"] else "calibration", s["neurons"], s["spikes"],
                         s["clipped_low"], s["clipped_high"], s["clipped_values"]] for s in data["sites"]])]
    if data["float_nodes"]:
        sections += ["<h2>Ops run in float between a decode and an encode</h2>",
                     _table(["node", "op"], [[f["node"], f["op"]] for f in data["float_nodes"]])]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>spikec TTFS report</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(sections)}</body></html>")


REPORT_FILES = ("report.json", "index.html")


def write(data: dict, directory: str | os.PathLike, reads=(), force: bool = False) -> Path:
    """report.json and index.html into ``directory`` (created if missing), as spikec.report writes its own."""
    from spikec.report import check_directory, write_directory

    out = check_directory(directory, REPORT_FILES, reads, force)
    write_directory(out, {"report.json": json.dumps(data, indent=1), "index.html": render_html(data)}, reads)
    return out / "index.html"
