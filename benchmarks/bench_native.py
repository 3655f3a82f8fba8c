"""Native kernels vs ONNX functions: the same spikec models timed both ways, side by side.

* digits-ViT: batch 64 test images, calibrated on the first 256 training images.
* MiniLM: batch 8 evaluation sentences, seq 32, calibrated on calibration_sentences() with
  per_channel=True, percentile=90.0.

For each T the ANN, the unrolled SNN with the ONNX functions (portable) and with the native kernels
are timed interleaved in this process, on the same batch, after warm-up; the median is reported.
So is one step of the stateful model (driven with the states of a few earlier steps), both ways,
against one T-th of the unrolled run, and the same SNN run the way the papers' code runs it: a PyTorch
loop over the T steps calling the whole network per step (benchmarks/torch_reference.py, eager, same
thread count). Peak memory: each variant runs once in a fresh process; the growth of its resident set
(VmHWM) over the same process right after its imports. The native library must be built (`make native`).

    /work/venv/bin/python benchmarks/bench_native.py [--method ecmt|spikezip|sta] [--timesteps 4 8 16] [--reps N]
        [--threads N] [--spin run|always|never]

With --ratios, only the unrolled SNN is timed, portable against native, for each of the methods given
(several, or all: ECMT, SpikeZIP-TF, STA and TTFS, which has no T), and the table gives portable/native:
the median over the repetitions of each repetition's ratio (the two timed back to back), which a shared
machine's changing load moves less than it moves the times.

    /work/venv/bin/python benchmarks/bench_native.py --ratios [--method all] [--timesteps 8] [--reps N]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, Stepper, native, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure as interleaved_samples  # noqa: E402
from benchmarks.bench_ecmt import median_ratio  # noqa: E402
from benchmarks.torch_reference import TorchStepSimulator  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Runs one variant once in a fresh process and prints the growth of its peak resident set in MiB.
_PEAK_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
kind, model, feeds_path, timesteps, threads = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
feeds = dict(np.load(feeds_path))
if kind == "torch":
    import onnx, torch
    from benchmarks.torch_reference import TorchStepSimulator
    torch.set_num_threads(threads)
else:
    import onnxruntime as ort
    from spikec.runtime import InferenceSession, run
def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
base = rss("VmRSS:")
if kind == "torch":
    TorchStepSimulator(onnx.load(model)).run(feeds, timesteps)
else:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    run(InferenceSession(model, options, native=kind == "native"), feeds)
print((rss("VmHWM:") - base) / 1024)
"""


def peak_mib(kind: str, path: Path, feeds: Mapping[str, np.ndarray], timesteps: int, threads: int) -> float:
    with tempfile.TemporaryDirectory(prefix="spikec-peak-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK_SCRIPT,
                str(REPO),
                kind,
                str(path),
                str(Path(tmp) / "feeds.npz"),
                str(timesteps),
                str(threads or os.cpu_count()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1])


def workloads() -> list[dict]:
    digits = fixtures.digits_data()
    minilm_batch = fixtures.minilm_inputs(fixtures.evaluation_sentences()[:8], seq_len=32)
    return [
        {
            "name": "digits-ViT",
            "model": fixtures.digits_vit(),
            "calibration": {"pixels": digits["x_train"][:256]},
            "batch": {"pixels": digits["x_test"][:64]},
            "options": {},
            "output": "logits",
        },
        {
            "name": "MiniLM",
            "model": fixtures.minilm(),
            "calibration": fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32),
            "batch": minilm_batch,
            "options": {"per_channel": True, "percentile": 90.0},
            "output": "sentence_embedding",
        },
    ]


