"""`spikec report`: how well, and at what estimated energy, a time-unrolled SNN reproduces its ANN.

One pass over the data runs both models side by side (`spikec.probe`) and measures
* output fidelity for every T (`spikec.evaluate.fidelity`);
* per-layer error at the final T for every ANN tensor the SNN keeps by name;
* firing rates of every MT neuron site, and spikes per threshold level (ECMT's Fig. 6);
* the energy estimate of ECMT Eq. 30 (E_MAC = 4.6 pJ, E_AC = 0.9 pJ), counted as `energy` documents.

`write_report` saves PNG plots, ``report.json`` with every number plotted, and ``index.html`` with the
plots embedded as data URIs (it opens offline and can be moved on its own).
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spikec import graphinfo, modelio
from spikec.errors import SpikecError
from spikec.evaluate import check_labels, cosine, fidelity
from spikec.probe import final_estimate, paired_batches
from spikec.runtime.layout import STEPS_SUFFIX

E_MAC_PJ = 4.6  # Horowitz 2014, as used by ECMT (Eq. 30) and TTFSFormer
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
PLOTS = ("fidelity", "layers", "firing", "levels", "energy")
REPORT_FILES = (*(f"{name}.png" for name in PLOTS), "report.json", "index.html")


# ------------------------------------------------------------------ accumulation over batches

@dataclass
class _LayerError:
    max_error: float = 0.0
    max_reference: float = 0.0
    cosine_sum: float = 0.0
    rows: int = 0

    def add(self, reference: np.ndarray, estimate: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        self.max_error = max(self.max_error, float(np.max(np.abs(estimate - reference), initial=0.0)))
        self.max_reference = max(self.max_reference, float(np.max(np.abs(reference), initial=0.0)))
        self.cosine_sum += cosine(reference, estimate) * len(reference)
        self.rows += len(reference)


@dataclass
class _Firing:
    """Spike counts of one MT neuron site; levels k of |code| = 2^k, split by sign."""
    levels: int
    ratio: np.ndarray  # theta_neg / theta_pos: negative codes are -ratio * 2^k
    spikes: int = 0
    values: int = 0  # neuron-steps seen
    positive: np.ndarray = field(default=None)
    negative: np.ndarray = field(default=None)

    def __post_init__(self):
        self.positive = np.zeros(self.levels, np.int64)
        self.negative = np.zeros(self.levels, np.int64)

    def add(self, codes: np.ndarray) -> None:
        self.values += codes.size
        self.spikes += int(np.count_nonzero(codes))
        ratio = np.broadcast_to(self.ratio, codes.shape)
        for sign, counts in ((1, self.positive), (-1, self.negative)):
            mask = codes * sign > 0
            units = np.abs(codes[mask]) / (1.0 if sign > 0 else ratio[mask])
            k = np.clip(np.rint(np.log2(units)).astype(np.int64), 0, self.levels - 1)
            counts += np.bincount(k, minlength=self.levels)


# ------------------------------------------------------------------ energy model

ENERGY_RULES = {
    "spike_products": ("AC", "activation x weight products fed by spike codes: each spike costs one accumulate "
                             "per output feature it reaches (MACs of the product / its input elements)"),
    "float_products": ("MAC", "products left in floating point, at every step: activation x activation "
                              "MatMuls evaluated on running means (expectation compensation), and products "
                              "of analog inputs (e.g. the patch embedding)"),
    "nonlinear": ("MAC", "LayerNorm, GELU and Softmax (F of expectation compensation, or time-invariant), one "
                         "operation per output element (ECMT Table 3) at every step"),
    "ec_accumulate": ("AC+MAC", "ECAccumulate: running sum (1 AC) and division by t (1 MAC) per element and step"),
    "ec_compensate": ("MAC", "ECCompensate: t*y(t) - (t-1)*y(t-1), 2 MACs per element and step"),
    "neuron_updates": ("AC", "MT neuron membrane update, 1 AC per neuron and step"),
}


def energy(ann_products: Sequence[dict], ann_nonlinear: Sequence[dict], snn_products: Sequence[dict],
           ec_elements: Mapping[str, int], neuron_steps: float, act_act_event_acs: float, timesteps: int) -> dict:
    """E_SNN / E_ANN (ECMT Eq. 30) per sample.

    ``snn_products``: per SNN product node, ``category`` and either ``acs`` (spike-driven) or ``macs``
    (per step). ``ec_elements``: elements per step through ECAccumulate / ECCompensate.
    ``act_act_event_acs``: what the activation x activation products cost evaluated event-driven as in
    ECMT Eq. 16 (spikes times accumulated sums), for the paper's convention."""
    ann_macs = sum(p["macs"] or 0 for p in ann_products)
    ann_nonlinear_ops = sum(r["elements"] or 0 for r in ann_nonlinear)
    counts = {
        "spike_products": {"AC": sum(p["acs"] or 0 for p in snn_products if p["category"] == "spike_product")},
        "float_products": {"MAC": timesteps * sum(p["macs"] or 0 for p in snn_products
                                                  if p["category"] != "spike_product")},
        "nonlinear": {"MAC": timesteps * ann_nonlinear_ops},
        "ec_accumulate": {"AC": timesteps * ec_elements.get("ECAccumulate", 0),
                          "MAC": timesteps * ec_elements.get("ECAccumulate", 0)},
        "ec_compensate": {"MAC": 2 * timesteps * ec_elements.get("ECCompensate", 0)},
        "neuron_updates": {"AC": neuron_steps},
    }
    terms = []
    for term, ops in counts.items():
        acs, macs = float(ops.get("AC", 0)), float(ops.get("MAC", 0))
        terms.append({"term": term, "ops": ENERGY_RULES[term][0], "rule": ENERGY_RULES[term][1],
                      "acs": acs, "macs": macs, "energy_pj": acs * E_AC_PJ + macs * E_MAC_PJ})
    ann_terms = [
        {"term": "products", "ops": "MAC", "rule": "MatMul / Gemm / Conv multiply-accumulates",
         "macs": float(ann_macs), "energy_pj": ann_macs * E_MAC_PJ},
        {"term": "nonlinear", "ops": "MAC", "rule": "LayerNorm, GELU, Softmax: one operation per output element",
         "macs": float(ann_nonlinear_ops), "energy_pj": ann_nonlinear_ops * E_MAC_PJ},
    ]
    ann_pj = sum(t["energy_pj"] for t in ann_terms)
    snn_pj = sum(t["energy_pj"] for t in terms)
    paper_pj = (counts["spike_products"]["AC"] + act_act_event_acs) * E_AC_PJ
    return {
        "e_mac_pj": E_MAC_PJ, "e_ac_pj": E_AC_PJ, "timesteps": timesteps,
        "ann": {"product_macs": int(ann_macs), "nonlinear_ops": int(ann_nonlinear_ops), "terms": ann_terms,
                "energy_pj": ann_pj, "products": list(ann_products), "nonlinear": list(ann_nonlinear)},
        "snn": {"terms": terms, "energy_pj": snn_pj, "products": list(snn_products),
                "act_act_event_driven_acs": float(act_act_event_acs)},
        "ratio": snn_pj / ann_pj if ann_pj else None,
        "ratio_paper_convention": paper_pj / (ann_macs * E_MAC_PJ) if ann_macs else None,
        "uncounted": [p["node"] for p in [*ann_products, *snn_products] if p["macs"] is None]
                     + [r["region"] for r in ann_nonlinear if r["elements"] is None],
    }


