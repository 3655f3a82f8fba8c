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
import multiprocessing
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
