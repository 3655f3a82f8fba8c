"""The report's numbers: one pass over the data runs the reference models and the SNN side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from spikec import graphinfo, methods
from spikec.errors import SpikecError
from spikec.evaluate import check_labels, check_source, cosine, fidelity, finite_scale, float32_reference, max_abs_error
from spikec.memory import default_budget
from spikec.probe import Estimate, final_estimate, side_by_side
from spikec.report import energy
from spikec.report.section import Context
from spikec.runtime.layout import STEPS_SUFFIX
from spikec.runtime.metadata import SpikecMetadata

# output values kept for a TTFS model's fidelity scatter plot
SCATTER_VALUES = 2000
# The report fetches every layer's tensor of a batch at once (of the unrolled SNN, T steps of each): the
# batch is cut so that they take at most this share of the memory budget (MiniLM's STA model at T=64 with
# 32 samples a batch asked for over 20 GB); the rest is onnxruntime's own working memory.
FETCH_SHARE_OF_BUDGET = 0.25


def fetch_batch_size(batch_size: int, shapes: Sequence[tuple[graphinfo.Shapes, Sequence[str]]]) -> int:
    """The largest batch up to ``batch_size`` whose fetched tensors (per model: its shapes and the names
    fetched) fit FETCH_SHARE_OF_BUDGET of the memory budget; a tensor of unknown size counts as the
    largest known one."""
    budget = default_budget()
    per_sample = 0
    for model_shapes, names in shapes:
        sizes = [model_shapes.elements(name) for name in names]
        largest = max((n for n in sizes if n is not None), default=1)
        per_sample += sum(largest if n is None else n for n in sizes) * model_shapes.rows * 4
    if budget is None or per_sample == 0:
        return batch_size
    return max(1, min(batch_size, int(budget * FETCH_SHARE_OF_BUDGET) // per_sample))


@dataclass
class _LayerError:
    max_error: float = 0.0
    max_reference: float = 0.0
    cosine_sum: float = 0.0
    rows: int = 0

    def add(self, reference: np.ndarray, estimate: np.ndarray) -> None:
        self.max_error = max(self.max_error, max_abs_error(reference, estimate))
        self.max_reference = max(self.max_reference, finite_scale(reference))
        self.cosine_sum += cosine(reference, estimate) * len(reference)
        self.rows += len(reference)

    def row(self) -> dict:
        return {
            "max_abs_error": self.max_error,
            "relative_max_error": self.max_error / self.max_reference if self.max_reference else self.max_error,
            "cosine": self.cosine_sum / self.rows,
        }


def load(path: str | os.PathLike, what: str) -> onnx.ModelProto:
    from spikec.passes.loader import check_input_file, load_model

    return load_model(check_input_file(path, f"{what} {path}"))


def _node_outputs(model: onnx.ModelProto) -> list[str]:
    return [o for n in model.graph.node for o in n.output if o]


def _fidelity(reference: np.ndarray, steps: np.ndarray, labels: np.ndarray | None, *, scatter: bool) -> dict:
    """One output against one reference: `spikec.evaluate.fidelity` per T, the reference's accuracy (a
    classifier output with labels) and, for a one-pass model's scatter plot, evenly spaced value pairs."""
    result: dict[str, object] = {"per_t": fidelity(reference, steps, labels)}
    if labels is not None and reference.ndim == 2 and reference.shape[1] > 1:
        result["accuracy"] = float(np.mean(reference.argmax(1) == labels))
    if scatter:
        picked = np.linspace(0, reference.size - 1, min(reference.size, SCATTER_VALUES)).astype(np.int64)
        result["scatter"] = {"reference": reference.ravel()[picked].tolist(), "snn": steps[-1].ravel()[picked].tolist()}
    return result