# ------------------------------------------------------------------ building the report

def _load(path: str | os.PathLike, what: str) -> onnx.ModelProto:
    from spikec.passes.loader import check_input_file, load_model

    return load_model(check_input_file(path, f"{what} {path}"))


def _node_outputs(model: onnx.ModelProto) -> list[str]:
    return [o for n in model.graph.node for o in n.output if o]


def build_report(ann: str | os.PathLike, snn: str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
                 labels: np.ndarray | None = None, batch_size: int = 32, progress: bool = False) -> dict:
    """Every number the report shows, as a JSON-serializable dict (see the module docstring)."""
    from spikec.calibrate import load_inputs
    from spikec.passes.canonicalize import canonicalize

    from spikec.runtime.session import spikec_metadata

    ann_model, snn_model = _load(ann, "ANN"), _load(snn, "SNN")
    meta = spikec_metadata(graphinfo.metadata(snn_model), os.fspath(snn))
    if meta.get("mode") != "unrolled":
        raise SpikecError(f"SNN {snn}: report needs a time-unrolled spikec model (got mode "
                          f"{meta.get('mode') or 'none: not a spikec model'}); compile with --mode unrolled")
    if meta["method"] != "ecmt":
        # The report reads MT neuron levels and running means; SpikeZIP-TF has neither.
        raise SpikecError(f"SNN {snn}: the HTML report covers ECMT models (got method {meta['method']}); "
                          f"for SpikeZIP-TF use `spikec eval QANN SNN` (fidelity vs T) and `spikec run` (T_eq)")
    timesteps = meta["timesteps"]
    feeds = load_inputs(feeds, ann_model, what="inputs")
    samples = len(next(iter(feeds.values())))
    if labels is not None:
        labels = check_labels(labels, samples)
    sample = {name: value.shape for name, value in feeds.items()}
    snn_shapes = graphinfo.sample_shapes(snn_model, sample)
    ann_canonical = canonicalize(ann_model)
    ann_shapes = graphinfo.sample_shapes(ann_canonical, sample)
    nonlinear = graphinfo.nonlinear_regions(ann_canonical)
    nodes = graphinfo.classify_nodes(snn_model)
    means = graphinfo.mean_domain(nodes)
    producer = {o: n for n in nodes for o in n.outputs}

    # every ANN activation the rewrite kept by name, in the ANN's order
    snn_tensors = set(_node_outputs(snn_model))
    layers = [t for t in dict.fromkeys(_node_outputs(ann_model)) if t in snn_tensors and snn_shapes.is_float(t)]
    final_outputs = {o.name for o in snn_model.graph.output}
    outputs = [o.name for o in ann_model.graph.output if o.name + STEPS_SUFFIX in final_outputs]
    if not outputs:
        raise SpikecError(f"{snn}: no output of the SNN matches an ANN output by name")
    neuron_sites = meta["report"].get("neurons", [])
    spike_of = {n.name: n.outputs[0] for n in nodes if n.domain == graphinfo.SPIKEC_DOMAIN and n.op == "MTNeuron"}
    spikes = {site["tensor"]: spike_of[site["node"]] for site in neuron_sites}

    errors = {t: _LayerError() for t in layers}
    skipped: dict[str, str] = {}
    firing = {site["tensor"]: _Firing(site["levels"], np.asarray(site["theta_neg"], np.float64)
                                      / np.asarray(site["theta_pos"], np.float64)) for site in neuron_sites}
    ann_out: dict[str, list] = {o: [] for o in outputs}
    snn_steps: dict[str, list] = {o: [] for o in outputs}
    # shapes actually computed complete shape inference for the operation counts
    ann_counted = [t for t in graphinfo.counted_tensors(ann_canonical, nonlinear) if t in set(_node_outputs(ann_model))]
    snn_counted = [t for t in graphinfo.counted_tensors(snn_model) if t in snn_tensors]
    ann_names = list(dict.fromkeys([*layers, *outputs, *ann_counted]))
    snn_names = list(dict.fromkeys([*layers, *spikes.values(), *(o + STEPS_SUFFIX for o in outputs), *snn_counted]))
    for batch, (ann_values, snn_values) in enumerate(paired_batches(
            ann, snn, feeds, ann_names, snn_names, batch_size=batch_size, progress=progress)):
        if batch == 0:
            rows = len(ann_values[outputs[0]])
            ann_shapes = ann_shapes.observe({t: ann_values[t] for t in ann_counted}, rows)
            snn_shapes = snn_shapes.observe({t: snn_values[t] for t in snn_counted}, rows)
        for name in outputs:
            ann_out[name].append(ann_values[name])
            snn_steps[name].append(snn_values[name + STEPS_SUFFIX])
        for name in (n for n in layers if n not in skipped):
            reference = ann_values[name]
            estimate = final_estimate(snn_values[name], reference.shape, timesteps,
                                      running_mean=name not in means and name not in final_outputs)
            if estimate is None:
                skipped[name] = (f"SNN shape {list(snn_values[name].shape)} does not hold {timesteps} steps of "
                                 f"the ANN's {list(reference.shape)}")
            else:
                errors[name].add(reference, estimate)
        for tensor, spike_tensor in spikes.items():
            firing[tensor].add(snn_values[spike_tensor])

    fidelity_rows = {}
    for name in outputs:
        reference = np.concatenate(ann_out[name])
        fidelity_rows[name] = {"per_t": fidelity(reference, np.concatenate(snn_steps[name], axis=1), labels)}
        if labels is not None and reference.ndim == 2 and reference.shape[1] > 1:
            fidelity_rows[name]["ann_accuracy"] = float(np.mean(reference.argmax(1) == labels))

    ann_op = {o: n.op_type for n in ann_model.graph.node for o in n.output}
    layer_rows = []
    for name in (n for n in layers if n not in skipped):
        e = errors[name]
        layer_rows.append({"tensor": name, "op": ann_op[name], "snn_producer": producer[name].op,
                           "category": producer[name].category,
                           "estimate": "graph output (after T steps)" if name in final_outputs
                           else "last step (F of running means)" if name in means else "running mean",
                           "neuron_input": name in spikes, "max_abs_error": e.max_error,
                           "relative_max_error": e.max_error / e.max_reference if e.max_reference else e.max_error,
                           "cosine": e.cosine_sum / e.rows})
    firing_rows = [{"tensor": tensor, "spikes_tensor": spikes[tensor], "neurons": f.values // (timesteps * samples),
                    "spikes_per_sample": f.spikes / samples,
                    "spikes_per_neuron_per_step": f.spikes / f.values if f.values else 0.0,
                    "levels": f.levels, "positive": f.positive.tolist(), "negative": f.negative.tolist()}
                   for tensor, f in firing.items()]

    energy_numbers = energy(graphinfo.product_macs(ann_canonical, ann_shapes),
                            graphinfo.nonlinear_elements(nonlinear, ann_shapes),
                            *_snn_work(snn_model, snn_shapes, nodes, producer, firing_rows, timesteps), timesteps)
    return {
        "ann": str(ann), "snn": str(snn), "samples": samples, "timesteps": timesteps,
        "method": meta["method"], "options": meta["options"],
        "fidelity": fidelity_rows,
        "layers": layer_rows,
        "layers_skipped": [{"tensor": t, "reason": r} for t, r in skipped.items()],
        "firing": firing_rows,
        "firing_levels": _level_summary(list(firing.values())),
        "energy": energy_numbers,
        "model": graphinfo.summarize(snn_model, sample),
    }


