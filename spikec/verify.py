"""The last stage of a compile, before anything is written: exit status 0 means a valid model.

Every model spikec returns or writes (an SNN, a quantized ANN) must pass onnx.checker's full check
(strict type and shape inference, the model-local spikec functions included), load in an onnxruntime
session with spikec's op library (runtime/session.py: native kernels where built, the fused chains),
and hold no inf/NaN weight unless its ANN had one: folding thresholds or scales into weights can
overflow float32, and such a model would run and answer garbage. A model that fails is refused with one
line naming the cause: an invalid model is spikec's failure to convert that input, never the user's to
discover later.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from spikec.errors import SpikecError
from spikec.modelio import save_with_external_data
from spikec.passes.loader import _one_line

# protobuf cannot serialize 2 GiB or more: such models are checked from a file with external data.
_PROTOBUF_LIMIT = 2**31 - 1


def _float_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    yield from ((f"weight '{t.name}'", t) for t in model.graph.initializer)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield f"node '{node.name or node.output[0]}' ({node.op_type}) value", attribute.t


def _non_finite(model: onnx.ModelProto) -> Iterator[tuple[str, int]]:
    """(tensor, count of inf/NaN values) for every floating-point constant that holds some."""
    for what, tensor in _float_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if not np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating):
            continue
        values = onnx.numpy_helper.to_array(tensor)
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            yield what, bad


@contextlib.contextmanager
def _loadable(model: onnx.ModelProto) -> Iterator[onnx.ModelProto | str]:
    """The model itself, or a file holding it where protobuf cannot serialize it in one piece."""
    if model.ByteSize() <= _PROTOBUF_LIMIT:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="spikec-verify-") as directory:
        path = Path(directory) / "model.onnx"
        save_with_external_data(model, path, "model.onnx.data")
        yield os.fspath(path)


def verify(model: onnx.ModelProto, label: str, ann: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Return ``model`` if it is valid, else raise a SpikecError starting with ``label`` (the input the
    model was converted from). ``ann``: that input; an inf/NaN weight it did not have is refused."""
    from spikec.runtime.session import InferenceSession

    if ann is None or next(_non_finite(ann), None) is None:
        for what, count in _non_finite(model):
            raise SpikecError(f"{label}: the converted model's {what} holds {count} inf/NaN value(s) where the "
                              f"input's weights are finite (values overflow float32); nothing was written")
    with _loadable(model) as loadable:
        try:
            onnx.checker.check_model(loadable, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
            raise SpikecError(f"{label}: the converted model fails onnx.checker ({_one_line(exc)}); "
                              f"nothing was written") from None
        try:
            InferenceSession(loadable)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exceptions share no base class below Exception
            raise SpikecError(f"{label}: onnxruntime cannot load the converted model ({_one_line(exc)}); "
                              f"nothing was written") from None
    return model
