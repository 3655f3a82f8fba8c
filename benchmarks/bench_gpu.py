"""spikec models on onnxruntime's CUDA execution provider: where each node runs, and SNN/(T x ANN) there.

For the digits ViT and MiniLM and each method (ecmt, spikezip, sta, ttfs), the unrolled model is
compiled, then run in sessions with providers [PROVIDER, CPUExecutionProvider]:

* placement: one profiled run; onnxruntime's profile names the provider of every node of the main
  graph it ran. Listed: nodes per provider, the op types that fell back to the CPU, and the Memcpy
  nodes onnxruntime inserted between the device and the host. A Scan's body runs within the Scan
  node's event: its nodes are not in the profile. --log-placement has onnxruntime log at VERBOSE
  (stderr) while the profiled session is created; its "Node placements" lines count the nodes per
  provider with the Scan bodies' nodes, and name the op type of each node off the first provider.
* timing: the ANN (for SpikeZIP-TF the QANN it converts) and the SNN, interleaved, median ms per batch,
  inputs fed from host memory as a user feeds them; SNN/(T x ANN) with T = 1 for TTFS (one pass).
* agreement: the SNN's output against the same model on the CPU provider alone (ONNX functions, as
  the device session runs them): max |difference| over max |CPU output|, and the spikes that changed
  (sum of |count differences| over the spikes fired) where the model counts them.

Every session runs the spikec ops as their ONNX functions: a session with a device provider never
registers the CPU-only native kernels (runtime/session.py, docs/gpu.md), and with the CPU provider
the script runs the same graphs.

    python benchmarks/bench_gpu.py [--provider NAME] [--only digits-ViT|MiniLM] [--methods ecmt sta ...]
        [--timesteps 8] [--samples N] [--calibration N] [--reps N] [--log-placement] [--json PATH]

Without --provider it runs CUDAExecutionProvider and exits with status 2 where onnxruntime has none;
--provider CPUExecutionProvider runs the same measurements on the CPU (to check the script itself).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure  # noqa: E402
from examples import fixtures  # noqa: E402

CPU = "CPUExecutionProvider"
METHODS = ("ecmt", "spikezip", "sta", "ttfs")
MEMCPY_OPS = ("MemcpyFromHost", "MemcpyToHost")


def node_placement(profile: str | Path) -> dict[str, tuple[str, str]]:
    """Node name -> (op type, provider) of every node an onnxruntime profile recorded a kernel run for."""
    events = json.loads(Path(profile).read_text())
    return {
        event["name"].removesuffix("_kernel_time"): (event["args"]["op_name"], event["args"]["provider"])
        for event in events
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and "provider" in event.get("args", {})
    }


def placement_summary(placement: Mapping[str, tuple[str, str]], provider: str) -> dict:
    """Nodes per provider; the op types (with counts) that ran elsewhere than on ``provider``, Memcpy
    nodes apart; the Memcpy nodes onnxruntime inserted."""
    per_provider = collections.Counter(p for _, p in placement.values())
    elsewhere = collections.Counter(op for op, p in placement.values() if p != provider and op not in MEMCPY_OPS)
    memcpy = collections.Counter(op for op, _ in placement.values() if op in MEMCPY_OPS)
    return {"nodes": dict(per_provider), "fallback_ops": dict(elsewhere), "memcpy": dict(memcpy)}


def profiled_placement(
    model: onnx.ModelProto | Path, providers: list[str], feeds: Mapping[str, np.ndarray], log_placement: bool = False
) -> dict:
    """One run of ``model`` with profiling on; the placement its profile records. With ``log_placement``,
    onnxruntime logs at VERBOSE, its node placement among those lines."""
    with tempfile.TemporaryDirectory(prefix="spikec-gpu-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 0 if log_placement else 4
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = InferenceSession(model, options, providers=providers, native=False)
        run(session, feeds)
        return node_placement(session.end_profiling())


def workloads(samples: int | None, calibration: int | None) -> list[dict]:
    digits = fixtures.digits_data()
    sentences = fixtures.calibration_sentences()
    return [
        {
            "name": "digits-ViT",
            "model": fixtures.digits_vit(),
            "output": "logits",
            "options": {},
            "calibration": {"pixels": digits["x_train"][: calibration or 256]},
            "batch": {"pixels": digits["x_test"][: samples or 64]},
        },
        {
            "name": "MiniLM",
            "model": fixtures.minilm(),
            "output": "sentence_embedding",
            "options": {"per_channel": True, "percentile": 90.0},
            "calibration": fixtures.minilm_inputs(sentences[: calibration or len(sentences)], seq_len=32),
            "batch": fixtures.minilm_inputs(fixtures.evaluation_sentences()[: samples or 8], seq_len=32),
        },
    ]


def compiled(w: dict, method: str, timesteps: int) -> tuple[onnx.ModelProto | Path, onnx.ModelProto, int]:
    """(the ANN the SNN converts, the unrolled SNN, the T of SNN/(T x ANN))."""
    if method == "spikezip":
        ann = spikec.quantize(w["model"], w["calibration"], progress=False)
    else:
        ann = w["model"]
    options = {"method": method, "progress": False}
    if method != "ttfs":
        options["timesteps"] = timesteps
    if method == "ecmt":
        options.update(w["options"])
    return ann, spikec.compile(ann, w["calibration"], **options), timesteps if method != "ttfs" else 1


def agreement(got: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], output: str) -> tuple[float, float]:
    """(max |difference| of ``output`` over its max |reference|, changed spikes over spikes fired)."""
    diff = float(np.max(np.abs(got[output] - reference[output])) / np.max(np.abs(reference[output])))
    counts = [name for name in reference if name.startswith("spikec.spikes") and not name.endswith(".steps")]
    fired = sum(float(np.sum(reference[name])) for name in counts)
    changed = sum(float(np.sum(np.abs(got[name] - reference[name]))) for name in counts)
    return diff, (changed / fired if fired else 0.0)


def bench(w: dict, method: str, args, log: Console) -> dict:
    log.print(f"[dim]{w['name']} {method}: compile[/dim]")
    ann_model, snn_model, steps = compiled(w, method, args.timesteps)
    providers = list(dict.fromkeys([args.provider, CPU]))
    batch = w["batch"]
    log.print(f"[dim]{w['name']} {method}: profile, time, compare[/dim]")
    placement = profiled_placement(snn_model, providers, batch, args.log_placement)
    summary = placement_summary(placement, args.provider)
    # for --json: every node that ran off the provider, by name
    summary["off_provider_nodes"] = {
        name: list(where) for name, where in placement.items() if where[1] != args.provider
    }
    ann = InferenceSession(ann_model, providers=providers, native=False)
    snn = InferenceSession(snn_model, providers=providers, native=False)
    cpu = InferenceSession(snn_model, providers=[CPU], native=False)
    diff, spikes_changed = agreement(run(snn, batch), run(cpu, batch), w["output"])
    samples = measure({"ann": lambda: run(ann, batch), "snn": lambda: run(snn, batch)}, reps=args.reps, warmup=2)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "workload": w["name"],
        "method": method,
        "batch": len(next(iter(batch.values()))),
        "T": steps,
        "provider": args.provider,
        "ann_ms": ms["ann"],
        "snn_ms": ms["snn"],
        "ratio": ms["snn"] / (steps * ms["ann"]),
        "diff_vs_cpu": diff,
        "spikes_changed_vs_cpu": spikes_changed,
        **summary,
    }


def table(rows: list[dict]) -> Table:
    t = Table(box=box.MARKDOWN, title=f"spikec on {rows[0]['provider']}: unrolled models, ms per batch (median)")
    for heading in (
        "workload (batch)",
        "method",
        "T",
        "ANN",
        "SNN",
        "SNN/(TxANN)",
        "nodes per provider",
        "ran elsewhere (op: nodes)",
        "Memcpy",
        "max |diff| / max |CPU|",
        "spikes changed",
    ):
        t.add_column(heading, justify="left" if heading in ("workload (batch)", "method") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            f"{r['workload']} ({r['batch']})",
            r["method"],
            str(r["T"]),
            f"{r['ann_ms']:.2f}",
            f"{r['snn_ms']:.1f}",
            f"{r['ratio']:.2f}",
            _counts(r["nodes"]),
            _counts(r["fallback_ops"]) or "none",
            _counts(r["memcpy"]) or "none",
            f"{r['diff_vs_cpu']:.1e}",
            f"{r['spikes_changed_vs_cpu']:.1e}",
        )
    return t


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{name.removesuffix('ExecutionProvider')}: {n}" for name, n in sorted(counter.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--provider",
        help="execution provider to place the models on (default CUDAExecutionProvider; "
        "CPUExecutionProvider checks the script without a GPU)",
    )
    parser.add_argument("--only", choices=["digits-ViT", "MiniLM"], help="run one workload")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--timesteps", type=int, default=8, help="T of the stepped methods (not ttfs)")
    parser.add_argument("--samples", type=int, help="batch size timed and compared (default 64 images, 8 sentences)")
    parser.add_argument("--calibration", type=int, help="calibration samples (default 256 images, all sentences)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument(
        "--log-placement",
        action="store_true",
        help="onnxruntime logs at VERBOSE (stderr) for the profiled sessions: its 'Node placements' "
        "lines include the Scan bodies' nodes, which the profile does not",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows to PATH as JSON")
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    if args.provider is None:
        if "CUDAExecutionProvider" not in available:
            print(
                f"bench_gpu: onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(available)}): "
                f"install onnxruntime-gpu on a CUDA machine, or pass --provider CPUExecutionProvider",
                file=sys.stderr,
            )
            return 2
        args.provider = "CUDAExecutionProvider"
    elif args.provider not in available:
        print(
            f"bench_gpu: argument --provider={args.provider}: not among onnxruntime's ({', '.join(available)})",
            file=sys.stderr,
        )
        return 2
    console, log = Console(width=400), Console(stderr=True)
    log.print(f"[dim]onnxruntime {ort.__version__}, providers {available}, device {ort.get_device()}[/dim]")
    rows = [
        bench(w, method, args, log)
        for w in workloads(args.samples, args.calibration)
        if args.only in (None, w["name"])
        for method in args.methods
    ]
    console.print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    console.print(
        "SNN/(TxANN): SNN time over T ANN runs (T = 1 for ttfs; for spikezip the ANN is its QANN). "
        "Ran elsewhere: op types of the nodes the profile places off the provider (Memcpy apart). "
        "Diff and spikes changed: against the same SNN on the CPU provider alone.",
        highlight=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
