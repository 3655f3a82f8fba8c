"""Writing models and arrays safely: never a half-written file, never over the input."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from spikec.errors import SpikecError

# protobuf cannot serialize a message of 2 GiB or more: larger models keep their weights beside them.
_PROTOBUF_LIMIT = 2**31 - 1


def check_output_path(output: str | os.PathLike, source: str | os.PathLike | None = None,
                      what: str = "input model") -> Path:
    """Reject an output that would overwrite the source (``what`` names it) or cannot be written."""
    out = Path(output)
    if source is not None and out.resolve() == Path(source).resolve():
        raise SpikecError(f"output {out}: equals the {what}; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise SpikecError(f"output {out}: is a directory")
    if not parent.is_dir():
        raise SpikecError(f"output {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SpikecError(f"output {out}: directory {parent} is not writable")
    return out


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike) -> Path:
    path = check_output_path(output)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        # Weights go to <name>.data beside the model; both are written in a private directory first
        # and moved into place data-first, so a reader never sees a model without its data.
        data_name = path.name + ".data"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
            onnx.save_model(model, os.path.join(staging, path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name)
            os.replace(os.path.join(staging, data_name), path.parent / data_name)
            os.replace(os.path.join(staging, path.name), path)
        return path
    _atomic(path, lambda tmp: onnx.save_model(model, tmp))
    return path


def save_arrays_atomic(arrays: Mapping[str, np.ndarray], output: str | os.PathLike) -> Path:
    path = check_output_path(output)
    # np.savez appends .npz to names without it: write through a file object instead.
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    _atomic(path, write)
    return path
