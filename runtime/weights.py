"""Weights that stay on disk: a model's external data is memory-mapped, never copied into the protos,
graphs and sessions a compile passes it through.

A billion-parameter model has several GiB of weights, and every ModelProto copy, graphsurgeon
import/export and onnxruntime session that held them would add as much again. A model with external data
is therefore compiled as its graph with references: its tensors stay EXTERNAL, their locations relative
to the model's directory, which `source` makes the directory of the compile's references. Each consumer
resolves them where it needs values:

* graphsurgeon (`_load_lazy`, `_export_tensor`): a Constant's values are a read-only memory map of the
  file (no copy; pages are read when touched and dropped with the map), and a Constant whose values are
  still that map exports as the same reference; graphsurgeon itself would read the file relative to the
  working directory, copy the bytes into the exported proto and mark the copy EXTERNAL;
* onnxruntime (`session_options`): the session reads the files itself (it maps them);
* writing (`DataFile`): a tensor goes into a data file straight from its source file
  (``os.copy_file_range``: no copy in this process's memory) or from the array that holds it.

The graphsurgeon hooks are installed when this module is imported (the loader imports it); reading
resolves references only inside `source`, elsewhere graphsurgeon behaves as it does.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from spikec.errors import SpikecError

# Tensors at least this large go to a data file (onnx.save_model's default size_threshold).
EXTERNAL_MIN_BYTES = 1024
# Offsets in a data file written here are multiples of this: a page, so that every tensor can be mapped alone.
_ALIGNMENT = 4096
_COPY_CHUNK = 64 * 2**20

_SOURCE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("spikec_weights_source", default=None)


@contextlib.contextmanager
def source(directory: str | os.PathLike | None) -> Iterator[None]:
    """While this block runs, external-data locations of the models it handles resolve against ``directory``
    (the directory of the model file they came from; None: no model with external references)."""
    token = _SOURCE.set(None if directory is None else Path(directory))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def source_directory() -> Path | None:
    return _SOURCE.get()


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_span(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length in bytes) of an external tensor; the length is the one its dims and type
    need (a declared length must hold at least that much)."""
    entries = _entries(tensor)
    need = nbytes_of(tensor)
    try:
        offset = int(entries.get("offset", 0))
        declared = int(entries["length"]) if "length" in entries else need
    except ValueError:
        raise SpikecError(f"tensor '{tensor.name}': external data offset/length are not integers") from None
    if "location" not in entries or offset < 0 or declared < need:
        raise SpikecError(f"tensor '{tensor.name}': external data entry {entries} does not hold its {need} bytes")
    return entries["location"], offset, need


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The model's initializers that keep their data in a file (references; what ``source`` resolves)."""
    return (t for t in model.graph.initializer if uses_external_data(t))


def check_external(model: onnx.ModelProto, directory: Path, label: str) -> None:
    """Check that every external tensor of ``model`` lies within a regular file under ``directory``, without
    reading it. A SpikecError names the model and the file at fault."""
    sizes: dict[str, int] = {}
    for tensor in external_tensors(model):
        location, offset, length = external_span(tensor)
        if location not in sizes:
            path = directory / location
            if os.path.isabs(location) or ".." in Path(location).parts:
                raise SpikecError(f"{label}: external data location '{location}' leaves the model's directory")
            if not path.is_file():
                raise SpikecError(
                    f"{label}: cannot read external data ({path}: {'not a file' if path.exists() else 'no such file'})"
                )
            sizes[location] = path.stat().st_size
        if offset + length > sizes[location]:
            raise SpikecError(
                f"{label}: cannot read external data ({directory / location} holds "
                f"{sizes[location]} bytes; tensor '{tensor.name}' needs bytes {offset}..{offset + length})"
            )


class MappedArray(np.ndarray):
    """A tensor's values mapped read-only from its external-data file. ``reference`` is the tensor (its
    external entry) on the array that was mapped; arrays derived from it (views, results) have None."""

    reference: onnx.TensorProto | None = None

    def __array_finalize__(self, obj) -> None:
        self.reference = None

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # results of arithmetic are new values, plain arrays
        plain = np.asarray(array).view(np.ndarray)
        return plain[()] if return_scalar else plain


