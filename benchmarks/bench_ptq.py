"""Built-in PTQ of pretrained all-MiniLM-L6-v2: the QANN's fidelity to the float model, per setting.

Quantized on calibration_sentences() (128, seq 32), measured on heldout_sentences() (64, other modules'
docstrings): mean cosine of the QANN's sentence embedding to the float model's, at each level count, for
per-channel scales without and with bias correction, then with the products refit (the default), with zero
points too and, with --per-tensor, per-tensor scales. --sentences N calibrates on training_sentences(N).

    python benchmarks/bench_ptq.py [--levels 32 16] [--sentences 128] [--per-tensor] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.passes.canonicalize import canonicalize  # noqa: E402
from spikec.passes.loader import load_model  # noqa: E402
from spikec.runtime import InferenceSession  # noqa: E402

from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine  # noqa: E402
from spikec.methods.spikezip import quantize_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--per-tensor", action="store_true", help="also measure per-tensor scales")
    parser.add_argument("--sentences", type=int, default=128, help="calibration sentences (128: the calibration set)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    model = fixtures.minilm()
    ann = canonicalize(load_model(str(model), convert_with="spikezip", map_weights=True))
    calib = fixtures.minilm_inputs(fixtures.training_sentences(args.sentences))
    held = fixtures.minilm_inputs(fixtures.heldout_sentences())
    reference = InferenceSession(onnx.load(str(model))).run(None, held)[0]
    settings = {
        "per channel": {"bias_correction": False, "refit": False},
        "+ bias correction (--no-refit)": {"refit": False},
        "+ refit (default)": {},
        "+ zero points (--zero-points)": {"zero_points": True},
    }
    if args.per_tensor:
        settings["per tensor"] = {"per_tensor": True}
    rows = []
    for levels in args.levels:
        for label, kwargs in settings.items():
            start = time.monotonic()
            qann, _, _ = quantize_model(ann, calib, levels, batch_size=32, progress=False, **kwargs)
            held_cosine = cosine(InferenceSession(qann).run(None, held)[0], reference)
            rows.append({"levels": levels, "setting": label, "cosine": held_cosine})
            print(f"L={levels:3d}  {label:32s} {held_cosine:.4f}  ({time.monotonic() - start:.0f} s)", flush=True)
    if args.json:
        record = {
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
            "sentences": args.sentences,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
