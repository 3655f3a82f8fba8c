"""The QANN's fidelity to the float model: built-in PTQ against PTQ + `spikec finetune`, per level count.

Pretrained all-MiniLM-L6-v2 (seq 32), quantized and fine-tuned on training_sentences(--sentences) (default:
the 128 calibration sentences), measured on heldout_sentences() (64, from other modules' docstrings): mean cosine of the QANN's sentence embedding to
the float model's. Fine-tuning runs for --time-budget seconds of CPU (torch threads: --threads).

    python benchmarks/bench_finetune.py [--levels 32 16] [--time-budget 480] [--steps N] [--threads 1] [--sentences 128]
        [--zero-points] [--hidden-weight W] [--qdrop P] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession  # noqa: E402

import spikec  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--time-budget", type=float, default=480.0)
    parser.add_argument("--steps", type=int, default=10**6, help="training steps at most (load-independent runs)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sentences", type=int, default=128, help="fit on this many sentences (128: the calibration sentences)"
    )
    parser.add_argument("--zero-points", action="store_true", help="quantize with zero points (--zero-points)")
    parser.add_argument(
        "--hidden-weight", type=float, default=4.0, help="weight of every LayerNorm's output (0: outputs only)"
    )
    parser.add_argument("--qdrop", type=float, default=0.0, help="QDrop probability (spikec finetune)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = fixtures.minilm()
    calib = fixtures.minilm_inputs(fixtures.training_sentences(args.sentences))
    held = fixtures.minilm_inputs(fixtures.heldout_sentences())
    reference = InferenceSession(onnx.load(str(model))).run(None, held)[0]

    def fidelity(qann: onnx.ModelProto) -> float:
        return cosine(InferenceSession(qann).run(None, held)[0], reference)

    rows = []
    for levels in args.levels:
        ptq = spikec.quantize(model, calib, levels=levels, zero_points=args.zero_points, progress=False)
        start = time.monotonic()
        tuned, summary = spikec.finetune(
            model,
            calib,
            levels=levels,
            zero_points=args.zero_points,
            steps=args.steps,
            time_budget=args.time_budget,
            lr=args.lr,
            hidden_weight=args.hidden_weight,
            qdrop=args.qdrop,
            progress=False,
        )
        rows.append(
            {
                "levels": levels,
                "ptq_cosine": fidelity(ptq),
                "finetune_cosine": fidelity(tuned),
                "finetune_seconds": round(time.monotonic() - start),
                **summary,
            }
        )
        print(
            f"L={levels}: PTQ {rows[-1]['ptq_cosine']:.4f}  fine-tuned {rows[-1]['finetune_cosine']:.4f} "
            f"({summary['steps']} steps, {rows[-1]['finetune_seconds']} s, distillation loss "
            f"{summary['loss_before']:.4g} -> {summary['loss_after']:.4g})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "threads": args.threads,
                    "sentences": args.sentences,
                    "time_budget": args.time_budget,
                    "zero_points": args.zero_points,
                    "hidden_weight": args.hidden_weight,
                    "qdrop": args.qdrop,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