def build_report(
    ann: str | os.PathLike,
    snn: str | os.PathLike,
    feeds: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    qann: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = False,
    energy_per_t: bool = False,
) -> dict:
    """Every number the report shows, as a JSON-serializable dict. ``ann`` is the model the SNN was
    compiled from; for a SpikeZIP-TF SNN the quantized ANN it is equivalent to is ``qann`` (then ``ann``
    is the float ANN) or ``ann`` itself. With ``energy_per_t``, "energy_per_t" holds the energy ratios of
    every T up to the SNN's that the per-step spike counts give (all for ECMT and SpikeZIP-TF; STA: its T).
    """
    from spikec.calibrate import load_inputs
    from spikec.passes.canonicalize import canonicalize

    snn_model = load(snn, "SNN")
    record = SpikecMetadata.read(snn_model, str(snn))
    if record is None:
        raise SpikecError(f"SNN {snn}: not a spikec model (no spikec metadata); compile it with spikec first")
    if record.method not in methods.METHODS:
        raise SpikecError(
            f"SNN {snn}: method {record.method!r} is not registered (known: {', '.join(methods.METHODS)})"
        )
    method = methods.get(record.method)
    if method.stepped and record.mode != "unrolled":
        raise SpikecError(
            f"SNN {snn}: report needs a time-unrolled spikec model (got mode {record.mode}); compile "
            f"with --mode unrolled"
        )
    section_type = method.report_section()
    paths = section_type.references(ann, qann)
    references = {label: load(path, label) for label, path in paths.items()}
    source_check = check_source(snn, record, [(label, paths[label], model) for label, model in references.items()])
    runnable = {label: float32_reference(paths[label], model) for label, model in references.items()}
    primary_label, primary = next(iter(references.items()))
    # what compile held the SNN to, where that is not the first reference as given (SpikeZIP-TF's integer mode:
    # the integer QANN, which onnxruntime's session of a QDQ model can differ from): a reference of its own
    held_to, held_to_label = method.verification_reference(primary, method.Options.from_record(record.options))
    if held_to is not primary:

        def second(entries: dict, value) -> dict:
            first, *rest = entries.items()
            return dict([first, (held_to_label, value), *rest])

        references, runnable, paths = (
            second(references, held_to),
            second(runnable, held_to),
            second(paths, paths[primary_label]),
        )
    feeds = load_inputs(feeds, primary, what="inputs")
    samples = len(next(iter(feeds.values())))
    if labels is not None:
        labels = check_labels(labels, samples)
    steps = record.timesteps if method.stepped else 1
    sample = {name: value.shape for name, value in feeds.items()}
    snn_shapes = graphinfo.sample_shapes(snn_model, sample)
    # the float32 form where there is one: canonicalize would convert (and say so) a second time
    float32_primary = runnable[primary_label]
    ann_canonical = canonicalize(float32_primary if isinstance(float32_primary, onnx.ModelProto) else primary)
    ann_shapes = graphinfo.sample_shapes(ann_canonical, sample)
    nonlinear = graphinfo.nonlinear_regions(ann_canonical)
    nodes = graphinfo.classify_nodes(snn_model)
    producer = {o: n for n in nodes for o in n.outputs}
    last_step = graphinfo.mean_domain(nodes) | {o for n in nodes if n.category == "time_invariant" for o in n.outputs}

    snn_outputs = {o.name for o in snn_model.graph.output}
    readout = (lambda name: name + STEPS_SUFFIX) if method.stepped else (lambda name: name)
    outputs = [o.name for o in primary.graph.output if readout(o.name) in snn_outputs]
    if not outputs:
        raise SpikecError(f"{snn}: no output of the SNN matches an output of the {primary_label} by name")
    for label, model in references.items():
        missing = sorted(set(outputs) - {o.name for o in model.graph.output})
        if missing:
            raise SpikecError(f"{label} {paths[label]}: has no output {missing[0]!r}, which the SNN has")

    def estimate_kind(name: str) -> str:
        if not method.stepped:
            return Estimate.SINGLE
        if name in snn_outputs:
            return Estimate.OUTPUT
        if name in last_step:
            return Estimate.LAST
        return Estimate.MEAN if record.semantics == "mean" else Estimate.SUM

    # every tensor of the reference the rewrite kept by name, in the reference's order
    snn_tensors = set(_node_outputs(snn_model))
    layers = [t for t in dict.fromkeys(_node_outputs(primary)) if t in snn_tensors and snn_shapes.is_float(t)]
    errors = {t: _LayerError() for t in layers}
    skipped: dict[str, str] = {}
    context = Context(snn_model, record, steps, samples)
    section = section_type(context)
    run_model = section.model(snn_model)
    # shapes actually computed complete shape inference for the operation counts
    ann_counted = [t for t in graphinfo.counted_tensors(ann_canonical, nonlinear) if t in set(_node_outputs(primary))]
    snn_counted = [t for t in graphinfo.counted_tensors(snn_model) if t in snn_tensors]
    names = [list(dict.fromkeys([*layers, *outputs, *ann_counted]))] + [outputs] * (len(references) - 1)
    names.append(list(dict.fromkeys([*layers, *section.tensors(), *map(readout, outputs), *snn_counted])))
    collected: dict[str, dict[str, list]] = {label: {o: [] for o in outputs} for label in [*references, "SNN"]}
    models = [*runnable.values(), snn if run_model is snn_model else run_model]
    run_batch = fetch_batch_size(batch_size, [*((ann_shapes, n) for n in names[:-1]), (snn_shapes, names[-1])])
    for batch, values in enumerate(side_by_side(models, names, feeds, batch_size=run_batch, progress=progress)):
        reference_values, snn_values = values[0], values[-1]
        if batch == 0:
            rows = len(reference_values[outputs[0]])
            ann_shapes = ann_shapes.observe({t: reference_values[t] for t in ann_counted}, rows)
            snn_shapes = snn_shapes.observe({t: snn_values[t] for t in snn_counted}, rows)
        for label, model_values in zip(references, values):
            for name in outputs:
                collected[label][name].append(model_values[name])
        for name in outputs:
            collected["SNN"][name].append(snn_values[readout(name)] if method.stepped else snn_values[name][None])
        for name in (n for n in layers if n not in skipped):
            reference = reference_values[name]
            estimate = final_estimate(snn_values[name], reference.shape, steps, estimate_kind(name))
            if estimate is None:
                skipped[name] = (
                    f"SNN shape {list(snn_values[name].shape)} does not hold {steps} steps of "
                    f"the {primary_label}'s {list(reference.shape)}"
                )
            else:
                errors[name].add(reference, estimate)
        section.add(snn_values)

    snn_steps = {name: np.concatenate(collected["SNN"][name], axis=1) for name in outputs}
    fidelity_data: dict[str, dict[str, Any]] = {
        label: {
            "model": os.fspath(paths[label]),
            "outputs": {
                name: _fidelity(
                    np.concatenate(collected[label][name]), snn_steps[name], labels, scatter=not method.stepped
                )
                for name in outputs
            },
        }
        for label in references
    }

    sites = section.sites()
    site_tensors = {s["site"] for s in sites}
    ann_op = {o: n.op_type for n in primary.graph.node for o in n.output}
    layer_rows = [
        {
            "tensor": name,
            "op": ann_op[name],
            "snn_producer": producer[name].op,
            "category": producer[name].category,
            "estimate": estimate_kind(name),
            "neuron_input": name in site_tensors,
            **errors[name].row(),
        }
        for name in layers
        if name not in skipped
    ]

    nonlinear_elements = graphinfo.nonlinear_elements(nonlinear, ann_shapes)
    ann_products = graphinfo.product_macs(ann_canonical, ann_shapes)

    def energy_of(run_sites: list[dict], run_steps: int) -> dict:
        snn_products, counts, event_acs = energy.snn_work(
            snn_model,
            snn_shapes,
            {s["source"]: s["spikes_per_sample"] for s in run_sites},
            run_steps,
            section.claimed_products(),
            nonlinear_elements,
        )
        energy.merge(counts, section.energy_counts(run_sites, snn_products, run_steps))
        return energy.energy(ann_products, nonlinear_elements, snn_products, counts, event_acs, run_steps)

    extra: dict[str, Any] = {}
    if energy_per_t:
        # the first t steps of the unrolled run are what a model compiled for T = t computes
        until = [(t, section.sites_until(t)) for t in range(1, steps + 1)]
        extra["energy_per_t"] = [
            {"t": t, "ratio": e["ratio"], "ratio_paper_convention": e["ratio_paper_convention"]}
            for t, run_sites in until
            if run_sites is not None
            for e in [energy_of(run_sites, t)]
        ]
    return {
        "ann": os.fspath(ann),
        "snn": os.fspath(snn),
        "samples": samples,
        "timesteps": steps,
        "stepped": method.stepped,
        "method": record.method,
        "paper": method.paper,
        "mode": record.mode,
        "semantics": record.semantics,
        "options": record.options,
        "references": list(references),
        "source_check": source_check,
        "classifier": any(
            r["per_t"][0].get("top1_agreement") is not None for r in fidelity_data[primary_label]["outputs"].values()
        ),
        "fidelity": fidelity_data,
        "layers_reference": primary_label,
        "layers": layer_rows,
        "layers_skipped": [{"tensor": t, "reason": r} for t, r in skipped.items()],
        "sites": sites,
        "energy": energy_of(sites, steps),
        **extra,
        "model": graphinfo.summarize(snn_model, sample) if method.stepped else None,
        "section": section.finish(),
    }