def _level_summary(firing: Sequence[_Firing]) -> dict:
    """Spikes per threshold level over all neuron sites (ECMT Fig. 6)."""
    levels = max((f.levels for f in firing), default=0)
    positive = sum((np.pad(f.positive, (0, levels - f.levels)) for f in firing), np.zeros(levels, np.int64))
    negative = sum((np.pad(f.negative, (0, levels - f.levels)) for f in firing), np.zeros(levels, np.int64))
    total = max(int(positive.sum() + negative.sum()), 1)
    return {"levels": levels, "positive": positive.tolist(), "negative": negative.tolist(),
            "positive_fraction": (positive / total).tolist(), "negative_fraction": (negative / total).tolist()}


def _snn_work(snn_model, snn_shapes, nodes, producer, firing_rows, timesteps):
    """The SNN's products (spike ACs measured, float MACs per step), EC elements and neuron updates, for
    `energy`."""
    spikes_per_sample = {row["spikes_tensor"]: row["spikes_per_sample"] for row in firing_rows}

    def spike_source(tensor: str) -> str | None:
        """The spike codes behind a product operand: codes, code x theta, or their running mean."""
        while tensor not in spikes_per_sample:
            node = producer.get(tensor)
            if node is None or not (node.op == "ECAccumulate" or node.name.endswith("/SpikeValue")):
                return None
            tensor = node.inputs[0]
        return tensor

    category = {n.name: n.category for n in nodes}
    products = []
    act_act_acs = 0.0
    for product in graphinfo.product_macs(snn_model, snn_shapes):
        row = {"node": product["node"], "op": product["op"], "category": category[product["node"]],
               "macs": product["macs"]}
        sources = [spike_source(t) for t in product["inputs"]]
        if row["category"] == "spike_product":
            source = next(s for s in sources if s)
            inputs = snn_shapes.elements(source)
            fan_out = None if product["macs"] is None or not inputs else product["macs"] / inputs
            row.update(acs=None if fan_out is None else spikes_per_sample[source] * fan_out, fan_out=fan_out)
        elif all(sources) and product["op"] == "MatMul" and snn_shapes.elements(product["output"]) is not None:
            # ECMT Eq. 16 evaluated event-driven: a spike of A[m, k] adds S_B[k, :] (N ACs), one of B[k, n]
            # adds S_A[:, k] (M ACs); the product of the two spike trains is neglected.
            out = snn_shapes.shapes[product["output"]]
            row["event_driven_acs"] = spikes_per_sample[sources[0]] * out[-1] + spikes_per_sample[sources[1]] * out[-2]
            act_act_acs += row["event_driven_acs"]
        products.append(row)
    ec_elements: dict[str, int] = {}
    for n in nodes:
        if n.domain == graphinfo.SPIKEC_DOMAIN and n.op in ("ECAccumulate", "ECCompensate"):
            ec_elements[n.op] = ec_elements.get(n.op, 0) + (snn_shapes.elements(n.inputs[0]) or 0)
    neuron_steps = timesteps * sum(row["neurons"] for row in firing_rows)
    return products, ec_elements, neuron_steps, act_act_acs


