"""Native kernels vs ONNX functions: the same spikec models timed both ways, side by side.

* digits-ViT: batch 64 test images, calibrated on the first 256 training images.
* MiniLM: batch 8 evaluation sentences, seq 32, calibrated on calibration_sentences() with
  per_channel=True, percentile=90.0.

For each T the ANN, the unrolled SNN with the ONNX functions (portable) and with the native kernels
are timed interleaved in this process, on the same batch, after warm-up; the median is reported.
So is one step of the stateful model (driven with the states of a few earlier steps), both ways,
against one T-th of the unrolled run. The native library must be built (`make native`).

    /work/venv/bin/python benchmarks/bench_native.py [--timesteps 4 8 16] [--reps N] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure as interleaved_samples  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.runtime import InferenceSession, native, run  # noqa: E402
from spikec.runtime.layout import NEXT_STATE_PREFIX, STATE_PREFIX, TIME_INPUT  # noqa: E402


def workloads() -> list[dict]:
    digits = fixtures.digits_data()
    minilm_batch = fixtures.minilm_inputs(fixtures.evaluation_sentences()[:8], seq_len=32)
    return [
        {"name": "digits-ViT", "model": fixtures.digits_vit(), "calibration": {"pixels": digits["x_train"][:256]},
         "batch": {"pixels": digits["x_test"][:64]}, "options": {}},
        {"name": "MiniLM", "model": fixtures.minilm(),
         "calibration": fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32),
         "batch": minilm_batch, "options": {"per_channel": True, "percentile": 90.0}},
    ]


def measure(calls: Mapping[str, Callable[[], object]], reps: int, warmup: int = 2,
            min_sample_ms: float = 30.0) -> dict[str, float]:
    """Median ms per call of bench_ecmt's interleaved measurement."""
    samples = interleaved_samples(calls, reps=reps, warmup=warmup, min_sample_ms=min_sample_ms)
    return {name: statistics.median(values) for name, values in samples.items()}


def step_call(session: InferenceSession, batch: Mapping[str, np.ndarray], warm_steps: int = 3) -> Callable[[], object]:
    """One stateful step (t = warm_steps + 1) from the states that warm_steps steps left."""
    outputs = session.model_outputs()
    states = {i.name: np.zeros([1] * len(i.shape), np.float32) for i in session.get_inputs()
              if i.name.startswith(STATE_PREFIX)}
    nexts = [NEXT_STATE_PREFIX + name[len(STATE_PREFIX):] for name in states]
    for t in range(1, warm_steps + 1):
        values = session.run(nexts, {**batch, TIME_INPUT: np.array(t, np.float32), **states})
        states = dict(zip(states, values))
    feeds = {**batch, TIME_INPUT: np.array(warm_steps + 1, np.float32), **states}
    return lambda: session.run(outputs + nexts, feeds)


def bench(w: dict, timesteps: list[int], args, log: Console) -> list[dict]:
    options = _options(args)

    def sessions(model) -> tuple[InferenceSession, InferenceSession]:
        portable = InferenceSession(model, options, native=False)
        fast = InferenceSession(model, _options(args), native=True)  # registering marks the options
        assert fast.native, "native kernels not registered"
        return portable, fast

    batch = w["batch"]
    ann = InferenceSession(w["model"], options, native=False)
    log.print(f"[dim]{w['name']}: compile stateful[/dim]")
    stateful = spikec.compile(w["model"], w["calibration"], mode="stateful", progress=False, **w["options"])
    step_portable, step_native = (step_call(s, batch) for s in sessions(stateful))
    rows = []
    for t in timesteps:
        log.print(f"[dim]{w['name']}: T={t} compile + time[/dim]")
        model = spikec.compile(w["model"], w["calibration"], timesteps=t, progress=False, **w["options"])
        portable, fast = sessions(model)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(run(portable, batch).values(), run(fast, batch).values()))
        ms = measure({"ann": lambda: run(ann, batch), "portable": lambda: run(portable, batch),
                      "native": lambda: run(fast, batch), "step_portable": step_portable,
                      "step_native": step_native}, reps=args.reps)
        rows.append({"workload": f"{w['name']} ({len(next(iter(batch.values())))})", "T": t, **ms, "diff": diff})
        del portable, fast, model
        gc.collect()
    return rows


def _options(args) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if not args.spin:  # idle pool threads of one session would spin on the cores the next one times
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def table(rows: list[dict]) -> Table:
    t = Table(box=box.MARKDOWN, title="spikec: ONNX functions (portable) vs native kernels, ms per batch")
    headings = ["workload (batch)", "T", "ANN", "SNN portable", "SNN native", "native speedup",
                "portable SNN/(TxANN)", "native SNN/(TxANN)", "step portable", "portable/T", "step native",
                "native/T", "max |native-portable|"]
    for h in headings:
        t.add_column(h, justify="left" if h.startswith("workload") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["workload"], str(r["T"]), f"{r['ann']:.2f}", f"{r['portable']:.1f}", f"{r['native']:.1f}",
                  f"{r['portable'] / r['native']:.2f}x", f"{r['portable'] / (r['T'] * r['ann']):.2f}",
                  f"{r['native'] / (r['T'] * r['ann']):.2f}", f"{r['step_portable']:.2f}",
                  f"{r['portable'] / r['T']:.2f}", f"{r['step_native']:.2f}", f"{r['native'] / r['T']:.2f}",
                  f"{r['diff']:.1e}")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--spin", action="store_true", help="let idle intra-op threads spin (onnxruntime's default)")
    parser.add_argument("--only", choices=["digits-ViT", "MiniLM"], help="run one workload")
    args = parser.parse_args(argv)
    console, log = Console(width=250), Console(stderr=True)
    if not native.available():
        log.print("native library not built: run `make native`")
        return 1
    log.print(f"[dim]library {native.library_path()}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
              f"intra-op threads {args.threads or 'default'}[/dim]")
    rows = []
    for w in workloads():
        if args.only in (None, w["name"]):
            rows += bench(w, args.timesteps, args, log)
    console.print(table(rows))
    console.print("ANN/SNN: ms per batch (median). SNN/(TxANN): SNN time over T ANN runs. step: one stateful "
                  "step (ms), next to the unrolled time / T.", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
