"""SpikeZIP-TF integer-exact mode against the float mode, and T_eq against the burst k (issue 21 §3-4).

A model (the digits ViT or all-MiniLM-L6-v2, quantized by spikec's PTQ or by onnxruntime's
``quantize_static`` in QDQ format) run stateful until quiet on held-out samples: per mode and k, T_eq
(max / mean), the samples whose output equals the integer QANN (spikec.methods.spikezip.integer_qann) bit
for bit, the same against onnxruntime's own session of the QANN, the products that accumulate in int32 (of all MatMuls),
and the simulation time per sample, all in one run.

    python benchmarks/bench_integer.py [--model vit-ptq|vit-qdq|minilm-ptq|minilm-qdq] [--samples N]
        [--runs float:1,integer:1,integer:2,integer:4] [--cap STEPS] [--batch N] [--threads N] [--per-tensor]
        [--zero-points]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, equilibrium_steps, run_stateful  # noqa: E402

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.methods.spikezip import integer_qann  # noqa: E402

LEVELS = 16


def workload(name: str, samples: int) -> tuple[str, dict, dict]:
    """(description, calibration feeds, held-out feeds) of the digits ViT or MiniLM."""
    if name.startswith("vit"):
        data = fixtures.digits_data()
        return "digits ViT", {"pixels": data["x_train"][:256]}, {"pixels": data["x_test"][:samples]}
    calib = fixtures.minilm_inputs(fixtures.calibration_sentences(), seq_len=32)
    held = fixtures.minilm_inputs(fixtures.heldout_sentences()[:samples], seq_len=32)
    return "all-MiniLM-L6-v2 (seq 32)", calib, held


def qdq_model(float_model: Path, calib: dict, directory: Path) -> Path:
    """onnxruntime's uint8 QDQ model (int8 weights), MatMul/Gemm quantized, calibrated in batches of 32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    count = len(next(iter(calib.values())))
    batches = iter([{k: v[i : i + 32] for k, v in calib.items()} for i in range(0, count, 32)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    path = directory / "qdq.onnx"
    quantize_static(
        str(float_model), str(path), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"]
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["vit-ptq", "vit-qdq", "minilm-ptq", "minilm-qdq"], default="vit-ptq")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--runs", default="float:1,integer:1,integer:2,integer:4", help="mode:k, comma separated")
    parser.add_argument("--cap", type=int, default=64, help="most steps per sample")
    parser.add_argument("--batch", type=int, default=64, help="samples simulated at once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-tensor", action="store_true", help="spikec PTQ with one scale per tensor")
    parser.add_argument("--zero-points", action="store_true", help="spikec PTQ with zero points (--zero-points)")
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    ort.set_default_logger_severity(3)
    title, calib, feeds = workload(args.model, args.samples)
    float_model = fixtures.digits_vit() if args.model.startswith("vit") else fixtures.minilm()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.endswith("qdq"):
            qann = onnx.load(qdq_model(float_model, calib, Path(tmp)))
            quantized = "onnxruntime uint8 QDQ (quantize_static)"
        else:
            qann = spikec.quantize(
                float_model,
                calib,
                levels=LEVELS,
                per_tensor=args.per_tensor,
                zero_points=args.zero_points,
                progress=False,
            )
            quantized = f"spikec PTQ, L={LEVELS}, {'per tensor' if args.per_tensor else 'per channel'}"
            quantized += ", zero points" if args.zero_points else ""
        output = qann.graph.output[0].name
        want = InferenceSession(integer_qann(qann), options).run([output], feeds)[0]
        own = ort.InferenceSession(qann.SerializeToString(), options).run([output], feeds)[0]
        print(
            f"{title}, {quantized}, {args.samples} held-out samples, stateful until quiet (cap {args.cap}), "
            f"onnxruntime {ort.__version__}, {args.threads} threads"
        )
        print(f"integer QANN vs onnxruntime's session of the QANN: {int((want == own).all(axis=1).sum())} equal")
        print(
            "| mode | k | int32 products | T_eq max / mean | samples = integer QANN (bit for bit) | max abs error "
            "| samples = onnxruntime QANN | ms per sample |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for run in args.runs.split(","):
            mode, burst = run.split(":")
            integer = mode == "integer"
            snn = spikec.compile(
                qann,
                calib,
                method="spikezip",
                timesteps=args.cap,
                mode="stateful",
                integer=integer,
                burst=int(burst),
                verify=False,  # measured here, on held-out samples until quiet
                progress=False,
            )
            ops = [n.op_type for n in snn.graph.node]
            products = f"{ops.count('MatMulInteger')} of {ops.count('MatMulInteger') + ops.count('MatMul')}"
            session = InferenceSession(snn, options)
            got, steps, seconds = [], [], 0.0
            for start in range(0, args.samples, args.batch):
                batch = {k: v[start : start + args.batch] for k, v in feeds.items()}
                begin = time.perf_counter()
                result = run_stateful(session, batch, args.cap, until_quiet=True)
                seconds += time.perf_counter() - begin
                got.append(result[output])
                steps += [s or args.cap for s in equilibrium_steps(result["spikec.spikes.steps"])]
            out = np.concatenate(got)
            print(
                f"| {mode} | {burst} | {products} | {max(steps)} / {np.mean(steps):.1f} | "
                f"{(out == want).all(axis=1).sum()} of {len(out)} | {np.abs(out - want).max():.2g} | "
                f"{(out == own).all(axis=1).sum()} | {1000 * seconds / len(out):.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
