"""Fixtures shared by the test modules. The repository root is on sys.path through pytest's ``pythonpath``
(pyproject.toml), so tests import the offline model/data zoo as ``from examples import fixtures``."""

import pytest

from examples import fixtures


@pytest.fixture(scope="session")
def digits():
    """The digits split (x_train/y_train/x_test/y_test) the digits ViT was trained and is evaluated on."""
    return fixtures.digits_data()


@pytest.fixture(scope="session")
def digits_qdq(digits, tmp_path_factory):
    """The digits ViT statically quantized by onnxruntime (QDQ: uint8 activations with zero points, int8
    weights, MatMul/Gemm quantized where SpikeZIP-TF places its quantizers), calibrated on 256 images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    batches = iter([{"pixels": digits["x_train"][i : i + 32]} for i in range(0, 256, 32)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    qdq = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    quantize_static(
        str(fixtures.digits_vit()),
        str(qdq),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
    )
    return qdq


def pytest_collection_modifyitems(items):
    # A dynamo export takes seconds per module where TorchScript takes a fraction of one: the edit loop
    # (`-m "not slow"`) checks patterns on TorchScript exports, the full suite on both.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("exporter") == "dynamo":
            item.add_marker(pytest.mark.slow)
