"""Default-flag proof (issue 20): every method compiled with its defaults, measured on data no calibration
or default choice has seen.

* MiniLM (seq 32): calibrated on calibration_sentences() (ECMT, STA: all 128; TTFS: the first 32),
  measured on examples/written_sentences.txt (hand-written everyday English; the fixtures' sentences are
  stdlib docstrings). ECMT (the T its compile measures) and STA (T=64): mean cosine of the sentence
  embeddings against the ANN;
  TTFS: max |SNN - ANN| / max |ANN|.
* digits ViT: calibrated on the first 256 training images, accuracy on the 540 test images (never
  calibrated on) against the ANN's on the same images.
* SpikeZIP-TF (both models, the T the compile measures): the share of unseen samples on which the SNN equals the integer QANN
  of the QANN it was compiled from (spikec.methods.spikezip.integer_qann), bit for bit.

    python benchmarks/bench_defaults.py [--json PATH] [--only SpikeZIP]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime.metadata import SpikecMetadata  # noqa: E402

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402
from spikec.methods.spikezip import integer_qann  # noqa: E402

BIT_EQUAL = "share bit-equal to QANN"
# (what, method, options, measure, bound): the proof's claims, each from one default-flag compile
CLAIMS = [
    # ECMT's and SpikeZIP-TF's T are measured by the compile (spikec/equilibrium.py): the fewest steps meeting
    # ECMT's bound, the steps until no neuron fires
    ("MiniLM ECMT", "ecmt", {}, "cosine", 0.99),
    ("MiniLM STA T=64", "sta", {"timesteps": 64}, "cosine", 0.98),
    ("MiniLM TTFS, 32 calibration sentences", "ttfs", {}, "relative max error", 1e-3),
    ("digits ViT ECMT", "ecmt", {}, "accuracy - ANN (points)", -0.5),
    ("MiniLM SpikeZIP-TF", "spikezip", {}, BIT_EQUAL, 1.0),
    ("digits ViT SpikeZIP-TF", "spikezip", {}, BIT_EQUAL, 1.0),
]


def bit_equal_share(method: str, options: dict, ann, calib: dict, unseen: dict, output: str) -> tuple[float, int]:
    """Compile SpikeZIP-TF with its defaults, keeping the QANN; the share of ``unseen`` samples on which the
    SNN's ``output`` equals the integer QANN's in every bit, and the SNN's T."""
    with tempfile.TemporaryDirectory() as tmp:
        qann = Path(tmp) / "qann.onnx"
        snn = spikec.compile(ann, calib, method=method, progress=False, save_qann=qann, **options)
        want = run_dataset(integer_qann(onnx.load(qann)), unseen)[output]
    got = run_dataset(snn, unseen)[output]
    return float((got == want).reshape(len(got), -1).all(axis=1).mean()), _timesteps(snn)


def _timesteps(snn) -> int:
    return SpikecMetadata.read(snn).timesteps


def minilm_claim(method: str, options: dict, measure: str) -> tuple[float, int]:
    sentences = fixtures.calibration_sentences()
    calib = fixtures.minilm_inputs(sentences[:32] if method == "ttfs" else sentences)
    unseen = fixtures.minilm_inputs(fixtures.written_sentences())
    if measure == BIT_EQUAL:
        return bit_equal_share(method, options, fixtures.minilm(), calib, unseen, "sentence_embedding")
    snn = spikec.compile(fixtures.minilm(), calib, method=method, progress=False, **options)
    ann = run_dataset(fixtures.minilm(), unseen)["sentence_embedding"]
    got = run_dataset(snn, unseen)["sentence_embedding"]
    if measure == "cosine":
        return cosine(ann, got), _timesteps(snn)
    return float(np.abs(got - ann).max() / np.abs(ann).max()), _timesteps(snn)


def digits_claim(method: str, options: dict, measure: str) -> tuple[float, int]:
    data = fixtures.digits_data()
    test = {"pixels": data["x_test"]}
    calib = {"pixels": data["x_train"][:256]}
    if measure == BIT_EQUAL:
        return bit_equal_share(method, options, fixtures.digits_vit(), calib, test, "logits")
    snn = spikec.compile(fixtures.digits_vit(), calib, method=method, progress=False, **options)
    ann = fixtures.accuracy(run_dataset(fixtures.digits_vit(), test)["logits"], data["y_test"])
    return 100 * (fixtures.accuracy(run_dataset(snn, test)["logits"], data["y_test"]) - ann), _timesteps(snn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--only", metavar="TEXT", default="", help="the claims whose name contains TEXT")
    args = parser.parse_args()
    rows = []
    for what, method, options, measure, bound in CLAIMS:
        if args.only not in what:
            continue
        start = time.perf_counter()
        claim = digits_claim if what.startswith("digits") else minilm_claim
        value, timesteps = claim(method, options, measure)
        met = value <= bound if measure == "relative max error" else value >= bound
        rows.append(
            {
                "claim": what,
                "measure": measure,
                "value": value,
                "bound": bound,
                "met": met,
                "timesteps": timesteps,
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"{what:40s} {measure:24s} {value:10.4g}  bound {bound:g}  {'met' if met else 'MISSED'}  "
            f"(T={timesteps}, {rows[-1]['seconds']:.0f} s)",
            flush=True,
        )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, spikec {version('spikec')}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(row["met"] for row in rows) else 1)


if __name__ == "__main__":
    main()