# ------------------------------------------------------------------ plots

def _figure(rows: int = 1, cols: int = 1, size=(10, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_fidelity(data: dict) -> bytes:
    from matplotlib.ticker import MaxNLocator

    panels = [("cosine", "cosine similarity"), ("relative_max_error", "relative max error"),
              ("top1_agreement", "top-1 agreement with ANN"), ("accuracy", "accuracy")]
    fig, axes = _figure(2, 2, (10, 6.5))
    for ax, (key, title) in zip(axes.ravel(), panels):
        for name, output in data["fidelity"].items():
            rows = [r for r in output["per_t"] if key in r]
            if rows:
                ax.plot([r["t"] for r in rows], [r[key] for r in rows], "o-", label=f"SNN {name}")
            if key == "accuracy" and "ann_accuracy" in output:
                ax.axhline(output["ann_accuracy"], color="gray", ls="--", label=f"ANN {name}")
        if key == "relative_max_error":
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel="time steps T")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not applicable (no labels / not a classifier output)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9, color="gray")
    return _png(fig)


def plot_layers(data: dict) -> bytes:
    rows = data["layers"]
    fig, axes = _figure(2, 1, (12, 7))
    x = np.arange(len(rows))
    for ax, key, title in ((axes[0, 0], "relative_max_error", "relative max error"),
                           (axes[1, 0], "cosine", "cosine similarity")):
        values = np.array([r[key] for r in rows])
        ax.plot(x, values, color="lightgray", lw=1)
        for estimate, marker in (("running mean", "o"), ("last step (F of running means)", "s")):
            mask = np.array([r["estimate"] == estimate for r in rows], bool)
            ax.scatter(x[mask], values[mask], s=14, marker=marker, label=f"SNN estimate = {estimate}")
        neurons = np.array([r["neuron_input"] for r in rows], bool)
        ax.scatter(x[neurons], values[neurons], s=60, facecolors="none", edgecolors="red",
                   label="MT neuron input")
        if key == "relative_max_error":
            ax.set_yscale("log")
        ax.set(title=f"per-layer {title} vs ANN at T={data['timesteps']}", ylabel=title)
        ax.legend(fontsize=8)
    axes[1, 0].set_xlabel("ANN tensor (graph order; names in the table below)")
    return _png(fig)


