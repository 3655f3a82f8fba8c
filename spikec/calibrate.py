"""Calibration: run the ANN on sample inputs and summarise the activations that spiking neurons will replace.

Every conversion method needs statistics of intermediate tensors ("taps"): ECMT takes per-layer 99th/1st
percentiles, STA grid-searches per-channel thresholds by MMSE, SpikeZIP initialises LSQ-like scales and
TTFS needs [a, b] ranges. This module provides the shared pieces:

- `load_inputs` reads an .npz keyed by model input name (axis 0 = samples) and checks it against the model;
- `run_batches` runs the model in onnxruntime in batches and yields any intermediate tensors;
- `collect_statistics` turns those tensors into `TapStats`, from which thresholds are derived.

Calibrate on held-out data (e.g. a slice of the training set), never on the evaluation set: thresholds
fitted to the test inputs leak into the reported accuracy. ECMT's reference code calibrates on its test
loader, so its published numbers carry that leak.

Memory stays bounded however much data is fed: activations are summarised batch by batch, and per tap
exact min/max (global and per channel) and the count cover all data, while percentiles, mean/std and MMSE
use a deterministic uniform sample of at most `max_values` values (whole rows of the channel axis; every
value while the data fits in the budget).

Calibration scales with the data: statistics merge (`TapStats.merge`: exact extremes and counts, the
sample of one pass where it fits the budget, else a uniform one), so it runs in several processes
(``workers``), and it saves its state to a checkpoint as it goes, from which an interrupted run resumes
to the result of an uninterrupted one (``checkpoint``); a progress bar shows the time left.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from spikec.errors import SpikecError
from spikec.passes.loader import check_input_file
from spikec.passes.stats import DEFAULT_MMSE_GRID, SAMPLE_SEED, TapStats, check_positive_int
from spikec.runtime import weights
from spikec.runtime.session import quiet_options

__all__ = [
    "DEFAULT_MMSE_GRID",
    "TapStats",
    "collect_statistics",
    "load_inputs",
    "naming_sources",
    "read_npz",
    "run_batches",
]

ModelLike = onnx.ModelProto | str | os.PathLike


def _one_line(exc: BaseException) -> str:
    """First line of an exception message: onnxruntime and zipfile messages span several lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What the model and data of the running compile came from: the passes hand in-memory copies to
# calibration, and an error there must name the user's files, not the exporter's graph name.
_SOURCES: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("spikec_sources", default=None)


def _source_label(source: object, what: str) -> str:
    return f"{what} {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else f"{what} (in memory)"


def naming_sources(function: Callable) -> Callable:
    """Decorates ``function(model, calibration, ...)`` (compile, quantize): while it runs, calibration
    errors on in-memory copies of the model name the file it came from, and the calibration data."""

    @functools.wraps(function)
    def named(model, calibration, *args, **kwargs):
        token = _SOURCES.set((_source_label(model, "model"), _source_label(calibration, "calibration data")))
        try:
            return function(model, calibration, *args, **kwargs)
        finally:
            _SOURCES.reset(token)

    return named


