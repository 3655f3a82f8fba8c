"""TTFSFormer benchmark: fidelity, spikes and energy of the float-spike-time models, the time ratio
SNN / ANN (portable ONNX functions and native kernels, measured side by side, interleaved), and the
digits-ViT accuracy against the time precision p (Fig. 4).

* digits-ViT: calibrated on the first 256 training images, accuracy over the 540 test images, timed at
  batch 8 and 64.
* MiniLM: seq 32, calibrated on calibration_sentences(), evaluated on evaluation_sentences(), timed at
  batch 8.

    /work/venv/bin/python benchmarks/bench_ttfs.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, native, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure, print_table  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402
from spikec.report import build_report  # noqa: E402

PRECISIONS = (64, 256, 1024, 4096)


def workloads() -> list[dict]:
    digits = fixtures.digits_data()
    calib = fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32)
    evaluation = fixtures.minilm_inputs(fixtures.evaluation_sentences(), seq_len=32)
    return [
        {
            "name": "digits-ViT",
            "model": fixtures.digits_vit(),
            "calibration": {"pixels": digits["x_train"][:256]},
            "evaluation": {"pixels": digits["x_test"]},
            "labels": digits["y_test"],
            "output": "logits",
            "batches": (8, 64),
        },
        {
            "name": "MiniLM",
            "model": fixtures.minilm(),
            "calibration": calib,
            "evaluation": evaluation,
            "labels": None,
            "output": "sentence_embedding",
            "batches": (8,),
        },
    ]


def timings(ann: InferenceSession, snn_path, batch: dict, reps: int) -> dict[str, float]:
    portable = InferenceSession(snn_path, native=False)
    calls = {"ann": lambda: run(ann, batch), "portable": lambda: run(portable, batch)}
    if native.available():
        fast = InferenceSession(snn_path)
        calls["native"] = lambda: run(fast, batch)
    return {k: statistics.median(v) for k, v in measure(calls, reps=reps, warmup=2).items()}


def bench(w: dict, out: Path, reps: int, log: Console) -> dict:
    log.print(f"[dim]{w['name']}: compiling (float spike times)[/dim]")
    path = out / f"{w['name']}.onnx"
    start = time.perf_counter()
    spikec.compile(w["model"], w["calibration"], path, method="ttfs", progress=False)
    compile_s = time.perf_counter() - start
    ann = InferenceSession(w["model"])
    reference = run_dataset(ann, w["evaluation"])[w["output"]]
    got = run_dataset(InferenceSession(path), w["evaluation"])[w["output"]]
    row = {
        "workload": w["name"],
        "compile_s": compile_s,
        "relative_max_error": float(np.abs(got - reference).max() / np.abs(reference).max()),
        "cosine": cosine(reference, got),
    }
    if w["labels"] is not None:
        row["ann_accuracy"] = fixtures.accuracy(reference, w["labels"])
        row["snn_accuracy"] = fixtures.accuracy(got, w["labels"])
    report = build_report(w["model"], path, {k: v[:64] for k, v in w["evaluation"].items()})
    sites = report["sites"]
    row.update(
        {
            "layers": len(sites),
            "spikes_per_neuron": sum(s["spikes_per_sample"] for s in sites) / sum(s["neurons"] for s in sites),
            "clipped_sites": report["section"]["clipped_sites"],
            "energy_ratio": report["energy"]["ratio_paper_convention"],
        }
    )
    row["timing"] = {}
    for size in w["batches"]:
        log.print(f"[dim]{w['name']}: timing batch {size}[/dim]")
        batch = {k: v[:size] for k, v in w["evaluation"].items()}
        row["timing"][size] = timings(ann, path, batch, reps)
    return row


def precision_sweep(out: Path, precisions, reps: int, log: Console) -> list[dict]:
    data = fixtures.digits_data()
    calib, test = {"pixels": data["x_train"][:256]}, {"pixels": data["x_test"]}
    ann = InferenceSession(fixtures.digits_vit())
    batch = {"pixels": data["x_test"][:8]}
    rows = []
    for p in precisions:
        log.print(f"[dim]digits-ViT: time precision {p}[/dim]")
        path = out / f"digits-p{p}.onnx"
        spikec.compile(fixtures.digits_vit(), calib, path, method="ttfs", precision=p, progress=False)
        logits = run_dataset(InferenceSession(path), test)["logits"]
        ms = timings(ann, path, batch, reps)
        rows.append(
            {
                "precision": p,
                "accuracy": fixtures.accuracy(logits, data["y_test"]),
                "ratio": ms.get("native", ms["portable"]) / ms["ann"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions and precisions")
    parser.add_argument("--reps", type=int, help="timed repetitions per call (default 7, --quick 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to PATH as JSON")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    console, log = Console(width=250, highlight=False), Console(stderr=True)
    out = Path(fixtures.CACHE_DIR) / "bench_ttfs"
    out.mkdir(parents=True, exist_ok=True)
    rows = [bench(w, out, reps, log) for w in workloads()]
    sweep = precision_sweep(out, PRECISIONS[2:] if args.quick else PRECISIONS, reps, log)

    table = Table(title="TTFS, float spike times", box=box.MARKDOWN)
    for column in (
        "workload",
        "rel. max error",
        "cosine",
        "accuracy SNN / ANN",
        "layers",
        "spikes/neuron",
        "E_SNN/E_ANN",
        "batch",
        "ANN ms",
        "SNN portable ms",
        "SNN native ms",
        "portable/ANN",
        "native/ANN",
    ):
        table.add_column(column)
    for r in rows:
        for size, ms in r["timing"].items():
            accuracy = f"{r['snn_accuracy']:.4f} / {r['ann_accuracy']:.4f}" if "ann_accuracy" in r else "—"
            table.add_row(
                r["workload"],
                f"{r['relative_max_error']:.2e}",
                f"{r['cosine']:.6f}",
                accuracy,
                str(r["layers"]),
                f"{r['spikes_per_neuron']:.3f}",
                f"{r['energy_ratio']:.3f}",
                str(size),
                f"{ms['ann']:.2f}",
                f"{ms['portable']:.2f}",
                f"{ms['native']:.2f}" if "native" in ms else "not built",
                f"{ms['portable'] / ms['ann']:.2f}",
                f"{ms['native'] / ms['ann']:.2f}" if "native" in ms else "—",
            )
    print_table(console, table)
    sweep_table = Table(
        title="digits-ViT against time precision p (spike times on a clock of delta/p)", box=box.MARKDOWN
    )
    for column in ("p", "accuracy", "SNN/ANN time (batch 8)"):
        sweep_table.add_column(column)
    ann_accuracy = rows[0]["ann_accuracy"]
    for r in sweep:
        sweep_table.add_row(str(r["precision"]), f"{r['accuracy']:.4f}", f"{r['ratio']:.2f}")
    sweep_table.add_row("float", f"{rows[0]['snn_accuracy']:.4f} (ANN {ann_accuracy:.4f})", "")
    print_table(console, sweep_table)
    if args.json:
        args.json.write_text(json.dumps({"models": rows, "precision": sweep}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
