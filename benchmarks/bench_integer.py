"""SpikeZIP-TF integer-exact mode against the float mode, and T_eq against the burst k (issue 21 §3-4).

The digits ViT quantized by spikec (L=16, 256 training images), run stateful until quiet on test images:
per mode and k, T_eq (max / mean), the samples whose output equals the integer QANN
(spikec.methods.spikezip.integer_qann) bit for bit, and the simulation time per sample, all in one run.

    python benchmarks/bench_integer.py [--samples N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, equilibrium_steps, run_stateful  # noqa: E402

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.methods.spikezip import integer_qann  # noqa: E402

CAP = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    data = fixtures.digits_data()
    calib = {"pixels": data["x_train"][:256]}
    feeds = {"pixels": data["x_test"][: args.samples]}
    qann = spikec.quantize(fixtures.digits_vit(), calib, levels=16, progress=False)
    want = InferenceSession(integer_qann(qann), options).run(["logits"], feeds)[0]
    print(
        f"digits ViT, L=16, {args.samples} test images, stateful until quiet (cap {CAP}), "
        f"onnxruntime {ort.__version__}, {args.threads} threads"
    )
    print("| mode | k | T_eq max / mean | samples = integer QANN (bit for bit) | max abs error | ms per sample |")
    print("|---|---|---|---|---|---|")
    for integer, burst in ((False, 1), (True, 1), (True, 2), (True, 4)):
        snn = spikec.compile(
            qann, calib, method="spikezip", timesteps=CAP, mode="stateful", integer=integer, burst=burst, progress=False
        )
        session = InferenceSession(snn, options)
        start = time.perf_counter()
        got = run_stateful(session, feeds, CAP, until_quiet=True)
        seconds = time.perf_counter() - start
        steps = [s or CAP for s in equilibrium_steps(got["spikec.spikes.steps"])]
        equal = (got["logits"] == want).all(axis=1)
        print(
            f"| {'integer' if integer else 'float'} | {burst} | {max(steps)} / {np.mean(steps):.1f} | "
            f"{equal.sum()} of {len(equal)} | {np.abs(got['logits'] - want).max():.2g} | "
            f"{1000 * seconds / len(equal):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