def _load_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None, str]:
    """The model's graph (external weights not loaded), its file if it came from one, and a label for messages."""
    if isinstance(model, onnx.ModelProto):
        sources = _SOURCES.get()
        return model, None, sources[0] if sources else "model (in memory)"
    path = Path(model)
    try:
        return onnx.load(str(path), load_external_data=False), path, str(path)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... with no common base
        raise SpikecError(f"{path}: cannot read ONNX model: {_one_line(exc)}") from exc


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs the caller must feed; initializers listed as inputs (IR < 4 style) have defaults."""
    constants = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def _dims(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    """The declared dimensions, or None when the rank is unknown."""
    tensor = vi.type.tensor_type
    return list(tensor.shape.dim) if tensor.HasField("shape") else None


def _dim_str(dim: onnx.TensorShapeProto.Dimension) -> str:
    kind = dim.WhichOneof("value")
    return str(dim.dim_value) if kind == "dim_value" else dim.dim_param if kind == "dim_param" else "?"


def _shape_str(dims: Sequence[onnx.TensorShapeProto.Dimension] | None) -> str:
    return "[" + ", ".join(_dim_str(d) for d in dims) + "]" if dims is not None else "[any rank]"


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive; anything else (no such file, not an archive, a member that is not
    a valid .npy array, a pickled object array) is a SpikecError naming the file and the member."""
    path = check_input_file(path, f"{what} {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises OSError, ValueError, EOFError, BadZipFile, ... for what it cannot read
        raise SpikecError(f"{what} {path}: not a readable .npz archive ({_one_line(exc)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise SpikecError(f"{what} {path}: is a single .npy array; expected an .npz archive keyed by model input name")
    arrays = {}
    with loaded:
        for key in loaded.files:
            try:
                # Members are read lazily: corrupt entries and object (pickled) arrays fail only here, with
                # any of ValueError, EOFError, BadZipFile, SyntaxError, ...
                value = loaded[key]
            except Exception as exc:
                raise SpikecError(
                    f"{what} {path}: member '{key}' is not a valid .npy array ({_one_line(exc)})"
                ) from None
            if not isinstance(value, np.ndarray):  # numpy returns a member without the .npy magic as raw bytes
                raise SpikecError(f"{what} {path}: member '{key}' is not a .npy array")
            arrays[key] = value
    return arrays


def _coerce_dtype(array: np.ndarray, expected: np.dtype, where: str) -> np.ndarray:
    """Cast `array` to the input's dtype when no information is lost in meaning.

    Accepted: float -> any float (a downcast such as float64 -> float32 rounds; overflow is an error) and
    bool/int/uint -> any integer (values must fit). Rejected: float for integer inputs (token ids must not be
    silently truncated) and int/bool for float inputs (raw pixels or ids fed to a float input are usually
    unnormalised data, so the caller must convert explicitly).
    """
    got = array.dtype
    if got == expected:
        return array
    if np.issubdtype(expected, np.floating) and np.issubdtype(got, np.floating):
        cast = array.astype(expected)
        if not np.isfinite(cast).all():  # the caller has already rejected non-finite data
            raise SpikecError(f"{where}: values overflow {expected} (got {got}, max |x| = {np.abs(array).max():g})")
        return cast
    if np.issubdtype(expected, np.integer) and (np.issubdtype(got, np.integer) or got == np.bool_):
        info = np.iinfo(expected)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise SpikecError(f"{where}: values [{array.min()}, {array.max()}] do not fit {expected} (got {got})")
        return array.astype(expected)
    if expected == np.object_ and got.kind in "US":
        return array  # string inputs: onnxruntime takes numpy str arrays as they are
    raise SpikecError(f"{where}: dtype {got} cannot feed a {expected} input")


def load_inputs(
    path_or_dict: str | os.PathLike | Mapping[str, np.ndarray],
    model: ModelLike,
    *,
    what: str = "calibration data",
) -> dict[str, np.ndarray]:
    """Load model inputs from an .npz (or a dict) keyed by graph input name and check them against `model`.

    Each array is [samples, *input_shape[1:]]: axis 0 of the model input is the samples axis, the other
    static dimensions must match exactly and symbolic dimensions shared between inputs must agree. All
    inputs need the same, non-zero, number of samples; float inputs must be finite. Dtypes are cast as
    described in `_coerce_dtype` (float64 data for a float32 input is rounded to float32). Returns the
    arrays in graph-input order, cast to the model's dtypes. `what` names the data in error messages.
    """
    graph, _, _ = _load_model(model)
    if isinstance(path_or_dict, Mapping):
        source, arrays = what, {}
        for key, value in path_or_dict.items():
            try:
                arrays[key] = np.asarray(value)
            except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot convert
                raise SpikecError(f"{what}: input '{key}': not an array ({_one_line(exc)})") from None
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = f"{what} {path_or_dict}"
        arrays = read_npz(path_or_dict, what)
    else:
        raise SpikecError(
            f"{what}: expected an .npz file's path or a mapping of input names to arrays, "
            f"got {type(path_or_dict).__name__}"
        )

    expected = _graph_inputs(graph)
    if not expected:
        raise SpikecError(f"{source}: the model has no inputs to feed, so there is nothing to calibrate with")
    names = [vi.name for vi in expected]
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise SpikecError(f"{source}: unexpected key '{extra[0]}'; model inputs are {names}")

    result: dict[str, np.ndarray] = {}
    symbolic: dict[str, tuple[str, int, int]] = {}  # dim_param -> (input, axis, size) where first seen
    for vi in expected:
        where = f"{source}: input '{vi.name}'"
        if vi.type.WhichOneof("value") != "tensor_type":
            raise SpikecError(f"{where}: only tensor inputs are supported (got {vi.type.WhichOneof('value')})")
        dims = _dims(vi)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if vi.name not in arrays:
            raise SpikecError(f"{where}: missing (expected {dtype} {_shape_str(dims)}); got keys {sorted(arrays)}")
        array = arrays[vi.name]
        if array.ndim == 0:
            raise SpikecError(f"{where}: got a scalar; expected {dtype} {_shape_str(dims)} with samples on axis 0")
        if dims is not None and array.ndim != len(dims):
            raise SpikecError(f"{where}: expected rank {len(dims)} {_shape_str(dims)}, got shape {list(array.shape)}")
        if array.shape[0] == 0:
            raise SpikecError(f"{where}: has zero samples (shape {list(array.shape)})")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = np.count_nonzero(~np.isfinite(array))
            raise SpikecError(f"{where}: contains {bad} NaN/Inf value(s)")
        array = _coerce_dtype(array, dtype, where)
        # Axis 0 is the samples axis: batching decides its size.
        for axis, dim in enumerate((dims or [])[1:], start=1):
            size = array.shape[axis]
            if dim.WhichOneof("value") == "dim_value" and size != dim.dim_value:
                raise SpikecError(
                    f"{where}: axis {axis} must be {dim.dim_value} ({_shape_str(dims)}), got shape {list(array.shape)}"
                )
            if dim.WhichOneof("value") == "dim_param":
                first = symbolic.setdefault(dim.dim_param, (vi.name, axis, size))
                if first[2] != size:
                    raise SpikecError(
                        f"{where}: axis {axis} ('{dim.dim_param}') is {size} but input '{first[0]}' "
                        f"axis {first[1]} is {first[2]}"
                    )
        result[vi.name] = np.ascontiguousarray(array)

    counts = {name: a.shape[0] for name, a in result.items()}
    if len(set(counts.values())) > 1:
        raise SpikecError(f"{source}: inputs have different sample counts on axis 0: {counts}")
    return result


def _check_outputs(graph: onnx.ModelProto, names: Sequence[str], label: str) -> None:
    """Every requested tensor must exist in the top-level graph (subgraph tensors cannot be exposed)."""
    constants = {t.name for t in graph.graph.initializer}
    known = {o for node in graph.graph.node for o in node.output if o} | {i.name for i in _graph_inputs(graph)}
    for name in names:
        if name in known:
            continue
        if name in constants:
            raise SpikecError(f"{label}: tensor '{name}' is an initializer (a constant), not an activation")
        raise SpikecError(f"{label}: tensor '{name}' is not produced by the model's top-level graph")


def _session(graph: onnx.ModelProto, path: Path | None, outputs: Sequence[str], label: str) -> ort.InferenceSession:
    """A CPU session whose outputs include `outputs`, created once per calibration run.

    External weights stay in their files: onnxruntime maps them from the model's directory (the file's, or
    for an in-memory model with references, the compile's ``spikec.runtime.weights.source``), so that exposing
    intermediate tensors copies the graph, not the weights."""
    options = dict(sess_options=quiet_options(), providers=["CPUExecutionProvider"])
    declared = {o.name for o in graph.graph.output}
    missing = [name for name in outputs if name not in declared]
    directory = path.parent if path is not None else weights.source_directory()
    if directory is None and any(uses_external_data(t) for t in graph.graph.initializer):
        raise SpikecError(f"{label}: has external weights that are not loaded; pass the model's file path instead")
    try:
        if path is not None and not missing:
            return ort.InferenceSession(str(path), **options)
        model = graph
        if missing:  # declared on a copy: the caller's model stays as it was
            model = onnx.ModelProto()
            model.CopyFrom(graph)
            known = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.input]}
            # ORT accepts an output with no type; a declared type is reused when shape inference left one.
            model.graph.output.extend(known.get(name, onnx.ValueInfoProto(name=name)) for name in missing)
        if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
            return ort.InferenceSession(
                model.SerializeToString(),
                **{**options, "sess_options": weights.session_options(quiet_options(), directory)},
            )
        # Protobuf cannot serialise >2 GB held in memory: go through a file with the weights stored beside it.
        # ORT reads (or maps) the weights while creating the session, so the directory can go right after.
        with tempfile.TemporaryDirectory(prefix="spikec-calib-", ignore_cleanup_errors=True) as tmp:
            file = os.path.join(tmp, "model.onnx")
            onnx.save_model(
                weights.load_all(model, directory),
                file,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location="model.data",
            )
            return ort.InferenceSession(file, **options)
    except SpikecError:
        raise
    except Exception as exc:  # onnxruntime's pybind exceptions share no base class below Exception
        raise SpikecError(f"{label}: onnxruntime cannot load the model: {_one_line(exc)}") from exc


