"""Compile memory and time against model size: random-init LLaMA-style decoders and BERT-style encoders
of about 10M, 100M, 350M and 1B parameters, exported with external data, compiled with ECMT and
SpikeZIP-TF (stateful), plus a stateful run of the largest LLaMA-style SNN on a few tokens.

* Models: transformers LlamaForCausalLM / BertModel from the configs in MODELS (random init, seed 0, eager
  attention), exported by torch.onnx (TorchScript, opset 17, dynamic batch and sequence) and saved with
  all weights in one external-data file. Cached under SPIKEC_CACHE/scale/ (several GiB: built once, in a
  child process, never downloaded); `--clean` removes them.
* Calibration: CALIBRATION sequences of SEQUENCE random token ids (ids in [1, vocab), no padding); compile
  keeps one in eight of them to verify the SNN on (spikec.compile's default).
* Every compile, and the run, is a fresh child process; its peak RSS is the child's own ru_maxrss (os.wait4),
  so nothing of this process or of other children is counted. "import" is the peak of a child that only
  imports spikec and reads the calibration data. Times are wall times inside the child.
* Growth: least-squares lines peak RSS = a + b * parameters and time = c + d * parameters over the sizes
  measured, per model family and method.

    python benchmarks/bench_scale.py [--models llama-10m llama-100m ...] [--methods ecmt spikezip]
                                     [--run-tokens 4 --run-steps 2] [--json PATH] [--clean]

Run the largest sizes alone on the machine: a 1B-parameter model has 4.4 GB of weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # the parent stays light: numpy, json, rich

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CALIBRATION, SEQUENCE = 8, 32
TIMESTEPS = 8

_LLAMA = dict(max_position_embeddings=128, use_cache=False, tie_word_embeddings=False)
_BERT = dict(max_position_embeddings=128)
MODELS: dict[str, tuple[str, dict]] = {
    "llama-10m": (
        "llama",
        dict(
            vocab_size=8192,
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=688,
            **_LLAMA,
        ),
    ),
    "llama-100m": (
        "llama",
        dict(
            vocab_size=16000,
            hidden_size=768,
            num_hidden_layers=10,
            num_attention_heads=12,
            num_key_value_heads=12,
            intermediate_size=2048,
            **_LLAMA,
        ),
    ),
    "llama-350m": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=1024,
            num_hidden_layers=22,
            num_attention_heads=16,
            num_key_value_heads=16,
            intermediate_size=2816,
            **_LLAMA,
        ),
    ),
    # TinyLlama-1.1B's shape (grouped-query attention, 4 key/value heads)
    "llama-1b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            **_LLAMA,
        ),
    ),
    "bert-10m": (
        "bert",
        dict(
            vocab_size=16000,
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=1024,
            **_BERT,
        ),
    ),
    "bert-100m": (
        "bert",
        dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            **_BERT,
        ),
    ),
    "bert-350m": (
        "bert",
        dict(
            vocab_size=30522,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            **_BERT,
        ),
    ),
    "bert-1b": (
        "bert",
        dict(
            vocab_size=30522,
            hidden_size=2048,
            num_hidden_layers=20,
            num_attention_heads=16,
            intermediate_size=8192,
            **_BERT,
        ),
    ),
}
METHODS = ("ecmt", "spikezip")
_EXPORT_REV = 1  # bump when the export below changes


def model_dir(name: str) -> Path:
    from examples import fixtures

    return (
        fixtures.CACHE_DIR / "scale" / f"{name}-{fixtures._digest((MODELS[name], _EXPORT_REV))}-"
        f"{fixtures._export_key()}"
    )


def build(name: str) -> Path:
    """The model's ONNX file (weights in model.onnx.data beside it), exported on first use."""
    from examples import fixtures

    directory = model_dir(name)
    path = directory / "model.onnx"
    if path.exists():
        return path
    with fixtures._file_lock(directory):
        if not path.exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
            try:
                _export(name, staging)
                staging.chmod(0o755)  # a shared cache, as the fixtures'
                os.replace(staging, directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return path


def _export(name: str, directory: Path) -> None:
    import onnx
    import torch
    import transformers
    from spikec.runtime import weights

    from examples import fixtures
    from spikec import modelio

    family, config = MODELS[name]
    outputs = ("logits",) if family == "llama" else ("last_hidden_state",)
    cls, config_cls = (
        (transformers.LlamaForCausalLM, transformers.LlamaConfig)
        if family == "llama"
        else (transformers.BertModel, transformers.BertConfig)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config_cls(**config, attn_implementation="eager")).eval()
    module = fixtures._named_io_module(model, ("input_ids", "attention_mask"), outputs)
    example = (torch.ones(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.int64))
    axes = {"batch": 0, "seq": 1}
    exported = directory / "export"
    exported.mkdir()
    with torch.no_grad():
        # to a file: past 2 GiB the exporter keeps the weights beside it (one file per tensor)
        torch.onnx.export(
            module,
            example,
            os.fspath(exported / "model.onnx"),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=list(outputs),
            dynamic_axes={n: {i: a for a, i in axes.items()} for n in ["input_ids", "attention_mask", *outputs]},
            opset_version=17,
            do_constant_folding=True,
        )
    del model, module
    proto = onnx.load(exported / "model.onnx", load_external_data=False)
    # all weights into one data file, streamed from the exporter's files (spikec.modelio's writer)
    with weights.source(exported):
        staged = modelio.Staged(None)
        try:
            staged.save(proto)
            shutil.move(staged.path, directory / "model.onnx")
            shutil.move(staged.data, directory / "model.onnx.data")
        finally:
            staged.remove()
    shutil.rmtree(exported)
    onnx.checker.check_model(os.fspath(directory / "model.onnx"))


def calibration(name: str) -> dict[str, np.ndarray]:
    vocab = MODELS[name][1]["vocab_size"]
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1, vocab, size=(CALIBRATION, SEQUENCE), dtype=np.int64),
        "attention_mask": np.ones((CALIBRATION, SEQUENCE), np.int64),
    }