def measure(
    calls: Mapping[str, Callable[[], object]], reps: int, warmup: int = 2, min_sample_ms: float = 30.0
) -> dict[str, float]:
    """Median ms per call of bench_ecmt's interleaved measurement."""
    samples = interleaved_samples(calls, reps=reps, warmup=warmup, min_sample_ms=min_sample_ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def alone_with_spinning(
    makers: Mapping[str, Callable[[], Callable[[], object]]], reps: int, rounds: int = 3
) -> dict[str, float]:
    """Median ms per call of each variant under onnxruntime's default threading, where idle pool threads
    spin between ops (a step's many small parallel sections then skip a thread wake-up each), with one
    spinning session alive at a time: each round makes a variant's call (and session), times it and drops
    it, the variants alternating so that the VM's drift reaches them alike."""
    samples: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            call = make()
            samples[name].append(measure({name: call}, reps=reps)[name])
            del call
            gc.collect()
    return {name: statistics.median(values) for name, values in samples.items()}


def alone_in_fresh_process(model: Path, stateful: Path, batch: Mapping[str, np.ndarray], args) -> dict[str, float]:
    """alone_with_spinning for the native unrolled run and step, in a fresh process, so that sessions
    spinning under onnxruntime's defaults never share the benchmark's process: in three runs in a row
    the next T's interleaved timings came out up to 1.7x slower after them, the ANN's included (not
    reproduced with single such sessions, and this VM has slow phases of its own: a precaution)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_alone, model, stateful, dict(batch), args.threads, args.reps).result()


def _alone(model: Path, stateful: Path, batch: dict[str, np.ndarray], threads: int, reps: int) -> dict[str, float]:
    return alone_with_spinning(
        {
            "native_alone": lambda: functools.partial(
                run, InferenceSession(model, session_options(threads, "always")), batch
            ),
            "step_native_alone": lambda: step_call(
                InferenceSession(stateful, session_options(threads, "always")), batch
            ),
        },
        reps=reps,
    )


def step_call(session: InferenceSession, batch: Mapping[str, np.ndarray], warm_steps: int = 3) -> Callable[[], object]:
    """One stateful step the way run_stateful takes it (a Stepper: with the native kernels the states are
    updated in place), after warm_steps steps; each call runs the next step."""
    stepper = Stepper(session, batch)
    for _ in range(warm_steps):
        stepper.step()
    return stepper.step


def _compile_options(w: dict, method: str) -> dict:
    """ECMT with the settings of tests/test_ecmt.py, the other methods with their defaults."""
    return {**w["options"], "method": method} if method == "ecmt" else {"method": method}


def ratios(w: dict, method: str, timesteps: list[int], args, log: Console) -> list[dict]:
    """Portable against native on the unrolled SNN, for each T (TTFS: one pass, no T)."""
    rows = []
    for t in timesteps if method != "ttfs" else [None]:
        log.print(f"[dim]{w['name']} {method}: T={t} compile + time[/dim]")
        rows.append(_ratio_row(w, method, t, args))
        gc.collect()  # the sessions of this T
    return rows


def _ratio_row(w: dict, method: str, t: int | None, args) -> dict:
    """Both sessions timed interleaved: each repetition's ratio and the medians."""
    model = spikec.compile(
        w["model"],
        w["calibration"],
        progress=False,
        **_compile_options(w, method),
        **({} if t is None else {"timesteps": t}),
    )
    portable, fast = session_pair(model, args.threads, args.spin)
    batch = w["batch"]
    want, got = run(portable, batch), run(fast, batch)
    samples = interleaved_samples(
        {"portable": lambda: run(portable, batch), "native": lambda: run(fast, batch)},
        reps=args.reps,
        warmup=2,
        min_sample_ms=30.0,
    )
    return {
        "workload": f"{w['name']} ({len(next(iter(batch.values())))})",
        "method": method,
        "T": t,
        "portable": statistics.median(samples["portable"]),
        "native": statistics.median(samples["native"]),
        "ratio": median_ratio(samples, "portable", "native"),
        "identical": all(np.array_equal(want[name], got[name]) for name in want),
    }


def ratio_table(rows: list[dict]) -> Table:
    t = Table(box=box.MARKDOWN, title="spikec: ONNX functions (portable) vs native kernels, unrolled SNN")
    for h in ["workload (batch)", "method", "T", "portable ms", "native ms", "portable/native", "outputs identical"]:
        t.add_column(h, justify="left" if h in ("workload (batch)", "method") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["workload"],
            r["method"],
            "-" if r["T"] is None else str(r["T"]),
            f"{r['portable']:.1f}",
            f"{r['native']:.1f}",
            f"{r['ratio']:.2f}x",
            "yes" if r["identical"] else "no",
        )
    return t


def bench(w: dict, timesteps: list[int], args, log: Console) -> list[dict]:
    options = session_options(args.threads, args.spin)
    batch = w["batch"]
    ann = InferenceSession(w["model"], options, native=False)
    compile_options = _compile_options(w, args.method)
    ann_peak = peak_mib("ann", w["model"], batch, 1, args.threads)
    rows = []
    for t in timesteps:
        log.print(f"[dim]{w['name']}: T={t} compile + time[/dim]")
        # STA's thresholds depend on T: both forms are compiled for it
        stateful = spikec.compile(
            w["model"], w["calibration"], timesteps=t, mode="stateful", progress=False, **compile_options
        )
        step_portable, step_native = (step_call(s, batch) for s in session_pair(stateful, args.threads, args.spin))
        simulator = TorchStepSimulator(stateful)
        model = spikec.compile(w["model"], w["calibration"], timesteps=t, progress=False, **compile_options)
        portable, fast = session_pair(model, args.threads, args.spin)
        native_out = run(fast, batch)
        portable_out = run(portable, batch)
        # SpikeZIP-TF's SpikeMatMuls sum in another order than MatMul: the model output, relative to its
        # range, and the spikes fired, which a flip changes
        diff = float(
            np.max(np.abs(native_out[w["output"]] - portable_out[w["output"]]))
            / np.max(np.abs(portable_out[w["output"]]))
        )
        spike_counts = [o for o in native_out if o.startswith("spikec.spikes")]
        spikes_diff = max(
            (float(np.sum(np.abs(native_out[o] - portable_out[o])) / np.sum(portable_out[o])) for o in spike_counts),
            default=0.0,
        )
        torch_out = simulator.run(batch, t)
        cosine_torch = cosine(native_out[w["output"]], torch_out[w["output"]])
        ms = measure(
            {
                "ann": lambda: run(ann, batch),
                "portable": lambda: run(portable, batch),
                "native": lambda: run(fast, batch),
                "step_portable": step_portable,
                "step_native": step_native,
            },
            reps=args.reps,
        )
        with tempfile.TemporaryDirectory(prefix="spikec-bench-") as tmp:  # for the fresh processes
            paths = {"model": Path(tmp) / "model.onnx", "stateful": Path(tmp) / "stateful.onnx"}
            onnx.save(model, paths["model"])
            onnx.save(stateful, paths["stateful"])
            ms.update(alone_in_fresh_process(paths["model"], paths["stateful"], batch, args))
            # the PyTorch loop is slow: fewer samples, timed on its own after the interleaved ones
            ms.update(measure({"torch": lambda: simulator.run(batch, t)}, reps=max(3, args.reps // 3), warmup=1))
            peaks = {
                kind: peak_mib(kind, paths[form], batch, t, args.threads)
                for kind, form in (("portable", "model"), ("native", "model"), ("torch", "stateful"))
            }
        rows.append(
            {
                "workload": f"{w['name']} ({len(next(iter(batch.values())))})",
                "T": t,
                **ms,
                "diff": diff,
                "spikes_diff": spikes_diff,
                "cosine_torch": cosine_torch,
                "peak_ann": ann_peak,
                **{f"peak_{k}": v for k, v in peaks.items()},
            }
        )
        # the timing lambdas close over these names: drop the sessions, keep the names
        portable = fast = model = stateful = simulator = step_portable = step_native = None
        gc.collect()
    return rows


# The methods the full comparison runs (T steps, a stateful form, the PyTorch loop)
METHODS = ("ecmt", "spikezip", "sta")

# How idle intra-op threads wait (--spin): "run": they spin while a run lasts and stop when it returns
# (session.force_spinning_stop), so that the sessions timed in turn do not take each other's cores;
# "always": onnxruntime's default, they go on spinning after a run; "never": they sleep between ops,
# and each of a step's ~200 small parallel sections waits for one to wake.
SPIN_CONFIG = {
    "run": {"session.force_spinning_stop": "1"},
    "always": {},
    "never": {"session.intra_op.allow_spinning": "0"},
}


def session_options(threads: int, spin: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in SPIN_CONFIG[spin].items():
        options.add_session_config_entry(key, value)
    return options


def session_pair(model, threads: int, spin: str) -> tuple[InferenceSession, InferenceSession]:
    """The model with the portable ONNX functions and with the native kernels, each with its own options
    (registering the kernels marks the options it is given)."""
    portable = InferenceSession(model, session_options(threads, spin), native=False)
    fast = InferenceSession(model, session_options(threads, spin), native=True)
    assert fast.native, "native kernels not registered: run `make native`"
    return portable, fast


def table(rows: list[dict]) -> Table:
    t = Table(box=box.MARKDOWN, title="spikec: ONNX functions (portable) vs native kernels, ms per batch")
    headings = [
        "workload (batch)",
        "T",
        "ANN",
        "SNN portable",
        "SNN native",
        "PyTorch loop",
        "native speedup",
        "PyTorch/native",
        "portable SNN/(TxANN)",
        "native SNN/(TxANN)",
        "step portable",
        "portable/T",
        "step native",
        "native/T",
        "alone, spinning: step / (native/T)",
        "peak MiB ANN/port./native/PyTorch",
        "max |native-portable| / max |out|",
        "spikes native vs portable",
        "cos PyTorch vs native",
    ]
    for h in headings:
        t.add_column(h, justify="left" if h.startswith("workload") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["workload"],
            str(r["T"]),
            f"{r['ann']:.2f}",
            f"{r['portable']:.1f}",
            f"{r['native']:.1f}",
            f"{r['torch']:.1f}",
            f"{r['portable'] / r['native']:.2f}x",
            f"{r['torch'] / r['native']:.2f}x",
            f"{r['portable'] / (r['T'] * r['ann']):.2f}",
            f"{r['native'] / (r['T'] * r['ann']):.2f}",
            f"{r['step_portable']:.2f}",
            f"{r['portable'] / r['T']:.2f}",
            f"{r['step_native']:.2f}",
            f"{r['native'] / r['T']:.2f}",
            f"{r['step_native_alone']:.2f} / {r['native_alone'] / r['T']:.2f} = "
            f"{r['step_native_alone'] / (r['native_alone'] / r['T']):.2f}",
            " / ".join(f"{r[k]:.0f}" for k in ("peak_ann", "peak_portable", "peak_native", "peak_torch")),
            f"{r['diff']:.1e}",
            f"{r['spikes_diff']:.1e}",
            f"{r['cosine_torch']:.5f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument(
        "--spin",
        choices=sorted(SPIN_CONFIG),
        default="run",
        help="idle intra-op threads spin while a run lasts (default), always (onnxruntime's default) or never",
    )
    parser.add_argument("--only", choices=["digits-ViT", "MiniLM"], help="run one workload")
    parser.add_argument(
        "--method",
        choices=[*METHODS, "ttfs", "all"],
        nargs="+",
        default=["ecmt"],
        help="conversion method (ECMT uses the settings of tests/test_ecmt.py, the others defaults); "
        "several, ttfs and all (every method) with --ratios only",
    )
    parser.add_argument(
        "--ratios",
        action="store_true",
        help="time only the unrolled SNN, portable against native, for each method given",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows to PATH as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    console, log = Console(width=400), Console(stderr=True)
    if not native.available():
        log.print("native library not built: run `make native`")
        return 1
    log.print(
        f"[dim]library {native.library_path()}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
        f"intra-op threads {args.threads or 'default'}[/dim]"
    )
    methods = [*METHODS, "ttfs"] if "all" in args.method else list(dict.fromkeys(args.method))
    if args.ratios:
        rows = [
            row
            for w in workloads()
            if args.only in (None, w["name"])
            for method in methods
            for row in ratios(w, method, args.timesteps, args, log)
        ]
        console.print(ratio_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if len(methods) != 1 or methods[0] not in METHODS:
        parser.error("without --ratios: one method of " + ", ".join(METHODS))
    args.method = methods[0]
    rows = []
    for w in workloads():
        if args.only in (None, w["name"]):
            rows += bench(w, args.timesteps, args, log)
    console.print(f"method {args.method}")
    console.print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(
        "ANN/SNN: ms per batch (median). SNN/(TxANN): SNN time over T ANN runs. step: one stateful "
        "step (ms), next to the unrolled time / T. PyTorch loop: the same SNN, T steps of the stateful "
        "graph in eager PyTorch (torch_reference.py), ms per batch. Peak: MiB over a fresh process's "
        "imports, one run. Alone, spinning: the native step and unrolled run each timed with no other "
        "session running and onnxruntime's default threading (idle pool threads spin on after a run), "
        f"the rest interleaved, idle threads spinning: {args.spin}. Spikes native vs portable: sum of |count differences| over the spikes fired.",
        highlight=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