def _batch_size(graph: onnx.ModelProto, inputs: Mapping[str, np.ndarray], requested: int, label: str) -> int:
    """`requested`, unless the model was exported with a static batch dimension, which then wins."""
    static = {
        vi.name: dims[0].dim_value
        for vi in _graph_inputs(graph)
        if (dims := _dims(vi)) and dims[0].WhichOneof("value") == "dim_value"
    }
    if not static:
        return requested
    sizes = set(static.values())
    samples = next(iter(inputs.values())).shape[0]
    if len(sizes) > 1:
        raise SpikecError(f"{label}: inputs have different static batch sizes {static}")
    size = sizes.pop()
    if samples % size:
        name = next(iter(static))
        raise SpikecError(
            f"{label}: input '{name}' has a static batch size of {size}, which does not divide the {samples} samples"
        )
    return size


def run_batches(
    model_or_path: ModelLike,
    inputs: str | os.PathLike | Mapping[str, np.ndarray],
    outputs: Sequence[str],
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "calibrating",
) -> Iterator[dict[str, np.ndarray]]:
    """Run the model over `inputs` in batches and yield {name: array} for each requested tensor per batch.

    `inputs` is an .npz path or a dict, checked with `load_inputs`. `outputs` may name any tensor of the
    top-level graph (graph inputs and intermediates included); intermediates are exposed by adding graph
    outputs to a copy of the model. Validation and session creation happen at call time; inference runs
    as the iterator is consumed. A model exported with a static batch dimension runs at that size.
    """
    run = _Run(model_or_path, inputs, outputs, batch_size)
    # the batches need the session, not the model: a model made for this run goes as soon as the caller lets
    # it go, not with the last batch
    return _iterate(0, run.session, run.names, run.feeds, run.batch_size, run.label, progress, desc, None)