def map_tensor(tensor: onnx.TensorProto, directory: Path) -> MappedArray:
    """The values of an external tensor, mapped read-only from its file under ``directory``."""
    location, offset, _ = external_span(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(tensor.dims)
    if math.prod(shape) == 0:
        mapped = np.empty(shape, dtype).view(MappedArray)
    else:
        try:
            mapped = np.memmap(directory / location, dtype=dtype, mode="r", offset=offset, shape=shape).view(
                MappedArray
            )
        except (OSError, ValueError) as exc:
            raise SpikecError(
                f"tensor '{tensor.name}': cannot map external data {directory / location} ({exc})"
            ) from None
    mapped.reference = tensor
    return mapped


def session_options(options, directory: Path | None = None):
    """``options`` (onnxruntime SessionOptions) for a model given as bytes whose external references resolve
    against ``directory`` (default: the active ``source``); onnxruntime then maps the files itself."""
    directory = directory if directory is not None else _SOURCE.get()
    if directory is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(directory))
    return options


def load_all(model: onnx.ModelProto, directory: Path | None = None) -> onnx.ModelProto:
    """``model`` with every external tensor read into it (in place; the in-memory form callers expect of a
    small model). References resolve against ``directory`` (default: the active ``source``)."""
    directory = directory if directory is not None else _SOURCE.get()
    for tensor in list(external_tensors(model)):
        _read_in(tensor, directory)
    return model


def inline(tensor: onnx.TensorProto, directory: Path | None = None) -> onnx.TensorProto:
    """``tensor`` holding its values (a copy where it references external data, else itself)."""
    if not uses_external_data(tensor):
        return tensor
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return _read_in(copy, directory if directory is not None else _SOURCE.get())


def _read_in(tensor: onnx.TensorProto, directory: Path | None) -> onnx.TensorProto:
    if directory is None:
        raise SpikecError(f"tensor '{tensor.name}': external data with no model directory to read it from")
    tensor.raw_data = map_tensor(tensor, directory).tobytes()
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]
    return tensor


# Tensors smaller than this, and integer tensors of index types, are an exporter's constants (shapes,
# scalars, position ids), which differ between exports of the same weights.
_DIGEST_MIN_ELEMENTS = 64
_DIGEST_SKIPPED = (np.int64, np.int32, np.bool_, np.object_)
_DIGEST_CHUNK = 2**22


def digest(model: onnx.ModelProto) -> str:
    """A fingerprint of ``model``'s weights: the set of its weight tensors (initializers and Constant nodes,
    resolved against the active ``source`` where external), each by its type and the multiset of its values.
    Names, order, storage, layout (a weight stored transposed) and duplicates do not change it, so the same
    weights exported again by another route match, and another model's do not."""
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    parts = set()
    for tensor in tensors:
        if math.prod(tensor.dims) < _DIGEST_MIN_ELEMENTS:
            continue
        values = onnx.numpy_helper.to_array(inline(tensor))
        if values.dtype.type in _DIGEST_SKIPPED:
            continue
        parts.add(f"{values.dtype.str}:{values.size}:{_multiset_hash(values)}")
    return hashlib.blake2b("".join(sorted(parts)).encode(), digest_size=16).hexdigest()


def _multiset_hash(values: np.ndarray) -> int:
    """A hash of the values' bit patterns that does not depend on their order: a sum (mod 2^64) of each
    pattern mixed by splitmix64's finalizer, exact integer arithmetic."""
    width = values.dtype.itemsize if values.dtype.itemsize in (1, 2, 4, 8) else 1
    patterns = np.ascontiguousarray(values).reshape(-1).view(f"u{width}")
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for start in range(0, patterns.size, _DIGEST_CHUNK):  # bounded temporaries for a large embedding
            bits = patterns[start : start + _DIGEST_CHUNK].astype(np.uint64)
            bits ^= bits >> np.uint64(30)
            bits *= np.uint64(0xBF58476D1CE4E5B9)
            bits ^= bits >> np.uint64(27)
            bits *= np.uint64(0x94D049BB133111EB)
            bits ^= bits >> np.uint64(31)
            total += bits.sum(dtype=np.uint64)
    return int(total)


def nbytes_of(tensor: onnx.TensorProto) -> int:
    """Bytes of a (non-string) tensor's values, external or not."""
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


