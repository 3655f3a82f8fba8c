"""ECMT benchmark: ANN vs spiking model speed, compile time and fidelity, on two workloads.

* digits-ViT: the bundled tiny ViT, calibrated on the first 256 training images; timed on a batch of
  32 test images, fidelity over the full test split (540 images).
* MiniLM: all-MiniLM-L6-v2 sentence embeddings, seq 32, calibrated on calibration_sentences() with
  per_channel=True, percentile=90.0 (the settings of tests/test_ecmt.py); timed on a batch of 8
  evaluation sentences, fidelity over all 64 evaluation sentences.

For every T the ANN and the unrolled SNN are timed in this process, interleaved, on the same batch,
with warm-up, and the median of the repetitions is reported. At T=8 (or the first T with --quick)
the stateful model, driven one step per run, is timed in the same interleaving.

    /work/venv/bin/python benchmarks/bench_ecmt.py [--quick] [--json PATH] [--reps N] [--warmup N]
                                                   [--threads N] [--allow-spinning] [--no-native]

Runs offline (fixtures are cached under .cache/fixtures). Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, run, run_stateful  # noqa: E402

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import fidelity, run_dataset  # noqa: E402


@dataclass
class Workload:
    name: str
    model: Path
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]  # the whole evaluation set
    batch_size: int  # timing batch = the first batch_size samples of evaluation
    output: str  # the output that fidelity is measured on
    describe: Callable[[dict], str]  # fidelity numbers -> one table cell
    labels: np.ndarray | None = None
    options: dict = field(default_factory=dict)  # extra compile options

    @property
    def batch(self) -> dict[str, np.ndarray]:
        return {name: value[: self.batch_size] for name, value in self.evaluation.items()}


def workloads() -> list[Workload]:
    digits = fixtures.digits_data()
    minilm_eval = fixtures.minilm_inputs(fixtures.evaluation_sentences(), seq_len=32)
    return [
        Workload(
            "digits-ViT",
            fixtures.digits_vit(),
            {"pixels": digits["x_train"][:256]},
            {"pixels": digits["x_test"]},
            batch_size=32,
            output="logits",
            labels=digits["y_test"],
            describe=lambda f: (
                f"acc {100 * f['accuracy']:.2f} % (ANN {100 * f['ann_accuracy']:.2f} %), "
                f"top-1 agree {100 * f['top1_agreement']:.2f} %"
            ),
        ),
        Workload(
            "MiniLM",
            fixtures.minilm(),
            fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32),
            minilm_eval,
            batch_size=8,
            output="sentence_embedding",
            options={"per_channel": True, "percentile": 90.0},
            describe=lambda f: f"cosine {f['cosine']:.4f}",
        ),
    ]


def session(model, args) -> InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning intra-op threads of one session steal the 2 cores from the next session run in the
    # interleaving (and from other processes): measured, the SNN after an ANN run took ~2.8x as long.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if args.allow_spinning else "0")
    # Only pass native= when asked: spikec versions without native kernels do not take it.
    return InferenceSession(model, options, **({"native": False} if args.no_native else {}))


def kernels(s: InferenceSession) -> str:
    """How this session runs the spikec ops."""
    return "native kernels" if getattr(s, "native", False) else "ONNX functions"


def measure(
    calls: Mapping[str, Callable[[], object]], *, reps: int, warmup: int, min_sample_ms: float = 50.0
) -> dict[str, list[float]]:
    """Wall time (ms per call) of each call, interleaved: every repetition takes one sample of every
    call, in an order rotated by one each repetition so that no call always follows the same one.
    A sample of a call faster than ``min_sample_ms`` times several back-to-back calls and divides."""
    names = list(calls)
    last: dict[str, float] = {}
    for _ in range(warmup):
        for name in names:
            start = time.perf_counter()
            calls[name]()
            last[name] = 1e3 * (time.perf_counter() - start)
    number = {name: max(1, math.ceil(min_sample_ms / max(last.get(name, min_sample_ms), 1e-3))) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                start = time.perf_counter()
                for _ in range(number[name]):
                    calls[name]()
                samples[name].append(1e3 * (time.perf_counter() - start) / number[name])
    finally:
        gc.enable()
    return samples


def median_ratio(samples: Mapping[str, list[float]], a: str, b: str) -> float:
    """The median over repetitions of call ``a``'s time over call ``b``'s in the same repetition (of
    ``measure``'s samples): a slow spell of the machine moves both, not the ratio."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def relative_iqr(values: list[float]) -> float:
    """Interquartile range over median: how noisy a median is."""
    if len(values) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / median


def timed_compile(w: Workload, timesteps: int, mode: str):
    start = time.perf_counter()
    model = spikec.compile(w.model, w.calibration, timesteps=timesteps, mode=mode, progress=False, **w.options)
    return model, time.perf_counter() - start


def bench(w: Workload, timesteps: list[int], stateful_t: int, args, log: Console) -> dict:
    batch = w.batch
    ann = session(w.model, args)
    reference = run_dataset(ann, w.evaluation, batch_size=w.batch_size)[w.output]
    result = {
        "batch_size": w.batch_size,
        "evaluation_samples": len(reference),
        "compile_options": w.options,
        "rows": [],
    }
    for t in timesteps:
        log.print(f"[dim]{w.name}: T={t} compile[/dim]")
        snn_model, compile_s = timed_compile(w, t, "unrolled")
        snn = session(snn_model, args)
        calls = {"ann": lambda: run(ann, batch), "snn": lambda: run(snn, batch)}
        if t == stateful_t:
            stateful_model, stateful_compile_s = timed_compile(w, t, "stateful")
            stateful = session(stateful_model, args)
            calls["stateful"] = lambda: run_stateful(stateful, batch, t)
        log.print(f"[dim]{w.name}: T={t} timing ({', '.join(calls)})[/dim]")
        samples = measure(calls, reps=args.reps, warmup=args.warmup)
        ms = {name: statistics.median(values) for name, values in samples.items()}
        spread = {name: relative_iqr(values) for name, values in samples.items()}
        log.print(f"[dim]{w.name}: T={t} fidelity over {len(reference)} samples[/dim]")
        final = run_dataset(snn, w.evaluation, batch_size=w.batch_size)[w.output]
        scores = fidelity(reference, final[None], w.labels)[0]
        del scores["t"]  # fidelity() numbers its rows by step; this is the final output after T steps
        if w.labels is not None:
            scores["ann_accuracy"] = fixtures.accuracy(reference, w.labels)
        row = {
            "timesteps": t,
            "ann_ms": ms["ann"],
            "snn_ms": ms["snn"],
            "ratio": ms["snn"] / (t * ms["ann"]),
            "compile_s": compile_s,
            "fidelity": scores,
            "spikec_ops": kernels(snn),
            "iqr_over_median": spread,
            "samples_ms": samples,
        }
        result["rows"].append(row)
        if t == stateful_t:
            want = run(snn, batch)[w.output + ".steps"]
            got = run_stateful(stateful, batch, t)[w.output + ".steps"]
            result["stateful"] = {
                "timesteps": t,
                "step_ms": ms["stateful"] / t,
                "unrolled_step_ms": ms["snn"] / t,
                "ratio": ms["stateful"] / ms["snn"],
                "compile_s": stateful_compile_s,
                "spikec_ops": kernels(stateful),
                "max_abs_diff_vs_unrolled": float(np.max(np.abs(got - want))),
            }
            del stateful, stateful_model
        snn = snn_model = None  # the timing lambdas close over these names: drop the sessions, keep the names
        gc.collect()
    return result


def tables(results: dict[str, dict], describe: dict[str, Callable[[dict], str]]) -> tuple[Table, Table]:
    main = Table(box=box.MARKDOWN)
    for heading in (
        "workload (batch)",
        "T",
        "ANN ms/batch",
        "SNN ms/batch",
        "SNN / (T x ANN)",
        "IQR/median ANN, SNN",
        "compile s",
        "fidelity (SNN at T vs ANN)",
    ):
        main.add_column(
            heading, justify="left" if heading.startswith(("workload", "fidelity")) else "right", no_wrap=True
        )
    steps = Table(box=box.MARKDOWN)
    for heading in (
        "workload (batch)",
        "T",
        "stateful ms/step",
        "unrolled ms / T",
        "stateful / unrolled",
        "compile s (stateful)",
        "max abs diff vs unrolled",
    ):
        steps.add_column(heading, justify="left" if heading.startswith("workload") else "right", no_wrap=True)
    for name, r in results.items():
        label = f"{name} ({r['batch_size']})"
        for row in r["rows"]:
            main.add_row(
                label,
                str(row["timesteps"]),
                f"{row['ann_ms']:.1f}",
                f"{row['snn_ms']:.1f}",
                f"{row['ratio']:.2f}",
                ", ".join(f"{100 * row['iqr_over_median'][k]:.0f} %" for k in ("ann", "snn")),
                f"{row['compile_s']:.1f}",
                describe[name](row["fidelity"]),
            )
        s = r["stateful"]
        steps.add_row(
            label,
            str(s["timesteps"]),
            f"{s['step_ms']:.1f}",
            f"{s['unrolled_step_ms']:.1f}",
            f"{s['ratio']:.2f}",
            f"{s['compile_s']:.1f}",
            f"{s['max_abs_diff_vs_unrolled']:.1e}",
        )
    return main, steps


def print_table(console: Console, table: Table) -> None:
    """Print a markdown-boxed table without the blank padding lines rich puts around it."""
    with console.capture() as captured:
        console.print(table)
    console.print(
        "\n".join(line.rstrip() for line in captured.get().splitlines() if line.strip()),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T=4 only, fewer repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to PATH as JSON")
    parser.add_argument("--reps", type=int, help="timed repetitions per call (default 7, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs per call (default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra_op_num_threads (default 2)")
    parser.add_argument(
        "--allow-spinning",
        action="store_true",
        help="keep onnxruntime's spin-waiting intra-op threads (default: off, see session())",
    )
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="run the spikec ops as the ONNX functions even where the native kernels are built",
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    timesteps = [4] if args.quick else [4, 8, 16]
    stateful_t = 8 if 8 in timesteps else timesteps[0]

    out = Console(soft_wrap=True, highlight=False)
    out.width = max(out.width, 200)  # tables are markdown: never squeeze them to a narrow terminal
    log = Console(stderr=True)
    load_start = os.getloadavg()
    started = time.perf_counter()
    log.print("[dim]loading fixtures[/dim]")
    loads = workloads()
    results = {w.name: bench(w, timesteps, stateful_t, args, log) for w in loads}
    load_end = os.getloadavg()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux

    main_table, stateful_table = tables(results, {w.name: w.describe for w in loads})
    spikec_ops = " / ".join(
        sorted({row["spikec_ops"] for r in results.values() for row in [*r["rows"], r["stateful"]]})
    )
    out.print(
        f"spikec ECMT benchmark{' (--quick)' if args.quick else ''}: onnxruntime {ort.__version__}, "
        f"CPUExecutionProvider, intra_op_num_threads={args.threads}, inter_op_num_threads=1, sequential, "
        f"allow_spinning={int(args.allow_spinning)}, graph optimizations ORT_ENABLE_ALL (default); "
        f"spikec ops ran as {spikec_ops}; {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    out.print(
        f"Times: median of {args.reps} repetitions after {args.warmup} warm-up (a call under 50 ms is "
        "repeated within a repetition and averaged), ANN and SNN interleaved in one process on the same "
        "batch (batch size in parentheses; MiniLM seq 32). Compile time: spikec.compile in memory, "
        "calibration included. Fidelity: final output after T steps, over the full evaluation set "
        "(digits: 540 test images; MiniLM: 64 sentences)."
    )
    out.print()
    print_table(out, main_table)
    out.print()
    out.print(
        f"Stateful mode (one step per onnxruntime run, driven by run_stateful) at T={stateful_t}, timed in the "
        "same interleaving; ratio = stateful time per step / (unrolled time / T)."
    )
    out.print()
    print_table(out, stateful_table)
    out.print()
    out.print(
        f"load average (1/5/15 min): start {' / '.join(f'{x:.2f}' for x in load_start)}, "
        f"end {' / '.join(f'{x:.2f}' for x in load_end)}; wall {time.perf_counter() - started:.0f} s; "
        f"peak RSS {peak_rss_mib:.0f} MiB (whole process, incl. torch/transformers imported by the fixtures)"
    )

    if args.json:
        report = {
            "config": {
                "quick": args.quick,
                "timesteps": timesteps,
                "stateful_timesteps": stateful_t,
                "reps": args.reps,
                "warmup": args.warmup,
                "intra_op_num_threads": args.threads,
                "inter_op_num_threads": 1,
                "allow_spinning": args.allow_spinning,
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "spikec_ops": spikec_ops,
            },
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "peak_rss_mib": peak_rss_mib,
            "workloads": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.print(f"[dim]wrote {args.json}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