def plot_firing(data: dict) -> bytes:
    rows = data["firing"]
    fig, axes = _figure(1, 1, (12, 4.5))
    ax = axes[0, 0]
    x = np.arange(len(rows))
    rate = np.array([r["spikes_per_neuron_per_step"] for r in rows])
    positive = np.array([sum(r["positive"]) / max(sum(r["positive"]) + sum(r["negative"]), 1) for r in rows])
    ax.bar(x, rate * positive, color="tab:blue", label="positive spikes (θ1·2^k)")
    ax.bar(x, rate * (1 - positive), bottom=rate * positive, color="tab:orange", label="negative spikes (−θ2·2^k)")
    ax.legend(fontsize=8)
    ax.set_xticks(np.arange(len(rows)), [_short(r["tensor"]) for r in rows], rotation=75, fontsize=7)
    ax.set(title=f"firing rate per MT neuron site (T={data['timesteps']})", ylabel="spikes / neuron / step")
    return _png(fig)


def plot_levels(data: dict) -> bytes:
    lv = data["firing_levels"]
    n = lv["levels"]
    fig, axes = _figure(1, 1, (10, 4))
    ax = axes[0, 0]
    labels = [f"-θ2·2^{k}" for k in reversed(range(n))] + [f"θ1·2^{k}" for k in range(n)]
    values = list(reversed(lv["negative_fraction"])) + list(lv["positive_fraction"])
    colors = ["tab:orange"] * n + ["tab:blue"] * n
    ax.bar(np.arange(2 * n), values, color=colors)
    ax.set_xticks(np.arange(2 * n), labels, rotation=60, fontsize=8)
    ax.set(title="spikes per threshold level, all MT neurons (cf. ECMT Fig. 6)", ylabel="fraction of spikes")
    return _png(fig)