def parameters(path: Path) -> int:
    import onnx
    from spikec.runtime import weights

    model = onnx.load(path, load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if weights.nbytes_of(t) >= 1024)


# ------------------------------------------------------------------ children


def _child(action: str, spec: dict) -> dict:
    """Runs in a child process and returns what it measured (the parent adds its peak RSS)."""
    if action == "build":
        path = build(spec["model"])
        return {
            "path": os.fspath(path),
            "parameters": parameters(path),
            "weights_bytes": (path.parent / "model.onnx.data").stat().st_size,
        }
    import onnxruntime

    import spikec
    from spikec.compiler import compile as _  # noqa: F401 - the baseline includes the compiler's imports

    onnxruntime.set_default_logger_severity(3)
    feeds = calibration(spec["model"])
    if action == "import":
        return {}
    if action == "compile":
        start = time.perf_counter()
        spikec.compile(
            spec["path"],
            feeds,
            spec["output"],
            method=spec["method"],
            mode="stateful",
            timesteps=TIMESTEPS,
            progress=False,
        )
        return {"compile_s": time.perf_counter() - start}
    if action == "run":
        from spikec.runtime import InferenceSession
        from spikec.runtime.session import Stepper

        start = time.perf_counter()
        session = InferenceSession(spec["output"])
        created = time.perf_counter() - start
        stepper = Stepper(session, {name: value[:1, : spec["tokens"]] for name, value in feeds.items()})
        steps = []
        for _ in range(spec["steps"]):
            begin = time.perf_counter()
            output = stepper.step()
            steps.append(time.perf_counter() - begin)
        return {
            "session_s": created,
            "step_s": steps,
            "finite": bool(all(np.isfinite(v).all() for v in output.values())),
        }
    raise SystemExit(f"unknown action {action!r}")


