"""Which method? (issue 20): `spikec compare` on pretrained MiniLM and on the digits ViT, each method at its
default options and T, printed as the tables of docs/compare.md.

* MiniLM (seq 32): the 128 calibration sentences (96 calibrate, 32 validate); fidelity is the cosine of
  the sentence embeddings to the float ANN.
* digits ViT: the 540 test images with their labels (405 calibrate, 135 validate), accuracy beside it.

    python benchmarks/bench_compare.py [--json PATH] [--only minilm|digits]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime  # noqa: E402

from examples import fixtures  # noqa: E402
from spikec.compare import compare_methods  # noqa: E402


def workloads() -> dict:
    digits = fixtures.digits_data()
    return {
        "minilm": lambda: compare_methods(
            fixtures.minilm(), fixtures.minilm_inputs(fixtures.calibration_sentences()), progress=False
        ),
        "digits": lambda: compare_methods(
            fixtures.digits_vit(), {"pixels": digits["x_test"]}, labels=digits["y_test"], progress=False
        ),
    }


def table(result: dict) -> str:
    rows = result["methods"]
    accuracy = any("accuracy" in r for r in rows)
    lines = [
        "| method | T | cosine | rel. max error | "
        + ("accuracy (ANN) | " if accuracy else "")
        + "T to cosine 0.99 | energy SNN/ANN | (papers' convention) | spikes/neuron/step | time SNN/ANN |",
        "|---" * (10 if accuracy else 9) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | fails: {r['error']} |")
            continue
        cells = [r["method"], str(r["timesteps"] or "1 pass"), f"{r['cosine']:.4f}", f"{r['relative_max_error']:.2g}"]
        if accuracy:
            cells.append(f"{100 * r['accuracy']:.2f} % ({100 * r['ann_accuracy']:.2f} %)")
        cells += [
            str(r["t_at_min_cosine"] or "-"),
            f"{r['energy_ratio']:.2f}",
            f"{r['energy_ratio_paper']:.2f}",
            f"{r['spikes_per_neuron_per_step']:.3f}",
            f"{r['time_ratio']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nrecommended: **{result['recommendation']['method']}** ({result['recommendation']['reason']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=["minilm", "digits"])
    args = parser.parse_args()
    onnxruntime.set_default_logger_severity(3)  # graph-optimizer notes on the ANN are not results
    print(
        f"{platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}, onnxruntime "
        f"{version('onnxruntime')}, spikec {version('spikec')}"
    )
    results = {}
    for name, run in workloads().items():
        if args.only and name != args.only:
            continue
        start = time.perf_counter()
        results[name] = run()
        results[name]["wall_seconds"] = time.perf_counter() - start
        print(
            f"\n## {name}: {results[name]['fit_samples']} samples calibrate, "
            f"{results[name]['validation_samples']} validate; compare took {results[name]['wall_seconds']:.0f} s\n"
        )
        print(table(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