class DataFile:
    """An external-data file being written, tensor after tensor, each at a page-aligned offset."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "xb")
        self._offset = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pad(self) -> int:
        start = -(-self._offset // _ALIGNMENT) * _ALIGNMENT
        if start > self._offset:
            self._file.write(b"\0" * (start - self._offset))
            self._offset = start
        return start

    def add(self, tensor: onnx.TensorProto, values: np.ndarray | None = None) -> onnx.TensorProto:
        """Append ``values`` (else the data of ``tensor``: inline, or external under the active ``source``)
        and return a tensor of ``tensor``'s name, type and dims that references what was written."""
        start = self._pad()
        if isinstance(values, MappedArray) and values.reference is not None:
            tensor, values = values.reference, None  # unchanged weights: copied from their file
        if values is None and uses_external_data(tensor):
            length = self._copy_external(tensor)
        else:
            data = onnx.numpy_helper.to_array(tensor) if values is None else np.asarray(values)
            data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
            self._file.write(data.reshape(-1).data.cast("B"))
            length = data.nbytes
        self._offset = start + length
        reference = onnx.TensorProto(
            name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL
        )
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            reference.external_data.add(key=key, value=value)
        return reference

    def _copy_external(self, tensor: onnx.TensorProto) -> int:
        directory = _SOURCE.get()
        if directory is None:
            raise SpikecError(f"tensor '{tensor.name}': external data with no model directory to read it from")
        location, offset, length = external_span(tensor)
        self._file.flush()
        with open(directory / location, "rb") as source_file:
            copied = 0
            while copied < length:
                count = min(_COPY_CHUNK, length - copied)
                try:  # in the kernel: the bytes never pass through this process's memory
                    done = os.copy_file_range(
                        source_file.fileno(), self._file.fileno(), count, offset + copied, self._offset + copied
                    )
                except OSError:  # another file system, or no such call: read in chunks
                    done = 0
                if done == 0:
                    os.lseek(self._file.fileno(), self._offset + copied, os.SEEK_SET)
                    done = os.write(self._file.fileno(), os.pread(source_file.fileno(), count, offset + copied))
                copied += done
        self._file.seek(self._offset + length)
        return length


def externalize(graph: gs.Graph, data: DataFile, min_bytes: int = EXTERNAL_MIN_BYTES) -> None:
    """Write every constant of ``graph`` of at least ``min_bytes`` into ``data``, in graph order, and make it
    a reference to what was written: the arrays it held (new weights) are then free, and exporting the
    graph copies no weight. Smaller constants that reference a source file are read in."""
    for tensor in graph.tensors().values():
        if (
            not isinstance(tensor, gs.Constant)
            or isinstance(tensor._values, SparseValues)
            or tensor.dtype in (None, np.object_, np.str_)
        ):
            continue  # strings have no raw form
        values = tensor._values
        if values.nbytes < min_bytes:
            if _references(values):
                tensor.values = np.array(tensor.values)
                tensor.data_location = None
            continue
        if isinstance(values, LazyValues):
            reference = data.add(values.tensor)
        else:
            described = onnx.TensorProto(
                name=tensor.name, dims=values.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            )
            reference = data.add(described, values)
        reference.name = tensor.name
        tensor._values = LazyValues(reference)
        tensor.data_location = onnx.TensorProto.EXTERNAL


def read_foldable(graph: gs.Graph) -> None:
    """Read into memory the constants that reference a file and feed a node of constants only: graphsurgeon
    folds such nodes by running them in onnxruntime from a proto that has no directory to resolve
    references against (an exporter's Transpose of a weight, say); the folded result is new data anyway."""
    for node in graph.nodes:
        if node.inputs and all(isinstance(t, gs.Constant) for t in node.inputs):
            for tensor in node.inputs:
                if _references(tensor._values):
                    tensor.values = np.array(tensor.values)


def _references(values) -> bool:
    """Whether a Constant's values are still a reference to a file (unread, or mapped and unchanged)."""
    return (isinstance(values, LazyValues) and uses_external_data(values.tensor)) or (
        isinstance(values, MappedArray) and values.reference is not None
    )


# ------------------------------------------------------------------ graphsurgeon, resolving references

_gs_load = LazyValues.load
_gs_export_tensor = OnnxExporter.export_tensor_proto


def _load_lazy(self: LazyValues) -> np.ndarray:
    directory = _SOURCE.get()
    if directory is not None and not isinstance(self, SparseValues) and uses_external_data(self.tensor):
        return map_tensor(self.tensor, directory)
    return _gs_load(self)


def _export_tensor(tensor: gs.Constant) -> onnx.TensorProto:
    values = tensor._values
    if isinstance(values, MappedArray) and values.reference is not None:
        exported = onnx.TensorProto()
        exported.CopyFrom(values.reference)
        exported.name = tensor.name
        return exported
    exported = _gs_export_tensor(tensor)
    if exported.data_location == onnx.TensorProto.EXTERNAL and not exported.external_data:
        exported.data_location = onnx.TensorProto.DEFAULT  # values held in memory, written into the proto
    return exported


LazyValues.load = _load_lazy
OnnxExporter.export_tensor_proto = staticmethod(_export_tensor)
