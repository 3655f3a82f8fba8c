"""Default-flag proof (issue 20): every method compiled with its defaults, measured on data no calibration
or default choice has seen.

* MiniLM (seq 32): calibrated on calibration_sentences() (ECMT, STA: all 128; TTFS: the first 32),
  measured on examples/written_sentences.txt (hand-written everyday English; the fixtures' sentences are
  stdlib docstrings). ECMT T=8 and STA T=64: mean cosine of the sentence embeddings against the ANN;
  TTFS: max |SNN - ANN| / max |ANN|.
* digits ViT: calibrated on the first 256 training images, accuracy on the 540 test images (never
  calibrated on) against the ANN's on the same images.

    python benchmarks/bench_defaults.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402

# (what, method, options, measure, bound): the proof's claims, each from one default-flag compile
CLAIMS = [
    ("MiniLM ECMT T=8", "ecmt", {"timesteps": 8}, "cosine", 0.99),
    ("MiniLM STA T=64", "sta", {"timesteps": 64}, "cosine", 0.98),
    ("MiniLM TTFS, 32 calibration sentences", "ttfs", {}, "relative max error", 1e-3),
    ("digits ViT ECMT T=8", "ecmt", {"timesteps": 8}, "accuracy - ANN (points)", -0.5),
]


def minilm_claim(method: str, options: dict, measure: str) -> float:
    sentences = fixtures.calibration_sentences()
    calib = fixtures.minilm_inputs(sentences[:32] if method == "ttfs" else sentences)
    unseen = fixtures.minilm_inputs(fixtures.written_sentences())
    snn = spikec.compile(fixtures.minilm(), calib, method=method, progress=False, **options)
    ann = run_dataset(fixtures.minilm(), unseen)["sentence_embedding"]
    got = run_dataset(snn, unseen)["sentence_embedding"]
    if measure == "cosine":
        return cosine(ann, got)
    return float(np.abs(got - ann).max() / np.abs(ann).max())


def digits_claim(method: str, options: dict) -> float:
    data = fixtures.digits_data()
    test = {"pixels": data["x_test"]}
    snn = spikec.compile(
        fixtures.digits_vit(), {"pixels": data["x_train"][:256]}, method=method, progress=False, **options
    )
    ann = fixtures.accuracy(run_dataset(fixtures.digits_vit(), test)["logits"], data["y_test"])
    return 100 * (fixtures.accuracy(run_dataset(snn, test)["logits"], data["y_test"]) - ann)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    rows = []
    for what, method, options, measure, bound in CLAIMS:
        start = time.perf_counter()
        value = digits_claim(method, options) if what.startswith("digits") else minilm_claim(method, options, measure)
        met = value <= bound if measure == "relative max error" else value >= bound
        rows.append(
            {
                "claim": what,
                "measure": measure,
                "value": value,
                "bound": bound,
                "met": met,
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"{what:40s} {measure:24s} {value:10.4g}  bound {bound:g}  {'met' if met else 'MISSED'}  "
            f"({rows[-1]['seconds']:.0f} s)",
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
