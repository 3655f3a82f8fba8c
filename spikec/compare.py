"""Which method? Every method on the same model and data, side by side (`spikec compare`, issue 20).

Each method compiles from the fit part of the calibration data with its defaults (T: the method's own
unless given) and is measured on the validation part by the report's one pass (spikec/report/build.py):
fidelity against the float ANN at every T, the one energy model, spikes per neuron and step. Simulation
time is measured here, the ANN's and every SNN's over the same validation samples in this process, so
their ratios compare like with like.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spikec import methods
from spikec.errors import SpikecError

# the fidelity a method must reach on validation to be recommended (cosine to the float ANN; with labels,
# accuracy at most this many points below the ANN's)
RECOMMEND_MIN_COSINE = 0.99
RECOMMEND_MAX_ACCURACY_DROP = 0.5


def validation_mask(count: int) -> np.ndarray:
    """Every fourth sample validates, so both parts span the data (shared with `spikec tune`)."""
    if count < 4:
        raise SpikecError(f"calibration data: {count} samples, at least 4 are needed (fit and validation)")
    return np.arange(count) % 4 == 3


def _seconds_per_sample(session, feeds: Mapping[str, np.ndarray], batch_size: int) -> float:
    """Wall time of one pass over ``feeds`` after a warm-up batch (session creation and first-run
    allocations are not simulation)."""
    from spikec.evaluate import run_dataset

    run_dataset(session, {k: v[:batch_size] for k, v in feeds.items()}, batch_size=batch_size)
    start = time.perf_counter()
    run_dataset(session, feeds, batch_size=batch_size)
    return (time.perf_counter() - start) / len(next(iter(feeds.values())))


def _first_t(per_t: Sequence[dict], key: str, bound: float) -> int | None:
    """The first T from which the measure stays at or above ``bound`` (None: never)."""
    reached = None
    for row in per_t:
        if row.get(key) is not None and row[key] >= bound:
            reached = reached or row["t"]
        else:
            reached = None
    return reached


def points(report: dict) -> list[dict]:
    """The report's fidelity/energy/latency points: every T whose energy the run's per-step spike counts
    give (build_report's ``energy_per_t``), the cosine of the worst output at that T (a model is as
    faithful as its least faithful output). A one-pass model is one point at T=1."""
    reference = "float ANN" if "float ANN" in report["fidelity"] else next(iter(report["fidelity"]))
    outputs = report["fidelity"][reference]["outputs"].values()
    energy = {e["t"]: e for e in report.get("energy_per_t") or []}
    energy.setdefault(
        report["timesteps"],
        {"ratio": report["energy"]["ratio"], "ratio_paper_convention": report["energy"]["ratio_paper_convention"]},
    )
    rows = []
    for t, e in sorted(energy.items()):
        row = {
            "t": t,
            "cosine": min(o["per_t"][t - 1]["cosine"] for o in outputs),
            "energy": e["ratio"],
            "energy_paper": e["ratio_paper_convention"],
        }
        accuracies = [o["per_t"][t - 1]["accuracy"] for o in outputs if "accuracy" in o["per_t"][t - 1]]
        if accuracies:
            row["accuracy"] = min(accuracies)
        rows.append(row)
    return rows


def _row(
    method: str, report: dict, labels: np.ndarray | None, snn_seconds: float, ann_seconds: float, compile_seconds: float
) -> dict:
    reference = "float ANN" if "float ANN" in report["fidelity"] else "ANN"
    outputs = report["fidelity"][reference]["outputs"]
    # the worst output decides, as in tune: a model is as faithful as its least faithful output
    name = min(outputs, key=lambda o: outputs[o]["per_t"][-1]["cosine"])
    per_t = outputs[name]["per_t"]
    sites = report["sites"]
    neuron_steps = sum(s["neurons"] for s in sites) * report["timesteps"]
    row = {
        "method": method,
        "output": name,
        "timesteps": report["timesteps"] if report["stepped"] else None,
        "cosine": per_t[-1]["cosine"],
        "relative_max_error": per_t[-1]["relative_max_error"],
        "t_at_min_cosine": _first_t(per_t, "cosine", RECOMMEND_MIN_COSINE) if report["stepped"] else None,
        "energy_ratio": report["energy"]["ratio"],
        "energy_ratio_paper": report["energy"]["ratio_paper_convention"],
        "spikes_per_neuron_per_step": sum(s["spikes_per_sample"] for s in sites) / neuron_steps
        if neuron_steps
        else 0.0,
        "seconds_per_sample": snn_seconds,
        "time_ratio": snn_seconds / ann_seconds,
        "compile_seconds": compile_seconds,
        "per_t": per_t,
        # energy vs T where the per-step spike counts give it (STA's thresholds depend on T: its T only)
        "energy_per_t": [{"t": p["t"], "energy": p["energy"]} for p in points(report)],
    }
    if labels is not None and "accuracy" in per_t[-1]:
        row["accuracy"], row["ann_accuracy"] = per_t[-1]["accuracy"], outputs[name]["accuracy"]
    if "QANN" in report["fidelity"]:
        row["qann_relative_max_error"] = report["fidelity"]["QANN"]["outputs"][name]["per_t"][-1]["relative_max_error"]
    return row


def measure(
    ann: str | os.PathLike,
    fit: Mapping[str, np.ndarray],
    validation: Mapping[str, np.ndarray],
    method: str,
    directory: str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    **options,
) -> tuple[Path, dict]:
    """Compile ``ann`` with ``method`` and ``options`` from ``fit`` into ``directory`` and measure it on
    ``validation`` by the report's one pass, with the energy of every T its spike counts give (compare and
    tune both measure this way). A conversion error raises SpikecError before anything is measured.
    The report's "seconds" is the time the measurement took."""
    from spikec.compiler import compile as compile_model
    from spikec.report import build_report

    snn, qann = Path(directory) / f"{method}.onnx", Path(directory) / f"{method}.qann.onnx"
    if method == "spikezip":  # measured against the float ANN and the QANN it equals
        options["save_qann"] = qann
    compile_model(ann, fit, snn, method=method, verify=False, progress=False, batch_size=batch_size, **options)
    start = time.perf_counter()
    report = build_report(
        ann,
        snn,
        validation,
        labels=labels,
        qann=qann if method == "spikezip" else None,
        batch_size=batch_size,
        energy_per_t=True,
    )
    report["seconds"] = time.perf_counter() - start
    return snn, report