def _run_child(action: str, spec: dict) -> dict:
    """One child, reaped with os.wait4 for its own rusage (its ru_maxrss starts from this small parent's)."""
    argv = [sys.executable, __file__, "--child", action, json.dumps(spec)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()  # not communicate(): it would reap the child before wait4 can
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not stdout.strip():
        raise SystemExit(f"child {action} {spec} failed ({os.waitstatus_to_exitcode(status)}):\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": usage.ru_maxrss * 1024}


def fit(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--run", default="llama-1b", choices=[*MODELS, "none"], help="the model whose ECMT SNN then runs stateful steps"
    )
    parser.add_argument("--run-tokens", type=int, default=4)
    parser.add_argument("--run-steps", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--clean", action="store_true", help="remove the cached models and stop")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]))))
        return
    if args.clean:
        for name in MODELS:
            shutil.rmtree(model_dir(name), ignore_errors=True)
        return

    from rich.console import Console
    from rich.table import Table

    from spikec.memory import format_bytes, physical_memory

    console = Console(stderr=True)
    rows, runs = [], []
    for name in args.models:
        console.print(f"building {name} ...")
        model = _run_child("build", {"model": name})
        baseline = _run_child("import", {"model": name})["peak_rss"]
        for method in args.methods:
            with tempfile.TemporaryDirectory(prefix="spikec-bench-scale-", dir=REPO) as out:
                output = os.path.join(out, "snn.onnx")
                console.print(f"compiling {name} with {method} ...")
                result = _run_child(
                    "compile", {"model": name, "path": model["path"], "method": method, "output": output}
                )
                rows.append(
                    {
                        "model": name,
                        "family": MODELS[name][0],
                        "method": method,
                        "parameters": model["parameters"],
                        "weights_bytes": model["weights_bytes"],
                        "import_rss": baseline,
                        **result,
                        "output_bytes": sum(p.stat().st_size for p in Path(out).iterdir()),
                    }
                )
                if name == args.run and method == "ecmt":
                    console.print(f"running {name}'s ECMT SNN ...")
                    runs.append(
                        {
                            "model": name,
                            "tokens": args.run_tokens,
                            **_run_child(
                                "run",
                                {"model": name, "output": output, "tokens": args.run_tokens, "steps": args.run_steps},
                            ),
                        }
                    )

    table = Table(
        title=f"spikec compile, stateful, {CALIBRATION} calibration sequences of {SEQUENCE} tokens "
        f"({platform.machine()}, {os.cpu_count()} CPUs, {format_bytes(physical_memory() or 0)} RAM)"
    )
    for column in ("model", "parameters", "weights", "method", "peak RSS", "peak / weights", "compile time", "output"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['parameters'] / 1e6:.0f}M",
            format_bytes(r["weights_bytes"]),
            r["method"],
            format_bytes(r["peak_rss"]),
            f"{r['peak_rss'] / r['weights_bytes']:.2f}",
            f"{r['compile_s']:.1f} s",
            format_bytes(r["output_bytes"]),
        )
    Console(width=200).print(table)
    fits = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for method in args.methods:
            points = [r for r in rows if r["family"] == family and r["method"] == method]
            if len(points) < 2:
                continue
            memory = fit([r["parameters"] for r in points], [r["peak_rss"] for r in points])
            seconds = fit([r["parameters"] for r in points], [r["compile_s"] for r in points])
            fits.append(
                {
                    "family": family,
                    "method": method,
                    "rss_intercept": memory[0],
                    "rss_per_parameter": memory[1],
                    "seconds_intercept": seconds[0],
                    "seconds_per_parameter": seconds[1],
                }
            )
            print(
                f"{family} {method}: peak RSS = {'-' if memory[0] < 0 else ''}{format_bytes(abs(memory[0]))} + {memory[1]:.2f} B/parameter "
                f"({memory[1] / 4:.2f} x the float32 weights); time = {seconds[0]:.1f} s + "
                f"{seconds[1] * 1e9:.1f} s per 1e9 parameters"
            )
    for r in runs:
        print(
            f"{r['model']} ECMT SNN, stateful, {r['tokens']} tokens: session {r['session_s']:.1f} s, steps "
            f"{', '.join(f'{s:.2f} s' for s in r['step_s'])}, peak RSS {format_bytes(r['peak_rss'])}, "
            f"outputs finite: {r['finite']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"compiles": rows, "fits": fits, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
