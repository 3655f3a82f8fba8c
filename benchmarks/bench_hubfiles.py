"""The Hugging Face Hub file matrix: the ONNX variants Hub repos ship beside model.onnx (optimum exports,
transformers.js repos), made here from the fp32 export with the tools that make them, each compiled by every
method with default flags, run, and compared with the variant's own ANN and with the fp32 ANN.

Variants: fp16 (onnxruntime.transformers.float16, float16 I/O and, keep_io, float32 I/O), onnxruntime's
dynamic quantization (QInt8 and QUInt8 weights: DynamicQuantizeLinear + MatMulInteger), q4 (MatMulNBits,
block 32), static QDQ (uint8 activations and weights, calibrated on the calibration set), and
onnxruntime.transformers.optimizer at optimum's O2 (fusions) and O4 (fusions + fp16, float32 I/O).

    PYTHONPATH=$PWD python benchmarks/bench_hubfiles.py [--models minilm,digits] [--variants V,...]
                                                        [--methods M,...] [--timeout S] [--markdown OUT]

Each cell runs in its own process with a timeout. The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import fixtures  # noqa: E402

METHODS = ("ecmt", "spikezip", "sta", "ttfs")
VARIANTS = ("fp32", "fp16", "fp16-keepio", "dyn-qint8", "dyn-quint8", "q4", "qdq-uint8", "O2", "O4")
MODELS = ("minilm", "digits")


def _model(name: str) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None, str, int]:
    """(fp32 ONNX, calibration inputs, evaluation inputs, evaluation labels, ORT model type, heads)."""
    if name == "minilm":
        return (
            fixtures.minilm(opset=17, attn="sdpa"),
            fixtures.minilm_inputs(fixtures.calibration_sentences()),
            fixtures.minilm_inputs(fixtures.heldout_sentences()),
            None,
            "bert",
            12,
        )
    data = fixtures.digits_data()
    return (
        fixtures.digits_vit(opset=17),
        {"pixels": data["x_train"][:256]},
        {"pixels": data["x_test"][:256]},
        data["y_test"][:256],
        "vit",
        0,
    )


def make_variant(fp32: Path, variant: str, calib: dict[str, np.ndarray], model_type: str, heads: int, out: Path):
    """Write ``variant`` of the fp32 model ``fp32`` to ``out`` with the tool that makes it for the Hub."""
    warnings.simplefilter("ignore")
    if variant == "fp32":
        onnx.save(onnx.load(fp32), out)
    elif variant in ("fp16", "fp16-keepio"):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(fp32), keep_io_types=variant == "fp16-keepio"), out)
    elif variant.startswith("dyn-"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        weight = QuantType.QInt8 if variant == "dyn-qint8" else QuantType.QUInt8
        quantize_dynamic(fp32, out, weight_type=weight)
    elif variant == "q4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=32, is_symmetric=True)
        quantizer.process()
        onnx.save(quantizer.model.model, out)
    elif variant == "qdq-uint8":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                count = len(next(iter(calib.values())))
                self.feeds = iter([{k: v[i : i + 1] for k, v in calib.items()} for i in range(min(count, 64))])

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(
            fp32,
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8,
        )
    elif variant in ("O2", "O4"):
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(fp32), model_type=model_type, num_heads=heads, hidden_size=0, opt_level=0)
        if variant == "O4":
            optimized.convert_float_to_float16(keep_io_types=True)
        onnx.save(optimized.model, out)
    else:
        raise ValueError(f"unknown variant {variant!r}")


def _fidelity(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels) -> dict:
    from spikec.evaluate import cosine

    name = next(iter(reference))
    row = {"cosine": cosine(reference[name], outputs[name].astype(np.float32))}
    if labels is not None:
        row["accuracy"] = float(np.mean(outputs[name].argmax(1) == labels))
    return row


def cell(model: str, variant: str, method: str, path: str, work: str) -> dict:
    """Compile ``path`` with default flags, run it on the evaluation inputs, and compare it with the variant's
    ANN and the fp32 ANN (saved by `main` in ``work``)."""
    import spikec
    from spikec.errors import SpikecError
    from spikec.evaluate import run_dataset

    _, calib, evaluation, labels, _, _ = _model(model)
    references = np.load(Path(work) / f"{model}-references.npz")
    out = {"model": model, "variant": variant, "method": method}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            snn = spikec.compile(path, calib, progress=False, method=method)
        except SpikecError as exc:
            out.update(status="refused", detail=" ".join(str(exc).split())[:200])
            return out
    out["compile_s"] = round(time.perf_counter() - started, 1)
    out["notices"] = [str(w.message)[:80] for w in caught if type(w.message).__name__ == "ImportNotice"]
    out["below_bound"] = any(type(w.message).__name__ == "FidelityWarning" for w in caught)
    outputs = run_dataset(snn, evaluation)
    out["status"] = "ok"
    for key, reference in (("own", variant), ("fp32", "fp32")):
        arrays = {k.split(":", 1)[1]: references[k] for k in references if k.split(":", 1)[0] == reference}
        out[key] = _fidelity(outputs, arrays, labels)
    return out


def _references(model: str, paths: dict[str, Path], work: Path) -> dict[str, dict]:
    """Each variant's ANN outputs on the evaluation inputs (onnxruntime, as the file is); accuracy for digits."""
    import onnxruntime

    _, _, evaluation, labels, _, _ = _model(model)
    arrays, rows = {}, {}
    for variant, path in paths.items():
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in session.get_inputs():
            dtype = np.float16 if i.type == "tensor(float16)" else evaluation[i.name].dtype
            feeds[i.name] = evaluation[i.name].astype(dtype)
        name = session.get_outputs()[0].name
        arrays[f"{variant}:{name}"] = session.run([name], feeds)[0].astype(np.float32)
    np.savez(work / f"{model}-references.npz", **arrays)
    for variant in paths:
        name = next(k for k in arrays if k.startswith(f"{variant}:"))
        fp32 = next(k for k in arrays if k.startswith("fp32:"))
        rows[variant] = _fidelity({"y": arrays[name]}, {"y": arrays[fp32]}, labels)
    return rows


