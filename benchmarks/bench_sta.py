"""STA benchmark: digits-ViT accuracy versus T with each technique switched off (the paper's Table 7
ablation), MiniLM cosine versus T, and the time ratio SNN / (T x ANN).

* digits-ViT: calibrated on the first 256 training images, accuracy over the 540 test images. One
  unrolled model per variant at T=128 gives every T <= 128 (thresholds are searched for T=128).
* MiniLM: seq 32, calibrated on calibration_sentences(), cosine of the sentence embeddings over the
  first 16 evaluation sentences, stateful model driven for 64 steps.

    /work/venv/bin/python benchmarks/bench_sta.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure, print_table  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402

# the paper's ablation, at the paper's burst 2 (spikec's default is 8: docs/defaults.md)
PAPER = {"burst": 2}
VARIANTS = {
    "STA (all techniques)": PAPER,
    "exact GELU and LayerNorm (no UGOs)": {**PAPER, "ugo": False},
    "naive split instead of TCSA": {**PAPER, "tcsa": False},
    "without signed neurons": {**PAPER, "signed": False},
    "without burst spikes": {"burst": 1},
}


def digits_rows(timesteps: int, report_t: list[int], log: Console) -> tuple[float, list[dict]]:
    data = fixtures.digits_data()
    calib, test = {"pixels": data["x_train"][:256]}, {"pixels": data["x_test"]}
    ann = InferenceSession(fixtures.digits_vit())
    ann_accuracy = fixtures.accuracy(run_dataset(ann, test)["logits"], data["y_test"])
    batch = {"pixels": data["x_test"][:16]}
    rows = []
    for name, options in VARIANTS.items():
        log.print(f"[dim]digits-ViT: {name}[/dim]")
        start = time.perf_counter()
        model = spikec.compile(
            fixtures.digits_vit(), calib, method="sta", timesteps=timesteps, progress=False, **options
        )
        compile_s = time.perf_counter() - start
        snn = InferenceSession(model)
        steps = run_dataset(snn, test, batch_size=16)["logits.steps"]
        ms = {
            k: statistics.median(v)
            for k, v in measure(
                {"ann": lambda: run(ann, batch), "snn": lambda: run(snn, batch)}, reps=3, warmup=1
            ).items()
        }
        rows.append(
            {
                "variant": name,
                "accuracy": {t: fixtures.accuracy(steps[t - 1], data["y_test"]) for t in report_t},
                "ratio": ms["snn"] / (timesteps * ms["ann"]),
                "compile_s": compile_s,
            }
        )
    return ann_accuracy, rows


def minilm_row(timesteps: int, report_t: list[int], log: Console) -> dict:
    log.print("[dim]MiniLM[/dim]")
    calib = fixtures.minilm_inputs(fixtures.calibration_sentences())
    feeds = fixtures.minilm_inputs(fixtures.evaluation_sentences()[:16])
    reference = run_dataset(fixtures.minilm(), feeds)["sentence_embedding"]
    model = spikec.compile(
        fixtures.minilm(), calib, method="sta", timesteps=timesteps, mode="stateful", progress=False, **PAPER
    )
    steps = run_dataset(model, feeds, batch_size=16)["sentence_embedding.steps"]
    return {t: cosine(reference, steps[t - 1]) for t in report_t}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T up to 32, MiniLM up to 16")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    out, log = Console(width=200, highlight=False), Console(stderr=True)
    digits_t = [8, 16, 32] if args.quick else [8, 16, 32, 64, 128]
    minilm_t = [8, 16] if args.quick else [8, 16, 32, 64]
    ann_accuracy, rows = digits_rows(digits_t[-1], digits_t, log)
    minilm = minilm_row(minilm_t[-1], minilm_t, log)

    table = Table(box=box.MARKDOWN, title=None)
    table.add_column("digits-ViT variant", no_wrap=True)
    for t in digits_t:
        table.add_column(f"T={t}", justify="right")
    table.add_column(f"SNN / (T x ANN) at T={digits_t[-1]}", justify="right")
    table.add_column("compile s", justify="right")
    for row in rows:
        table.add_row(
            row["variant"],
            *[f"{100 * row['accuracy'][t]:.2f} %" for t in digits_t],
            f"{row['ratio']:.2f}",
            f"{row['compile_s']:.1f}",
        )
    cos = Table(box=box.MARKDOWN)
    cos.add_column("MiniLM (16 sentences)")
    for t in minilm_t:
        cos.add_column(f"T={t}", justify="right")
    cos.add_row("cosine vs ANN", *[f"{minilm[t]:.4f}" for t in minilm_t])
    out.print(
        f"spikec STA benchmark: digits-ViT ANN accuracy {100 * ann_accuracy:.2f} % (540 test images); "
        f"thresholds searched for T={digits_t[-1]}, accuracy read at every T from one run."
    )
    out.print()
    print_table(out, table)
    out.print()
    print_table(out, cos)
    if args.json:
        args.json.write_text(json.dumps({"ann_accuracy": ann_accuracy, "digits": rows, "minilm": minilm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