def plot_energy(data: dict) -> bytes:
    e = data["energy"]
    fig, axes = _figure(1, 1, (10, 4.5))
    ax = axes[0, 0]
    bottom = 0.0
    for term in e["ann"]["terms"]:
        ax.bar(0, term["energy_pj"] / 1e6, bottom=bottom, label=f"ANN {term['term']}")
        bottom += term["energy_pj"] / 1e6
    bottom = 0.0
    for term in e["snn"]["terms"]:
        ax.bar(1, term["energy_pj"] / 1e6, bottom=bottom, label=f"SNN {term['term']}")
        bottom += term["energy_pj"] / 1e6
    ax.set_xticks([0, 1], ["ANN", f"SNN (T={e['timesteps']})"])
    ax.set(ylabel="energy per sample (µJ)", title=f"estimated energy: SNN/ANN = {e['ratio']:.3f} "
                                                    f"(paper convention {e['ratio_paper_convention']:.3f})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


# ------------------------------------------------------------------ writing

def check_directory(directory: str | os.PathLike, files: Sequence[str] = REPORT_FILES,
                    reads: Sequence[modelio.Read] = (), force: bool = False) -> Path:
    """The report directory, checked before any work: an existing directory or a new one in an existing
    directory. A report already there (any of ``files``) is replaced only with ``force``; each file is
    checked as every spikec output is (spikec.modelio: never an input, never a special file)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise SpikecError(f"output {out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise SpikecError(f"output {out}: directory {out.parent} does not exist")
    if out.is_dir():
        existing = [name for name in files if os.path.lexists(out / name)]
        if existing and not force:
            raise SpikecError(f"output {out}: already holds a report ({', '.join(existing)}); pass --force to "
                              f"replace it, or choose another directory")
        modelio.check_outputs([("report file", out / name) for name in files], reads)
    return out


def write_directory(directory: Path, files: Mapping[str, bytes | str], reads: Sequence[modelio.Read] = ()) -> None:
    """All of a report's files or none: a directory created here goes again when writing fails."""
    created = not directory.exists()
    try:
        if created:
            directory.mkdir()
        modelio.write([("report file", directory / name, content) for name, content in files.items()], reads)
    except OSError as exc:
        raise SpikecError(f"output {directory}: cannot create it ({exc.strerror or exc})") from None
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # empty: spikec.modelio leaves nothing behind
        raise


def write_report(data: dict, directory: str | os.PathLike, reads: Sequence[modelio.Read] = (),
                 force: bool = False) -> Path:
    """Write the PNG plots, report.json and index.html into ``directory`` (created if missing)."""
    out = check_directory(directory, REPORT_FILES, reads, force)
    plotters = {"fidelity": plot_fidelity, "layers": plot_layers, "firing": plot_firing, "levels": plot_levels,
                "energy": plot_energy}
    plots = {name: plotters[name](data) for name in PLOTS}
    write_directory(out, {**{f"{name}.png": png for name, png in plots.items()},
                          "report.json": json.dumps(data, indent=1), "index.html": render_html(data, plots)}, reads)
    return out / "index.html"


def _img(plots: Mapping[str, bytes], name: str, alt: str) -> str:
    encoded = base64.b64encode(plots[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" data-file="{name}.png">'


def _table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} img{max-width:100%} code{background:#f4f4f4}
.note{color:#555;font-size:14px}
"""
# Any image that fails to decode is reported on the console (headless browsers log it).
_CHECK_IMAGES = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (im) { return !im.naturalWidth; });
  broken.forEach(function (im) { console.error("spikec report: image failed to load: " + im.dataset.file); });
  document.body.setAttribute("data-images-ok", broken.length ? "no" : "yes");
});
"""


def render_html(data: dict, plots: Mapping[str, bytes]) -> str:
    e = data["energy"]
    t = data["timesteps"]
    sections = [f"<h1>spikec report: {html.escape(Path(data['snn']).name)}</h1>",
                f"<p>ANN <code>{html.escape(data['ann'])}</code>, SNN <code>{html.escape(data['snn'])}</code> "
                f"(method {html.escape(str(data['method']))}, T={t}, options "
                f"<code>{html.escape(json.dumps(data['options']))}</code>), {data['samples']} samples.</p>"]

    summary = []
    for name, output in data["fidelity"].items():
        last = output["per_t"][-1]
        summary.append([name, last["cosine"], last["relative_max_error"], last.get("top1_agreement", "—"),
                        last.get("accuracy", "—"), output.get("ann_accuracy", "—")])
    sections += ["<h2>Summary at the final T</h2>",
                 _table(["output", "cosine", "relative max error", "top-1 agreement", "SNN accuracy",
                         "ANN accuracy"], summary),
                 f"<p>Estimated energy per sample: ANN {e['ann']['energy_pj'] / 1e6:.3f} µJ, SNN "
                 f"{e['snn']['energy_pj'] / 1e6:.3f} µJ: <b>E_SNN/E_ANN = {e['ratio']:.3f}</b> counting all "
                 f"work spikec's SNN does; <b>{e['ratio_paper_convention']:.3f}</b> in the papers' convention "
                 f"(details below).</p>"]

    rows = [[name, r["t"], r["cosine"], r["relative_max_error"], r["max_abs_error"], r.get("top1_agreement", "—"),
             r.get("accuracy", "—")] for name, output in data["fidelity"].items() for r in output["per_t"]]
    sections += ["<h2>Output fidelity vs T</h2>", _img(plots, "fidelity", "output fidelity vs T"),
                 _table(["output", "T", "cosine", "relative max error", "max abs error", "top-1 agreement",
                         "accuracy"], rows)]

    sections += [f"<h2>Per-layer error against the ANN at T={t}</h2>",
                 "<p class=note>Every ANN tensor that the SNN keeps by name. The SNN's estimate is the running "
                 "mean over T of its per-step values; tensors inside expectation compensation already hold F of "
                 "the running means, so their last step is the estimate. Relative max error = max |SNN − ANN| / "
                 "max |ANN| over all samples; cosine = mean over samples.</p>",
                 _img(plots, "layers", "per-layer error"),
                 "<details><summary>all layers</summary>" + _table(
                     ["#", "tensor", "ANN op", "SNN producer (category)", "estimate", "relative max error",
                      "cosine"],
                     [[i, r["tensor"], r["op"], f"{r['snn_producer']} ({r['category']})", r["estimate"],
                       r["relative_max_error"], r["cosine"]]
                      for i, r in enumerate(data["layers"])]) + "</details>"]
    if data["layers_skipped"]:
        sections.append(_table(["skipped tensor", "reason"], [[s["tensor"], s["reason"]]
                                                               for s in data["layers_skipped"]]))

    lv = data["firing_levels"]
    total = sum(lv["positive"]) + sum(lv["negative"])
    base = (lv["positive"][0] + lv["negative"][0]) / total if total else 0.0
    sections += ["<h2>Firing rates</h2>",
                 "<p class=note>Spikes per neuron per step: nonzero spike codes of each MT neuron site "
                 "(<code>X.spikes</code>) over all steps and samples, divided by neurons × T × samples.</p>",
                 _img(plots, "firing", "firing rates"),
                 f"<p>Spikes per threshold level (|code| = 2^k; negative codes are −θ2/θ1·2^k): {base:.1%} of "
                 f"all spikes use the base thresholds θ1 / −θ2 (ECMT Fig. 6 reports the same clustering).</p>",
                 _img(plots, "levels", "spikes per threshold level"),
                 _table(["neuron input", "neurons", "spikes / neuron / step", "spikes / sample",
                         "+ levels k=0..", "− levels k=0.."],
                        [[r["tensor"], r["neurons"], r["spikes_per_neuron_per_step"], r["spikes_per_sample"],
                          " ".join(map(str, r["positive"])), " ".join(map(str, r["negative"]))]
                         for r in data["firing"]])]

    sections += ["<h2>Estimated energy</h2>", _img(plots, "energy", "energy"), _energy_text(e)]

    model = data["model"]
    sections += ["<h2>Conversion</h2>",
                 f"<p>{model['neuron_counts']['neuron_nodes']} neuron nodes, "
                 f"{model['neuron_counts']['neurons_total']} neurons per sample.</p>",
                 "<details><summary>rewritten regions</summary>" + _table(
                     ["region", "kind", "original ops", "spikec ops"],
                     [[r["region"], r["kind"], " ".join(r["original_ops"]), "; ".join(r["spikec_ops"])]
                      for r in model["rewrites"]]) + "</details>",
                 "<p>Ops outside the spikec op set, and why:</p>" + _table(
                     ["category", "nodes", "ops", "why"],
                     [[r["category"], r["nodes"], ", ".join(f"{k}×{v}" for k, v in r["ops"].items()), r["reason"]]
                      for r in model["float_ops"]])]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>spikec report</title>"
            f"<style>{_STYLE}</style><script>{_CHECK_IMAGES}</script></head><body>"
            + "\n".join(sections) + "</body></html>\n")


def _energy_text(e: dict) -> str:
    t = e["timesteps"]
    rows = [["ANN", x["term"], x["ops"], x.get("acs", 0.0), x["macs"], x["energy_pj"] / 1e6, x["rule"]]
            for x in e["ann"]["terms"]]
    rows += [["SNN", x["term"], x["ops"], x["acs"], x["macs"], x["energy_pj"] / 1e6, x["rule"]]
             for x in e["snn"]["terms"]]
    paper_t = {arch: ratios[t] for arch, ratios in ECMT_TABLE1.items() if t in ratios}
    if paper_t:
        table1 = f"at T={t}: " + ", ".join(f"{arch} {r:.2f}" for arch, r in paper_t.items())
    else:
        table1 = "(no column for this T; T=4: " + ", ".join(f"{a} {r[4]:.2f}" for a, r in ECMT_TABLE1.items()) + ")"
    ttfs = ", ".join(f"{a} {r:.1%}" for a, r in TTFSFORMER_RATIOS.items())
    uncounted = (f"<p>Not counted (shape unknown): {html.escape(', '.join(e['uncounted']))}.</p>"
                 if e["uncounted"] else "")
    return (
        f"<p>ECMT Eq. 30: E = MACs·E_MAC + ACs·E_AC with E_MAC = {e['e_mac_pj']} pJ and E_AC = {e['e_ac_pj']} pJ "
        f"(Horowitz 2014), per sample over all T={t} steps. Operation counts come from shape inference with "
        "batch 1 and, for spike-driven products, from the spikes actually fired on these inputs.</p>"
        + _table(["model", "term", "ops", "ACs", "MACs", "µJ", "counted as"], rows)
        + "<p class=note>Not counted, in either model: elementwise affine work (bias and residual additions, "
          "constant scalings, the code × θ multiplication before activation × activation products, data "
          "movement). The ANN's own LayerNorm/GELU/Softmax count once per sample, as in ECMT's Table 3.</p>"
        + f"<p><b>E_SNN/E_ANN = {e['ratio']:.3f}</b> with everything above. In the papers' convention "
          f"(ECMT: \"MACs_SNN estimated to be zero\": only spike-driven ACs, activation × activation products "
          f"evaluated event-driven as in Eq. 16 ({e['snn']['act_act_event_driven_acs']:.4g} ACs instead of "
          f"float MACs on means), nonlinear modules and bookkeeping left out, ANN = products only) the ratio is "
          f"<b>{e['ratio_paper_convention']:.3f}</b>. For comparison, ECMT's Table 1 (ImageNet-1k, n = 8) "
          f"reports {table1}; the ratio grows about linearly with T. TTFSFormer (TTFS coding, at most one "
          f"spike per neuron) reports about 21% ({ttfs}). spikec runs the activation × activation products "
          "and F in floating point on running means at every step, which is what the first ratio charges "
          "for.</p>" + uncounted)
