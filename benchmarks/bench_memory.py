"""Peak memory and wall time of `spikec.compile` on MiniLM and a BERT-base-sized model.

* MiniLM: all-MiniLM-L6-v2 (22.7M parameters), seq 32, calibrated on calibration_sentences() (128)
  with per_channel=True, percentile=90 (the settings of tests/test_ecmt.py).
* BERT-base: fixtures.bert_base_random(), a random-init (seed 0) BertModel of BERT-base size (hidden 768,
  12 layers, 12 heads, intermediate 3072; 110M parameters), calibrated on 128 random token sequences of
  length 32 (ids in [1, 30522), right-padded to >= 8 tokens).

Every compile runs in a fresh child process; its peak RSS is the child's own ru_maxrss, read with
os.wait4, so nothing of this process or of other children is counted. "import baseline" is the peak of a
child that only imports spikec and loads the calibration data; "compile" is the difference. Times are
the wall time of `spikec.compile` (load, canonicalize, calibrate, rewrite, emit, save), inside the child.
The "run estimate" column is the memory guard's estimate (spikec/memory.py) for running the result on a
batch of 32: what `compile` compares with --memory-budget.

    /work/venv/bin/python benchmarks/bench_memory.py [--timesteps 8 ...] [--modes unrolled stateful]
                                                     [--models minilm bert-base] [--json PATH]

Runs offline (fixtures are built and cached under .cache/fixtures first, outside the measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # the parent stays light: numpy, json, rich

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("minilm", "bert-base")


def _workload(name: str):
    """(model path, calibration feeds, compile options)."""
    from examples import fixtures

    if name == "minilm":
        return (
            fixtures.minilm(),
            fixtures.minilm_inputs(fixtures.calibration_sentences()),
            {"per_channel": True, "percentile": 90.0},
        )
    if name == "bert-base":
        rng = np.random.default_rng(0)
        n, seq = 128, 32
        lengths = rng.integers(8, seq + 1, size=n)
        feeds = {
            "input_ids": rng.integers(1, 30522, size=(n, seq), dtype=np.int64),
            "attention_mask": (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64),
        }
        return fixtures.bert_base_random(), feeds, {}
    raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")


def _child(action: str, spec: str, timesteps: int, mode: str, out_dir: str) -> None:
    """Runs in a child process and prints one JSON line.

    prepare: build the fixtures and write the calibration .npz (torch etc. stay out of the parent);
    baseline: only the imports and the calibration data; compile: one measured compile;
    estimate: the memory guard's run estimate for a batch of 32."""
    if action == "prepare":
        model, feeds, options = _workload(spec)
        calibration = os.path.join(out_dir, f"{spec}.npz")
        np.savez(calibration, **feeds)
        print(json.dumps({"model": str(model), "calibration": calibration, "options": options}))
        return
    import onnxruntime

    import spikec
    from spikec.compiler import compile as _  # noqa: F401 - the baseline includes the compiler's imports

    onnxruntime.set_default_logger_severity(3)
    job = json.loads(spec)
    with np.load(job["calibration"]) as data:
        feeds = {k: data[k] for k in data.files}
    result = {}
    if action == "compile":
        start = time.perf_counter()
        spikec.compile(
            job["model"],
            feeds,
            os.path.join(out_dir, "snn.onnx"),
            timesteps=timesteps,
            mode=mode,
            progress=False,
            memory_budget=2**50,
            **job["options"],
        )
        result["compile_s"] = time.perf_counter() - start
        result["output_bytes"] = sum(p.stat().st_size for p in Path(out_dir).iterdir())
    elif action == "estimate":
        import onnx_graphsurgeon as gs
        from spikec.passes import ecmt
        from spikec.passes.canonicalize import canonicalize
        from spikec.passes.loader import load_model
        from spikec.passes.patterns import find_regions

        from spikec import memory

        ann = canonicalize(load_model(job["model"]))
        sites = ecmt.neuron_sites(find_regions(gs.import_onnx(ann)))  # as compile does
        result["estimate"] = memory.estimate(ann, feeds, batch=32, neuron_sites=sites).bytes(mode, timesteps)
    print(json.dumps(result))


def _run_child(action: str, spec: str, timesteps: int = 0, mode: str = "unrolled", out_dir: str | None = None) -> dict:
    """Run one child and reap it with os.wait4, which returns that child's own rusage.

    The parent stays small (no torch, no model loaded): Linux starts a child's ru_maxrss from the RSS
    of the process it was forked from."""
    with tempfile.TemporaryDirectory(prefix="spikec-bench-mem-") as scratch:
        argv = [sys.executable, __file__, "--child", action, spec, str(timesteps), mode, out_dir or scratch]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout = proc.stdout.read()  # not communicate(): it would reap the child before wait4 can
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not stdout.strip():
        raise SystemExit(
            f"child {action} {mode} T={timesteps} failed with exit status {proc.returncode}:\n{stderr[-3000:]}"
        )
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--timesteps", nargs="+", type=int, default=[8])
    parser.add_argument("--modes", nargs="+", default=["unrolled"], choices=["unrolled", "stateful"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        action, spec, timesteps, mode, out_dir = args.child
        _child(action, spec, int(timesteps), mode, out_dir)
        return

    from rich.console import Console
    from rich.table import Table

    from spikec.memory import format_bytes, physical_memory

    console = Console(stderr=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="spikec-bench-mem-data-") as data_dir:
        for name in args.models:
            console.print(f"preparing {name} ...")
            job = _run_child("prepare", name, out_dir=data_dir)
            job.pop("peak_rss")
            spec = json.dumps(job)
            baseline = _run_child("baseline", spec)["peak_rss"]
            for mode in args.modes:
                for timesteps in args.timesteps:
                    console.print(f"compiling {name} T={timesteps} {mode} ...")
                    result = _run_child("compile", spec, timesteps, mode)
                    rows.append(
                        {
                            "model": name,
                            "model_bytes": Path(job["model"]).stat().st_size,
                            "mode": mode,
                            "timesteps": timesteps,
                            "baseline_rss": baseline,
                            **result,
                            "compile_rss": result["peak_rss"] - baseline,
                            "run_estimate_batch32": _run_child("estimate", spec, timesteps, mode)["estimate"],
                        }
                    )
    table = Table(
        title=f"spikec compile: peak memory and time ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {format_bytes(physical_memory() or 0)} RAM)"
    )
    for column in (
        "model",
        "ONNX size",
        "mode",
        "T",
        "peak RSS",
        "import baseline",
        "compile (peak - baseline)",
        "compile time",
        "output size",
        "run estimate (batch 32)",
    ):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            format_bytes(r["model_bytes"]),
            r["mode"],
            str(r["timesteps"]),
            format_bytes(r["peak_rss"]),
            format_bytes(r["baseline_rss"]),
            format_bytes(r["compile_rss"]),
            f"{r['compile_s']:.1f} s",
            format_bytes(r["output_bytes"]),
            format_bytes(r["run_estimate_batch32"]),
        )
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