def compare_methods(
    ann: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    names: Sequence[str] = tuple(methods.METHODS),
    timesteps: Mapping[str, int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Compile ``ann`` with each method of ``names`` on the fit part of ``feeds`` and measure it on the
    validation part. A method that cannot convert the model gets a row with its one-line error."""

    unknown = sorted(set(names) - set(methods.METHODS))
    if unknown:
        raise SpikecError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(methods.METHODS)})")
    timesteps = dict(timesteps or {})
    for name in timesteps:
        if name not in names or not methods.get(name).stepped:
            raise SpikecError(f"--timesteps {name}=...: {name} is not a compared method with time steps")
    from spikec.evaluate import open_reference, open_session

    valid = validation_mask(len(next(iter(feeds.values()))))
    fit, validation = {k: v[~valid] for k, v in feeds.items()}, {k: v[valid] for k, v in feeds.items()}
    valid_labels = labels[valid] if labels is not None else None
    ann_seconds = _seconds_per_sample(open_reference(ann), validation, batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names, start=1):
            if progress:  # stdout carries the results (--json)
                print(f"compare {i}/{len(names)}: {name}", file=sys.stderr, flush=True)
            extra: dict[str, object] = {"timesteps": timesteps[name]} if name in timesteps else {}
            start = time.perf_counter()
            try:
                snn, report = measure(
                    ann, fit, validation, name, tmp, labels=valid_labels, batch_size=batch_size, **extra
                )
            except SpikecError as exc:
                rows.append({"method": name, "error": str(exc)})
                continue
            compile_seconds = time.perf_counter() - start
            rows.append(
                _row(
                    name,
                    report,
                    valid_labels,
                    _seconds_per_sample(open_session(snn), validation, batch_size),
                    ann_seconds,
                    compile_seconds - report["seconds"],
                )
            )
    if all("error" in r for r in rows):  # nothing to compare: an error, not a table of failures
        errors = list(dict.fromkeys(r["error"] for r in rows))
        raise SpikecError(
            errors[0]
            if len(errors) == 1
            else "no method converts the model: " + "; ".join(f"{r['method']}: {r['error']}" for r in rows)
        )
    return {
        "model": os.fspath(ann),
        "fit_samples": int((~valid).sum()),
        "validation_samples": int(valid.sum()),
        "ann_seconds_per_sample": ann_seconds,
        "methods": rows,
        "recommendation": recommend(rows),
    }


def recommend(rows: Sequence[dict]) -> dict:
    """The rule docs/compare.md states: among the methods faithful enough (cosine to the float ANN at
    least RECOMMEND_MIN_COSINE; with labels, accuracy at most RECOMMEND_MAX_ACCURACY_DROP points below
    the ANN's), the lowest estimated energy, then the fewest steps; where none is, the most faithful."""
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return {"method": None, "reason": "no method converted the model"}

    def faithful(r: dict) -> bool:
        if "accuracy" in r:
            return 100 * (r["ann_accuracy"] - r["accuracy"]) <= RECOMMEND_MAX_ACCURACY_DROP
        return r["cosine"] >= RECOMMEND_MIN_COSINE

    good = [r for r in measured if faithful(r)]
    if good:
        best = min(
            good,
            key=lambda r: (r["energy_ratio"] if r["energy_ratio"] is not None else float("inf"), r["timesteps"] or 1),
        )
        return {
            "method": best["method"],
            "reason": "the lowest estimated energy of the methods that reach the fidelity bound",
        }
    best = max(measured, key=lambda r: r.get("accuracy", r["cosine"]))
    return {
        "method": best["method"],
        "reason": "no method reaches the fidelity bound: the most faithful one (raise its T, or tune it)",
    }
