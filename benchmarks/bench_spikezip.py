"""SpikeZIP-TF benchmark: the SNN against its quantized ANN (QANN), speed and equivalence versus T.

* digits-ViT: the bundled tiny ViT, post-training quantized (spikec.quantize, L=16) on the first 256
  training images; timed on a batch of 32 test images, fidelity over the full test split (540 images).
* MiniLM: all-MiniLM-L6-v2, seq 32, quantized (L=16) on calibration_sentences(); timed on a batch of 8
  evaluation sentences, fidelity over all 64.

SpikeZIP-TF has sum semantics: the output after T steps equals the QANN's once every neuron is quiet
(T >= T_eq). Per T the table gives the QANN and the unrolled SNN timed interleaved in this process
(bench_ecmt.measure), the ratio SNN / (T x QANN), the share of samples whose output equals the QANN's
(max abs error <= 1e-4 x output scale; the integer QANN's, spikec.methods.spikezip.integer_qann, unless
--no-integer), accuracy or cosine against the QANN, and T_eq over the set.
Below it: how far the QANN itself is from the float ANN.

    /work/venv/bin/python benchmarks/bench_spikezip.py [--quick] [--json PATH] [--reps N] [--threads N] [--zero-points]
        [--no-integer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import equilibrium_steps, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import kernels, measure, print_table, session  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402
from spikec.methods.spikezip import integer_qann  # noqa: E402

LEVELS = 16


def workloads() -> list[dict]:
    digits = fixtures.digits_data()
    return [
        {
            "name": "digits-ViT",
            "model": fixtures.digits_vit(),
            "calibration": {"pixels": digits["x_train"][:256]},
            "evaluation": {"pixels": digits["x_test"]},
            "labels": digits["y_test"],
            "batch_size": 32,
            "output": "logits",
            "timesteps": [8, 16, 24, 32],
        },
        {
            "name": "MiniLM",
            "model": fixtures.minilm(),
            "calibration": fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32),
            "evaluation": fixtures.minilm_inputs(fixtures.evaluation_sentences(), seq_len=32),
            "labels": None,
            "batch_size": 8,
            "output": "sentence_embedding",
            "timesteps": [16, 32, 48],
        },
    ]


def agreement(reference: np.ndarray, out: np.ndarray, labels) -> dict:
    scale = float(np.abs(reference).max()) or 1.0
    per_sample = np.abs(out - reference).reshape(len(out), -1).max(axis=1)
    scores = {
        "exact_samples": float(np.mean(per_sample <= 1e-4 * scale)),
        "relative_max_error": float(per_sample.max() / scale),
        "cosine": cosine(reference, out),
    }
    if reference.ndim == 2 and reference.shape[1] > 1:
        scores["top1_agreement"] = float(np.mean(out.argmax(1) == reference.argmax(1)))
        if labels is not None:
            scores["accuracy"] = fixtures.accuracy(out, labels)
    return scores


def bench(w: dict, args, log: Console) -> dict:
    timesteps = w["timesteps"][:1] if args.quick else w["timesteps"]
    start = time.perf_counter()
    qann = spikec.quantize(w["model"], w["calibration"], levels=LEVELS, zero_points=args.zero_points, progress=False)
    quantize_s = time.perf_counter() - start
    ann, quantized = session(w["model"], args), session(qann, args)
    batch = {k: v[: w["batch_size"]] for k, v in w["evaluation"].items()}
    # what the SNN equals once quiet: the integer QANN in integer-exact mode (spikec's PTQ models run the
    # same in onnxruntime), the QANN up to float rounding in the float form
    exact = quantized if args.no_integer else session(integer_qann(qann), args)
    reference = run_dataset(exact, w["evaluation"], batch_size=w["batch_size"])[w["output"]]
    float_out = run_dataset(ann, w["evaluation"], batch_size=w["batch_size"])[w["output"]]
    result = {
        "batch_size": w["batch_size"],
        "levels": LEVELS,
        "quantize_s": quantize_s,
        "qann_vs_ann": agreement(float_out, reference, w["labels"]),
        "rows": [],
    }
    for t in timesteps:
        log.print(f"[dim]{w['name']}: T={t}[/dim]")
        start = time.perf_counter()
        snn_model = spikec.compile(
            qann, w["calibration"], method="spikezip", timesteps=t, integer=not args.no_integer, progress=False
        )
        compile_s = time.perf_counter() - start
        snn = session(snn_model, args)
        samples = measure(
            {"qann": lambda: run(quantized, batch), "snn": lambda: run(snn, batch)}, reps=args.reps, warmup=1
        )
        ms = {k: statistics.median(v) for k, v in samples.items()}
        out = run_dataset(snn, w["evaluation"], batch_size=w["batch_size"])
        t_eq = equilibrium_steps(out["spikec.spikes.steps"])
        reached = [x for x in t_eq if x is not None]
        result["rows"].append(
            {
                "timesteps": t,
                "qann_ms": ms["qann"],
                "snn_ms": ms["snn"],
                "ratio": ms["snn"] / (t * ms["qann"]),
                "compile_s": compile_s,
                "spikec_ops": kernels(snn),
                "fidelity": agreement(reference, out[w["output"]], w["labels"]),
                "t_eq_reached": len(reached) / len(t_eq),
                "t_eq_max": max(reached, default=None),
                "t_eq_mean": float(np.mean(reached)) if reached else None,
            }
        )
    return result


def describe(f: dict) -> str:
    if "accuracy" in f:
        return f"acc {100 * f['accuracy']:.2f} %, top-1 agree {100 * f['top1_agreement']:.2f} %"
    return f"cosine {f['cosine']:.5f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the first T only, 2 repetitions")
    parser.add_argument("--zero-points", action="store_true", help="quantize with zero points (--zero-points)")
    parser.add_argument("--no-integer", action="store_true", help="the float form (--no-integer)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-spinning", action="store_true")
    parser.add_argument("--no-native", action="store_true")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    out, log = Console(soft_wrap=True, highlight=False, width=220), Console(stderr=True)
    started = time.perf_counter()
    loads = workloads()
    results = {w["name"]: bench(w, args, log) for w in loads}

    table = Table(box=box.MARKDOWN)
    for heading in (
        "workload (batch)",
        "T",
        "QANN ms",
        "SNN ms",
        "SNN / (T x QANN)",
        "compile s",
        "samples = QANN",
        "max err / scale",
        "SNN vs QANN",
        "T_eq reached",
        "T_eq max / mean",
    ):
        table.add_column(
            heading, justify="left" if heading.startswith(("workload", "SNN vs")) else "right", no_wrap=True
        )
    for name, r in results.items():
        for row in r["rows"]:
            f = row["fidelity"]
            table.add_row(
                f"{name} ({r['batch_size']})",
                str(row["timesteps"]),
                f"{row['qann_ms']:.1f}",
                f"{row['snn_ms']:.1f}",
                f"{row['ratio']:.2f}",
                f"{row['compile_s']:.1f}",
                f"{100 * f['exact_samples']:.1f} %",
                f"{f['relative_max_error']:.1e}",
                describe(f),
                f"{100 * row['t_eq_reached']:.0f} %",
                "-" if row["t_eq_max"] is None else f"{row['t_eq_max']} / {row['t_eq_mean']:.1f}",
            )
    quant = Table(box=box.MARKDOWN)
    for heading in ("workload", "levels", "quantize s", "QANN vs float ANN"):
        quant.add_column(heading, no_wrap=True)
    for name, r in results.items():
        quant.add_row(name, str(r["levels"]), f"{r['quantize_s']:.1f}", describe(r["qann_vs_ann"]))
    ops = " / ".join(sorted({row["spikec_ops"] for r in results.values() for row in r["rows"]}))
    out.print(
        f"spikec SpikeZIP-TF benchmark{' (--quick)' if args.quick else ''}: onnxruntime {ort.__version__}, "
        f"intra_op_num_threads={args.threads}, spikec ops as {ops}; {os.cpu_count()} CPUs. Times: median of "
        f"{args.reps} interleaved repetitions on one batch; fidelity over the whole evaluation set against "
        f"the {'QANN' if args.no_integer else 'integer QANN'} (run with spikec.runtime.InferenceSession)."
    )
    out.print()
    print_table(out, table)
    out.print()
    print_table(out, quant)
    out.print(f"wall {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