class _Run:
    """A model checked and opened for fetching ``outputs`` over ``inputs`` in batches (see run_batches)."""

    def __init__(self, model_or_path: ModelLike, inputs, outputs: Sequence[str], batch_size: int):
        graph, path, self.label = _load_model(model_or_path)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.names = list(dict.fromkeys(outputs))
        if not self.names:
            raise SpikecError(f"{self.label}: argument outputs is empty; name at least one tensor to fetch")
        _check_outputs(graph, self.names, self.label)
        self.graph = graph
        self.feeds = load_inputs(inputs, graph)
        self.samples = next(iter(self.feeds.values())).shape[0]
        self.batch_size = _batch_size(graph, self.feeds, batch_size, self.label)
        self.session = _session(graph, path, self.names, self.label)

    def batches(
        self,
        start: int = 0,
        progress: bool = True,
        desc: str = "calibrating",
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """{name: array} per batch, from sample ``start`` on; a progress bar with the time left (over all
        samples, those before ``start`` counted as done), or ``on_batch(samples)`` after each batch."""
        return _iterate(
            start, self.session, self.names, self.feeds, self.batch_size, self.label, progress, desc, on_batch
        )


def _iterate(
    start: int,
    session: ort.InferenceSession,
    names: list[str],
    feeds: Mapping[str, np.ndarray],
    batch_size: int,
    label: str,
    progress: bool,
    desc: str,
    on_batch: Callable[[int], None] | None,
) -> Iterator[dict[str, np.ndarray]]:
    samples = next(iter(feeds.values())).shape[0]
    with tqdm(
        total=samples,
        initial=start,
        desc=desc,
        unit="sample",
        disable=None if progress and on_batch is None else True,
    ) as bar:
        for begin in range(start, samples, batch_size):
            stop = min(begin + batch_size, samples)
            batch = {name: array[begin:stop] for name, array in feeds.items()}
            try:
                values = session.run(names, batch)
            except Exception as exc:  # see _session
                sources = _SOURCES.get()
                data = f" of the {sources[1]}" if sources else ""
                raise SpikecError(
                    f"{label}: onnxruntime failed on samples {begin}:{stop}{data}: {_one_line(exc)}"
                ) from None
            bar.update(stop - begin)
            if on_batch is not None:
                on_batch(stop - begin)
            yield dict(zip(names, values))


class _TapAccumulator:
    """Exact per-channel min/max plus a reservoir sample of rows, fed one batch at a time.

    The sample depends only on the data and the fixed seed, not on how it was split into batches, and the
    state (`state`, `restore`) carries over to another run: a calibration resumed from a checkpoint
    continues the same sequence.
    """

    def __init__(self, name: str, channel_axis: int, max_values: int, token_axes: Sequence[int] = ()):
        self.name = name
        self.requested_axis = channel_axis
        self.max_values = max_values
        self.token_axes = tuple(token_axes)  # see _token_axes
        # Set from the first batch:
        self.axis = 0
        self.capacity = 0  # rows kept
        self.shape: list[int | None] | None = None
        self.cmin = self.cmax = np.empty(0, np.float32)
        self.rows_seen = 0
        self.chunks: list[np.ndarray] = []  # rows kept while the reservoir is still filling
        self.reservoir: np.ndarray | None = None
        self.rng = np.random.default_rng(SAMPLE_SEED)

    def add(self, x: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Summarise the batch ``x``; ``valid`` ([batch, seq] booleans) leaves out the rows at padded positions
        of the token axes."""
        rows = self._rows(x)
        if valid is not None and (keep := self._valid_rows(x, valid)) is not None:
            rows = rows[keep]
        if not len(rows):
            return
        bmin, bmax = rows.min(axis=0), rows.max(axis=0)
        # min/max propagate NaN, so checking C values finds any NaN/Inf in the batch.
        if not (np.isfinite(bmin).all() and np.isfinite(bmax).all()):
            raise SpikecError(f"tap '{self.name}': produced NaN/Inf values; calibrate a finite tensor")
        if self.rows_seen == 0:
            self.cmin, self.cmax = bmin, bmax
        else:
            np.minimum(self.cmin, bmin, out=self.cmin)
            np.maximum(self.cmax, bmax, out=self.cmax)
        self._sample(rows)

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """x as float32 [rows, channels], after checking it agrees with earlier batches."""
        if not np.issubdtype(x.dtype, np.floating):
            raise SpikecError(
                f"tap '{self.name}': dtype {x.dtype} is not a float tensor; only activations can be calibrated"
            )
        if self.shape is None:
            if not -x.ndim <= self.requested_axis < x.ndim:
                raise SpikecError(
                    f"tap '{self.name}': argument channel_axis={self.requested_axis} is out of range "
                    f"for shape {list(x.shape)}"
                )
            self.axis = self.requested_axis % x.ndim
            if x.shape[self.axis] == 0:
                raise SpikecError(f"tap '{self.name}': channel axis {self.axis} is empty (shape {list(x.shape)})")
            self.shape = list(x.shape)
            # Budget in whole rows so that every channel is sampled equally often.
            self.capacity = max(1, self.max_values // x.shape[self.axis])
        elif x.ndim != len(self.shape) or x.shape[self.axis] != self.shape[self.axis]:
            raise SpikecError(
                f"tap '{self.name}': shape changed from {self.shape} to {list(x.shape)} between batches "
                f"(rank and channel axis {self.axis} must stay fixed)"
            )
        self.shape = [s if s == n else None for s, n in zip(self.shape, x.shape)]
        channels = x.shape[self.axis]
        return np.moveaxis(x, self.axis, -1).reshape(-1, channels).astype(np.float32, copy=False)

    def _valid_rows(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        """Which of x's rows (as _rows orders them) lie at valid positions of every token axis other than the
        channel axis (probabilities over padded keys are channels: they stay); None to keep them all."""
        row_axes = [i for i in range(x.ndim) if i != self.axis]
        token = [i for i in self.token_axes if i != self.axis]
        if not token or row_axes[0] != 0 or x.shape[0] != len(valid):
            return None
        keep = position_mask(valid, [row_axes.index(axis) for axis in token], len(row_axes))
        return np.broadcast_to(keep, [x.shape[i] for i in row_axes]).reshape(-1)

    def _sample(self, rows: np.ndarray) -> None:
        fill = max(0, min(len(rows), self.capacity - self.rows_seen))
        if fill:
            # a copy where only part is kept: a view would keep the whole batch alive
            self.chunks.append(rows if fill == len(rows) else rows[:fill].copy())
        first = self.rows_seen + fill
        self.rows_seen += len(rows)
        rest = rows[fill:]
        if not len(rest):
            return
        if self.reservoir is None:
            self.reservoir = np.concatenate(self.chunks)
            self.chunks = []
        # Algorithm R, vectorised: the row with global index i replaces slot j ~ U{0..i} when j < capacity.
        index = np.arange(first, first + len(rest))
        slot = (self.rng.random(len(rest)) * (index + 1)).astype(np.int64)
        source = np.flatnonzero(slot < self.capacity)
        slot = slot[source]
        # Rows of one batch may pick the same slot; sequentially the latest row would win.
        _, last_from_end = np.unique(slot[::-1], return_index=True)
        winners = len(slot) - 1 - last_from_end
        self.reservoir[slot[winners]] = rest[source[winners]]

    def _kept(self) -> np.ndarray:
        if self.reservoir is None:
            self.chunks = [np.concatenate(self.chunks)] if len(self.chunks) > 1 else self.chunks
            return self.chunks[0]
        return self.reservoir

    def finish(self) -> TapStats:
        if self.rows_seen == 0 or self.shape is None:
            raise SpikecError(f"tap '{self.name}': produced no values (shape {self.shape})")
        sample = self._kept()
        return TapStats(
            name=self.name,
            shape=tuple(self.shape),
            channel_axis=self.axis,
            count=self.rows_seen * sample.shape[1],
            sample=sample,
            channel_min=self.cmin,
            channel_max=self.cmax,
        )

    def state(self, prefix: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able settings, arrays) from which `restore` rebuilds this accumulator exactly."""
        meta = {
            "name": self.name,
            "axis": self.axis,
            "capacity": self.capacity,
            "shape": self.shape,
            "rows_seen": self.rows_seen,
            "filling": self.reservoir is None,
            "rng": self.rng.bit_generator.state,
        }
        if self.rows_seen == 0:
            return meta, {}
        return meta, {f"{prefix}.min": self.cmin, f"{prefix}.max": self.cmax, f"{prefix}.sample": self._kept()}

    def restore(self, meta: dict, arrays: Mapping[str, np.ndarray], prefix: str) -> None:
        self.axis, self.capacity, self.rows_seen = meta["axis"], meta["capacity"], meta["rows_seen"]
        self.shape = meta["shape"]
        self.rng.bit_generator.state = meta["rng"]
        if self.rows_seen:
            self.cmin, self.cmax = arrays[f"{prefix}.min"].copy(), arrays[f"{prefix}.max"].copy()
            sample = arrays[f"{prefix}.sample"].copy()
            self.chunks, self.reservoir = ([sample], None) if meta["filling"] else ([], sample)


def _fingerprint(
    graph: onnx.ModelProto, feeds: Mapping[str, np.ndarray], taps: Sequence[str], settings: Mapping[str, object]
) -> str:
    """What a checkpoint's statistics depend on: the graph (nodes; initializers by content, or by file
    reference where external), the taps, the data and the settings."""
    digest = hashlib.sha256(json.dumps([list(taps), dict(settings)], sort_keys=True).encode())
    for node in graph.graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for tensor in graph.graph.initializer:
        digest.update(tensor.SerializeToString(deterministic=True))
    for name, array in feeds.items():
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


_CHECKPOINT_KEY = "spikec.calibration_checkpoint"


class _Checkpoint:
    """Where calibration saves its accumulators, to resume from after an interruption (see collect_statistics)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, every: float, reads: list):
        self.path, self.fingerprint, self.every, self.reads = Path(path), fingerprint, every, reads
        self.saved_at = time.monotonic()

    def load(self, accumulators: Mapping[str, _TapAccumulator]) -> int:
        """Restore the accumulators from the checkpoint when it was made for this calibration; returns the
        sample to continue from (0: none to resume)."""
        if not self.path.is_file():
            return 0
        arrays = read_npz(self.path, "calibration checkpoint")
        try:
            meta = json.loads(bytes(arrays.pop(_CHECKPOINT_KEY)).decode())
            if meta["fingerprint"] != self.fingerprint:
                return 0  # another model, data or settings: start afresh (and replace it)
            for index, (name, accumulator) in enumerate(accumulators.items()):
                accumulator.restore(meta["taps"][name], arrays, str(index))
            return int(meta["next_sample"])
        except (KeyError, ValueError, TypeError) as exc:
            raise SpikecError(
                f"calibration checkpoint {self.path}: not a spikec calibration checkpoint "
                f"({_one_line(exc)}); remove it or name another file"
            ) from None

    def save(self, accumulators: Mapping[str, _TapAccumulator], next_sample: int, force: bool = False) -> None:
        if not force and time.monotonic() - self.saved_at < self.every:
            return
        from spikec import modelio

        meta: dict = {"fingerprint": self.fingerprint, "next_sample": next_sample, "taps": {}}
        arrays: dict[str, np.ndarray] = {}
        for index, (name, accumulator) in enumerate(accumulators.items()):
            meta["taps"][name], tap_arrays = accumulator.state(str(index))
            arrays.update(tap_arrays)
        arrays[_CHECKPOINT_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        modelio.write([("calibration checkpoint", self.path, arrays)], self.reads)
        self.saved_at = time.monotonic()


def collect_statistics(
    model: ModelLike,
    inputs: str | os.PathLike | Mapping[str, np.ndarray],
    taps: Sequence[str],
    *,
    batch_size: int = 32,
    channel_axis: int = -1,
    max_values: int = 2_000_000,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    workers: int = 1,
    padding_mask: str | None = None,
) -> dict[str, TapStats]:
    """Run calibration and return `TapStats` for each tap (a float tensor of the top-level graph).

    Each tap is viewed as rows over `channel_axis` (default last, i.e. hidden size for Transformers) and
    keeps at most `max_values` sampled values (at least one row); see the module docstring. Activations
    are summarised batch by batch: memory is bounded by the batch and the samples, not by the data.

    ``checkpoint``: an .npz file to which the statistics so far are saved (at most every
    ``checkpoint_every`` seconds, and at the end); a calibration of the same model, taps, data and
    settings that finds it resumes after the samples it covers, and its result is the one of an
    uninterrupted run, bit for bit (a complete checkpoint is the result: nothing is run again).
    ``workers``: processes that each calibrate a contiguous share of the samples (each with its own
    session: as many copies of the weights), merged in order with `TapStats.merge`.
    ``padding_mask``: the graph input that marks padded positions with 0 ([batch, seq] booleans or integers,
    see passes/patterns.padding_mask_input). Where padded positions reach none of the model's outputs, their
    rows are left out of each tap whose token axes `_token_axes` finds; elsewhere (outputs along the
    sequence, a static sequence axis, a tap that mixes positions) every row counts, as without a mask.
    """
    names = list(dict.fromkeys(taps))
    if not names:
        raise SpikecError("argument taps is empty; name at least one tensor to calibrate")
    max_values = check_positive_int(max_values, "max_values")
    workers = check_positive_int(workers, "workers")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise SpikecError(f"argument channel_axis={channel_axis!r}: expected an integer axis")
    if workers > 1:
        return _collect_in_processes(
            model,
            inputs,
            names,
            workers,
            progress,
            checkpoint,
            dict(
                batch_size=batch_size,
                channel_axis=int(channel_axis),
                max_values=max_values,
                checkpoint_every=checkpoint_every,
                padding_mask=padding_mask,
            ),
        )
    return _collect(
        model,
        inputs,
        names,
        batch_size=batch_size,
        channel_axis=int(channel_axis),
        max_values=max_values,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        padding_mask=padding_mask,
    )


def token_axes(
    model: ModelLike, inputs, names: Sequence[str], mask: str, batch_size: int = 2
) -> dict[str, tuple[int, ...]]:
    """`_token_axes` of the tensors ``names``: per tensor whose padded positions reach no output, the axes that
    run along the sequence of the input ``mask`` (position_mask spreads the mask over them)."""
    return _token_axes(_Run(model, inputs, names, batch_size), mask)


def position_mask(unpadded: np.ndarray, axes: Sequence[int], rank: int) -> np.ndarray:
    """``unpadded`` ([batch, seq] booleans) spread over a tensor of ``rank`` axes with the batch first: True
    where every axis of ``axes`` is at an unpadded position, size 1 along the other axes."""
    keep = np.ones((len(unpadded),) + (1,) * (rank - 1), bool)
    for axis in axes:
        shape = [len(unpadded)] + [1] * (rank - 1)
        shape[axis] = unpadded.shape[1]
        keep = keep & unpadded.reshape(shape)
    return keep


def _token_axes(run: _Run, mask: str) -> dict[str, tuple[int, ...]]:
    """Per tap, the axes that run along the sequence axis of the input ``mask`` ([batch, seq], 0 at padded
    positions), where padded positions reach no output of the model; {} where they may.

    Samples padded at one end run at full length and with that padded position cut off (from every input
    whose axis 1 is dynamic and of the mask's length). The padded positions reach no output when the model's
    outputs keep their shapes and values (a sentence embedding pooled under the mask, a class token's logits):
    outputs along the sequence (last_hidden_state, a decoder's logits) have padded positions of their own,
    which verification compares. A tap's token axes are those that shrank by the cut, with the batch leading;
    a static sequence axis, no sample padded at an end, or a model that cannot run shorter give {}."""
    values = run.feeds.get(mask)
    inputs = {vi.name: _dims(vi) for vi in _graph_inputs(run.graph)}
    if values is None or values.ndim != 2 or values.dtype.kind not in "biu" or values.shape[1] < 2:
        return {}
    length = values.shape[1]
    shortened = [
        name
        for name, array in run.feeds.items()
        if array.ndim >= 2
        and array.shape[1] == length
        and (dims := inputs.get(name)) is not None
        and dims[1].WhichOneof("value") != "dim_value"
    ]
    count = min(run.samples, _batch_size(run.graph, run.feeds, 2, run.label))
    # samples with a token left: a fully masked one's outputs may be NaN, or anything
    padded = {end: np.flatnonzero((values[:, end] == 0) & values.any(axis=1)) for end in (-1, 0)}
    cut = next(((end, kept) for end, kept in ((-1, slice(None, -1)), (0, slice(1, None))) if len(padded[end])), None)
    if mask not in shortened or cut is None:
        return {}
    # a static batch size may need more samples than are padded there: repeat them
    samples = np.resize(padded[cut[0]], count)
    full = {name: array[samples] for name, array in run.feeds.items()}
    short = {name: array[:, cut[1]] if name in shortened else array for name, array in full.items()}
    outputs = [o.name for o in run.graph.graph.output]
    fetched = list(dict.fromkeys([*outputs, *run.names]))
    try:
        long = dict(zip(fetched, run.session.run(fetched, full)))
        brief = dict(zip(fetched, run.session.run(fetched, short)))
    except Exception:  # see _session; a model that cannot run shorter is calibrated on every row
        return {}
    for name in outputs:
        if not _same_output(long[name], brief[name]):
            return {}
    axes = {}
    for name in run.names:
        before, after = long[name].shape, brief[name].shape
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        if (
            len(before) == len(after)
            and changed
            and before[0] == count
            and 0 not in changed
            and all(before[i] == length and after[i] == length - 1 for i in changed)
        ):
            axes[name] = tuple(changed)
    return axes


def _same_output(full: np.ndarray, short: np.ndarray) -> bool:
    if full.shape != short.shape:
        return False
    if not np.issubdtype(full.dtype, np.floating):
        return bool(np.array_equal(full, short))
    # float32 sums over a different number of (masked, zero) terms round differently
    scale = float(np.abs(np.nan_to_num(full, posinf=0, neginf=0)).max(initial=0))
    return bool(np.allclose(full, short, rtol=0, atol=1e-4 * scale, equal_nan=True))


def _collect(
    model: ModelLike,
    inputs,
    names: list[str],
    *,
    batch_size: int,
    channel_axis: int,
    max_values: int,
    progress: bool,
    checkpoint,
    checkpoint_every: float,
    padding_mask: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, TapStats]:
    run = _Run(model, inputs, names, batch_size)
    token_axes = _token_axes(run, padding_mask) if padding_mask is not None else {}
    unpadded = run.feeds[padding_mask] != 0 if padding_mask is not None and token_axes else None
    accumulators = {name: _TapAccumulator(name, channel_axis, max_values, token_axes.get(name, ())) for name in names}
    saver, start = None, 0
    if checkpoint is not None:
        settings = {
            "batch_size": run.batch_size,
            "channel_axis": channel_axis,
            "max_values": max_values,
            "padding_mask": padding_mask,
        }
        reads = [] if not isinstance(model, (str, os.PathLike)) else [("input model", Path(model))]
        reads += [("calibration data", Path(inputs))] if isinstance(inputs, (str, os.PathLike)) else []
        saver = _Checkpoint(checkpoint, _fingerprint(run.graph, run.feeds, names, settings), checkpoint_every, reads)
        start = saver.load(accumulators)
        if on_batch is not None and start:
            on_batch(start)
    done = start
    for batch in run.batches(start, progress=progress, on_batch=on_batch):
        stop = min(done + run.batch_size, run.samples)
        for name, value in batch.items():
            accumulators[name].add(value, None if unpadded is None else unpadded[done:stop])
        done = stop
        if saver is not None and done < run.samples:
            saver.save(accumulators, done)
    if saver is not None and start < run.samples:
        saver.save(accumulators, run.samples, force=True)
    return {name: acc.finish() for name, acc in accumulators.items()}


def _collect_in_processes(
    model: ModelLike, inputs, names: list[str], workers: int, progress: bool, checkpoint, settings: dict
) -> dict[str, TapStats]:
    """collect_statistics over ``workers`` processes, each on a contiguous share of the samples (whole
    batches), with a checkpoint of its own (``<checkpoint>.<i>-of-<n>``); one progress
    bar over all samples."""
    import multiprocessing
    import queue as queues

    graph, path, label = _load_model(model)
    feeds = load_inputs(inputs, graph)
    samples = next(iter(feeds.values())).shape[0]
    # shares of whole batches: each runs the batches one pass would (the same shapes, the same sample)
    step = _batch_size(graph, feeds, check_positive_int(settings["batch_size"], "batch_size"), label)
    bounds = [min(samples, -(-samples * k // workers // step) * step) for k in range(workers + 1)]
    shares = [(begin, stop) for begin, stop in zip(bounds, bounds[1:]) if stop > begin]
    context = multiprocessing.get_context("spawn")
    jobs = []
    with (
        context.Manager() as manager,
        context.Pool(len(shares), initializer=_quiet_worker) as pool,
        tqdm(total=samples, desc="calibrating", unit="sample", disable=None if progress else True) as bar,
    ):
        done = manager.Queue()
        for index, (begin, stop) in enumerate(shares):
            part = None if checkpoint is None else f"{os.fspath(checkpoint)}.{index + 1}-of-{len(shares)}"
            jobs.append(
                pool.apply_async(
                    _collect_share,
                    (
                        path if path is not None else graph,
                        {k: v[begin:stop] for k, v in feeds.items()},
                        names,
                        settings,
                        part,
                        done,
                        weights.source_directory(),
                        _SOURCES.get(),
                    ),
                )
            )
        try:
            while not all(job.ready() for job in jobs):
                try:
                    bar.update(done.get(timeout=0.2))
                except queues.Empty:
                    pass
            parts = [job.get() for job in jobs]
            # workers that end on the queue's sentinel: Pool.__exit__'s terminate() alone drains the task
            # queue under its read lock and relies on SIGTERM to end a worker waiting for that lock
            pool.close()
            pool.join()
        except BaseException:
            pool.terminate()
            raise
        while not done.empty():
            bar.update(done.get())
    stats: dict[str, TapStats] = parts[0]
    for share in parts[1:]:
        stats = {name: stats[name].merge(share[name], settings["max_values"]) for name in names}
    return stats


def _quiet_worker() -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to the parent: no second report of an
    interrupt. SIGTERM keeps its default action: it is how the parent's Pool.terminate() ends them, and a
    worker that ignored it could block terminate() for ever."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collect_share(model, feeds, names, settings, checkpoint, done, directory, sources) -> dict[str, TapStats]:
    token = _SOURCES.set(sources)
    try:
        with weights.source(directory):
            return _collect(model, feeds, names, progress=False, checkpoint=checkpoint, on_batch=done.put, **settings)
    finally:
        _SOURCES.reset(token)
