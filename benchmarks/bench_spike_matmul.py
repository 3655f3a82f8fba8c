"""SpikeMatMul's row path against onnxruntime's MatMul, side by side: where adding fired rows pays.

For each [K, N] of the digits ViT and MiniLM, at the unrolled batch (rows M) the benchmarks run, random
spike codes (+-1 at the given density, the rest 0) times a constant weight, timed interleaved in this
process: the kernel forced onto its row path (dense_above=1) and forced onto MatMul (dense_above=0,
the time of a plain MatMul node), and left to pick by its own threshold. The native library must be
built (`make native`). spike_matmul.cc's cost model (dense_threshold) was fitted to these numbers.

    /work/venv/bin/python benchmarks/bench_spike_matmul.py [--threads N] [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, ops  # noqa: E402

from benchmarks.bench_ecmt import measure  # noqa: E402

# (model, rows M of an unrolled batch, K, N)
SHAPES = [
    ("digits-ViT", 8704, 64, 64),
    ("digits-ViT", 8704, 64, 128),
    ("digits-ViT", 8704, 128, 64),
    ("MiniLM", 4096, 384, 384),
    ("MiniLM", 4096, 384, 1536),
    ("MiniLM", 4096, 1536, 384),
    ("MiniLM step", 256, 384, 1536),
]
DENSITIES = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4]


def model(weight: np.ndarray, dense_above: float | None) -> onnx.ModelProto:
    attrs = {} if dense_above is None else {"dense_above": dense_above}
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node(ops.SPIKE_MATMUL, ["x", "w"], ["y"], domain=ops.DOMAIN, **attrs)],
        "spike_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    result = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]
    )
    result.functions.extend(ops.functions_for({ops.SPIKE_MATMUL}, 17))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(0)
    table = Table(
        title=f"SpikeMatMul, ms per call ({args.threads} threads): rows / MatMul / the kernel's choice (MatMul / rows)",
        box=box.MARKDOWN,
    )
    table.add_column("shape (M x K x N)")
    for density in DENSITIES:
        table.add_column(f"density {density}", justify="right")
    for name, m, k, n in SHAPES:
        weight = rng.standard_normal((k, n)).astype(np.float32)
        sessions = {
            key: InferenceSession(model(weight, above), options, fuse=False)
            for key, above in (("rows", 1.0), ("matmul", 0.0), ("auto", None))
        }
        if not sessions["rows"].native:
            raise SystemExit("native library not built: run `make native`")
        cells = []
        for density in DENSITIES:
            draw = rng.random((m, k))
            x = np.where(draw < density / 2, -1, np.where(draw < density, 1, 0)).astype(np.float32)
            calls = {key: (lambda s=s: s.run(None, {"x": x})) for key, s in sessions.items()}
            ms = {key: statistics.median(v) for key, v in measure(calls, reps=args.reps, warmup=2).items()}
            cells.append(f"{ms['rows']:.2f} / {ms['matmul']:.2f} / {ms['auto']:.2f} ({ms['matmul'] / ms['rows']:.2f}x)")
        table.add_row(f"{name} {m} x {k} x {n}", *cells)
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
