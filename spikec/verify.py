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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from spikec import modelio
from spikec.errors import SpikecError
from spikec.passes.loader import _one_line
from spikec.runtime import weights
from spikec.runtime.layout import SPIKES_OUTPUT, STEPS_SUFFIX

# protobuf cannot serialize 2 GiB or more: such models are checked from a file with external data.
_PROTOBUF_LIMIT = 2**31 - 1


def _float_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    yield from ((f"weight '{t.name}'", t) for t in model.graph.initializer)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield f"node '{node.name or node.output[0]}' ({node.op_type}) value", attribute.t


def _non_finite(model: onnx.ModelProto, directory: Path | None) -> Iterator[tuple[str, int]]:
    """(tensor, count of inf/NaN values) for every floating-point constant that holds some. External
    tensors are read from ``directory`` one at a time, each mapped only while it is counted."""
    for what, tensor in _float_tensors(model):
        if not np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating):
            continue
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            values = onnx.numpy_helper.to_array(tensor)
        elif directory is not None:
            values = weights.map_tensor(tensor, directory)
        else:
            continue
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        del values
        if bad:
            yield what, bad


@contextlib.contextmanager
def _loadable(model: onnx.ModelProto | Path) -> Iterator[onnx.ModelProto | str]:
    """The model itself (a file, or a message protobuf can serialize), else a file holding it."""
    if isinstance(model, Path):
        yield os.fspath(model)
    elif model.ByteSize() <= _PROTOBUF_LIMIT:
        yield model
    else:
        with modelio.staging(None) as staged:
            staged.save(model)
            yield os.fspath(staged.path)


@dataclass(frozen=True)
class HeldOut:
    """Calibration samples the thresholds never saw, and what the SNN must reproduce on them."""

    feeds: Mapping[str, np.ndarray]
    reference: onnx.ModelProto  # the ANN; SpikeZIP-TF: the quantized ANN it is equivalent to
    reference_name: str
    batch_size: int
    held_out: bool  # False where calibration had a single sample, which is then verified on
    # the model the user gave, where the method converted another one made from it (SpikeZIP-TF's QANN of a
    # float ANN): the reference is measured against it too, so that what quantizing cost is said
    given: onnx.ModelProto | None = None


def verify(
    model: onnx.ModelProto | str | os.PathLike,
    label: str,
    ann: onnx.ModelProto | None = None,
    held_out: HeldOut | None = None,
) -> dict | None:
    """Check ``model`` (a ModelProto, or a file: one written with external data) and raise a SpikecError
    starting with ``label`` (the input the model was converted from) where it is invalid. ``ann``: that
    input; an inf/NaN weight it did not have is refused. With ``held_out``, the model also runs on those
    samples: a failure to run or an inf/NaN output where the reference is finite is refused; the fidelity
    per output is returned (spikec.evaluate's measures). References to external data resolve against the
    active spikec.runtime.weights.source (a file's against its directory)."""
    from spikec.evaluate import measures, run_dataset
    from spikec.runtime.session import InferenceSession, quiet_options

    if isinstance(model, onnx.ModelProto):
        proto, directory = model, weights.source_directory()
    else:
        model = Path(model)
        proto, directory = onnx.load(model, load_external_data=False), model.parent
    for what, count in _non_finite(proto, directory):
        if ann is None or next(_non_finite(ann, weights.source_directory()), None) is None:
            raise SpikecError(
                f"{label}: the converted model's {what} holds {count} inf/NaN value(s) where the "
                f"input's weights are finite (values overflow float32); nothing was written"
            )
        break
    # the references first: one session, with its weights, at a time
    want = None if held_out is None else run_dataset(held_out.reference, held_out.feeds, batch_size=held_out.batch_size)
    given = (
        None
        if held_out is None or held_out.given is None
        else run_dataset(held_out.given, held_out.feeds, batch_size=held_out.batch_size)
    )
    options = quiet_options()
    if held_out is None:  # only loading is checked: the weights stay mapped, not packed for running
        options.add_session_config_entry("session.disable_prepacking", "1")
    with _loadable(model) as loadable:
        try:
            onnx.checker.check_model(loadable, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
            raise SpikecError(
                f"{label}: the converted model fails onnx.checker ({_one_line(exc)}); nothing was written"
            ) from None
        try:
            session = InferenceSession(loadable, options)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exceptions share no base class below Exception
            raise SpikecError(
                f"{label}: onnxruntime cannot load the converted model ({_one_line(exc)}); nothing was written"
            ) from None
        if held_out is None or want is None:
            return None
        result = _fidelity(session, held_out, want, label)
    if given is not None:
        result["reference_against_input"] = {name: measures(given[name], want[name]) for name in result["outputs"]}
    return result


def _fidelity(session, held_out: HeldOut, want: dict[str, np.ndarray], label: str) -> dict:
    from spikec.evaluate import measures, run_dataset

    count = len(next(iter(held_out.feeds.values())))
    try:
        got = run_dataset(session, held_out.feeds, batch_size=held_out.batch_size)
    except SpikecError as exc:
        raise SpikecError(
            f"{label}: the converted model does not run on held-out calibration samples ({exc}); nothing was written"
        ) from None
    outputs = {}
    for name, reference in want.items():
        if name not in got:
            continue
        finite = np.isfinite(reference)
        estimate = got[name].astype(np.float64)
        broken = int(np.count_nonzero(~np.isfinite(estimate) & finite))
        if broken:
            raise SpikecError(
                f"{label}: the converted model outputs {broken} inf/NaN value(s) in '{name}' on "
                f"{count} held-out calibration sample(s) where the {held_out.reference_name} is "
                f"finite; nothing was written"
            )
        outputs[name] = measures(reference, estimate)
    spikes = got.get(SPIKES_OUTPUT + STEPS_SUFFIX)  # [T, samples]: sum-semantics models
    return {
        "samples": count,
        "held_out": held_out.held_out,
        "reference": held_out.reference_name,
        "timesteps": None if session.mode == "ttfs" else session.timesteps,
        "outputs": outputs,
        # no neuron fired at the last step: nothing changes any more (inputs and constants arrive at the first)
        **({} if spikes is None else {"quiet_samples": int(np.count_nonzero(spikes[-1] == 0))}),
    }