def _markdown(models, variants, methods, ann: dict, cells: dict) -> str:
    lines = []
    for model in models:
        metric = "accuracy" if model == "digits" else "cosine"
        lines.append(f"\n**{model}** (cell: SNN cosine to the variant's own ANN / to the fp32 ANN"
                     + ("; accuracy" if model == "digits" else "") + ")\n")  # fmt: skip
        lines.append("| variant | ANN vs fp32 | " + " | ".join(methods) + " |")
        lines.append("|---" * (len(methods) + 2) + "|")
        for variant in variants:
            a = ann[model].get(variant, {})
            head = f"{a.get('cosine', float('nan')):.4f}" + (
                f"; acc {a[metric]:.3f}" if metric == "accuracy" and metric in a else ""
            )
            row = [variant, head]
            for method in methods:
                c = cells.get((model, variant, method), {"status": "missing"})
                if c.get("status") != "ok":
                    row.append(f"{c.get('status')}: {c.get('detail', '')}".strip(": "))
                    continue
                text = f"{c['own']['cosine']:.4f} / {c['fp32']['cosine']:.4f}"
                if metric == "accuracy":
                    text += f"; {c['fp32']['accuracy']:.3f}"
                if c.get("below_bound"):
                    text += " (b)"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--jsonl", help="append each model's ANN row and each cell, as measured, to this file")
    parser.add_argument("--table", help="only print the table of the rows a --jsonl run wrote to this file")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    from conformance import _Task, run_isolated

    models, variants, methods = (getattr(args, k).split(",") for k in ("models", "variants", "methods"))
    ann, cells = {}, {}

    def keep(row: dict) -> None:
        if "cell" in row:
            cells[tuple(row["cell"])] = row["value"]
        else:
            ann[row["model"]] = row["ann"]
        if args.jsonl and not args.table:
            with open(args.jsonl, "a") as out:
                out.write(json.dumps(row) + "\n")

    if args.table:
        for line in Path(args.table).read_text().splitlines():
            keep(json.loads(line))
    else:
        work = Path(tempfile.mkdtemp(prefix="spikec-hubfiles-"))
        for model in models:
            fp32, calib, _, _, model_type, heads = _model(model)
            paths = {}
            for variant in dict.fromkeys(["fp32", *variants]):
                paths[variant] = work / f"{model}-{variant}.onnx"
                make_variant(fp32, variant, calib, model_type, heads, paths[variant])
            keep({"model": model, "ann": _references(model, paths, work)})

            def record(key, kind, value):
                keep(
                    {
                        "cell": list(key),
                        "value": value
                        if kind == "ok"
                        else {"status": kind, "detail": str(value).splitlines()[-1][:200]},
                    }
                )
                print(f"{key}: {json.dumps(cells[key])}", file=sys.stderr, flush=True)

            # the one-pass and 8-step methods first: the 64-step ones take longest
            tasks = [
                _Task((model, v, m), cell, (model, v, m, str(paths[v]), str(work)), {}, record)
                for m in sorted(methods, key=lambda m: m in ("spikezip", "sta"))
                for v in variants
            ]
            run_isolated(tasks, jobs=1, timeout=args.timeout)
    models = [m for m in models if m in ann]
    table = _markdown(models, variants, methods, ann, cells)
    header = (
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, onnxruntime "
        f"{__import__('onnxruntime').__version__}: `PYTHONPATH=$PWD python benchmarks/bench_hubfiles.py`"
    )
    text = header + "\n" + table + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
