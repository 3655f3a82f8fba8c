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

Memory stays bounded however much data is fed: per tap, exact min/max (global and per channel) and the
count cover all data, while percentiles, mean/std and MMSE use a deterministic uniform sample of at most
`max_values` values (whole rows of the channel axis; every value while the data fits in the budget).
"""

from __future__ import annotations

import contextvars
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from tqdm import tqdm

from spikec.errors import SpikecError
from spikec.passes.loader import check_input_file
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

# STA's neuron-wise search: Vth = max * (1 - 0.005 i), i = 0..94.
DEFAULT_MMSE_GRID = np.linspace(0.53, 1.0, 95)

_SAMPLE_SEED = 0

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
                raise SpikecError(f"{what} {path}: member '{key}' is not a valid .npy array ({_one_line(exc)})") from None
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
    else:
        source = f"{what} {path_or_dict}"
        arrays = read_npz(path_or_dict, what)

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


def _check_positive_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpikecError(f"argument {argument}={value!r}: expected a positive integer")
    return int(value)


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
    """A CPU session whose outputs include `outputs`, created once per calibration run."""
    options = dict(sess_options=quiet_options(), providers=["CPUExecutionProvider"])
    declared = {o.name for o in graph.graph.output}
    missing = [name for name in outputs if name not in declared]
    if path is None and any(uses_external_data(t) for t in graph.graph.initializer):
        raise SpikecError(f"{label}: has external weights that are not loaded; pass the model's file path instead")
    try:
        if path is not None and not missing:
            return ort.InferenceSession(str(path), **options)
        model = onnx.ModelProto()
        model.CopyFrom(graph)
        if path is not None:
            load_external_data_for_model(model, str(path.parent))
        known = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.input]}
        # ORT accepts an output with no type; a declared type is reused when shape inference left one.
        model.graph.output.extend(known.get(name, onnx.ValueInfoProto(name=name)) for name in missing)
        if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
            return ort.InferenceSession(model.SerializeToString(), **options)
        # Protobuf cannot serialise >2 GB: go through a file with the weights stored beside it. ORT reads
        # (or maps) the weights while creating the session, so the directory can go right after.
        with tempfile.TemporaryDirectory(prefix="spikec-calib-", ignore_cleanup_errors=True) as tmp:
            file = os.path.join(tmp, "model.onnx")
            onnx.save_model(
                model, file, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data"
            )
            return ort.InferenceSession(file, **options)
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
    graph, path, label = _load_model(model_or_path)
    batch_size = _check_positive_int(batch_size, "batch_size")
    names = list(dict.fromkeys(outputs))
    if not names:
        raise SpikecError(f"{label}: argument outputs is empty; name at least one tensor to fetch")
    _check_outputs(graph, names, label)
    feeds = load_inputs(inputs, graph)
    batch_size = _batch_size(graph, feeds, batch_size, label)
    session = _session(graph, path, names, label)
    return _iterate(session, feeds, names, batch_size, progress, desc, label)


def _iterate(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    names: list[str],
    batch_size: int,
    progress: bool,
    desc: str,
    label: str,
) -> Iterator[dict[str, np.ndarray]]:
    samples = next(iter(feeds.values())).shape[0]
    with tqdm(total=samples, desc=desc, unit="sample", disable=None if progress else True) as bar:
        for start in range(0, samples, batch_size):
            stop = min(start + batch_size, samples)
            batch = {name: array[start:stop] for name, array in feeds.items()}
            try:
                values = session.run(names, batch)
            except Exception as exc:  # see _session
                sources = _SOURCES.get()
                data = f" of the {sources[1]}" if sources else ""
                raise SpikecError(f"{label}: onnxruntime failed on samples {start}:{stop}{data}: "
                                  f"{_one_line(exc)}") from None
            bar.update(stop - start)
            yield dict(zip(names, values))


def _check_percentile(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 <= p <= 100:
        raise SpikecError(f"argument p={p!r}: expected a percentile in [0, 100]")
    return float(p)


@dataclass(frozen=True, eq=False)
class TapStats:
    """Statistics of one calibrated tensor, viewed as rows over its channel axis.

    `count`, `min`, `max` and `absmax` are exact over all calibration data. `percentile`, `mmse` and the
    mean/std in `to_json` use `sample` ([rows, channels] float32, a uniform sample of whole rows, equal
    to all data when it fit in the budget), so e.g. `percentile(100)` may sit below `max()`.
    """

    name: str
    shape: tuple[int | None, ...]  # as fetched per batch; None where a dimension varied between batches
    channel_axis: int  # non-negative
    count: int  # values seen
    sample: np.ndarray = field(repr=False)
    channel_min: np.ndarray = field(repr=False)
    channel_max: np.ndarray = field(repr=False)

    @property
    def channels(self) -> int:
        return int(self.channel_min.shape[0])

    @staticmethod
    def _reduce(per_channel: np.ndarray, keep: bool, combine: Callable) -> np.ndarray | np.float32:
        return per_channel.copy() if keep else np.float32(combine(per_channel))

    def min(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(self.channel_min, per_channel, np.min)

    def max(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(self.channel_max, per_channel, np.max)

    def absmax(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(np.maximum(-self.channel_min, self.channel_max), per_channel, np.max)

    def percentile(self, p: float, per_channel: bool = False) -> np.ndarray | np.float32:
        """The p-th percentile (linear interpolation, as np.percentile) of the sample; [C] if per_channel."""
        p = _check_percentile(p)
        if per_channel:
            return np.percentile(self.sample, p, axis=0).astype(np.float32)
        return np.float32(np.percentile(self.sample, p))

    def mmse(
        self,
        quantize: Callable[[np.ndarray, np.ndarray], np.ndarray],
        *,
        per_channel: bool = False,
        grid: Sequence[float] | np.ndarray | None = None,
        reference: str = "absmax",
    ) -> np.ndarray | np.float32:
        """Threshold g * ref (g in `grid`, ref = absmax or max) minimising sum((quantize(x, thr) - x)^2).

        `quantize(x, thr)` gets the sample x [rows, C] and thr as a float32 scalar array (per tensor) or
        [C] (per channel, searched independently for each channel) and returns an array shaped like x.
        Ties go to the earliest grid entry. Channels (or a tensor) whose reference is <= 0 never carry a
        positive value to threshold: they get 0 and are not searched.
        """
        if reference not in ("absmax", "max"):
            raise SpikecError(f"tap '{self.name}': argument reference={reference!r}: expected 'absmax' or 'max'")
        grid = DEFAULT_MMSE_GRID if grid is None else np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or not (np.isfinite(grid).all() and (grid > 0).all()):
            raise SpikecError(f"tap '{self.name}': argument grid: expected a non-empty 1-D array of positive factors")
        ref = np.maximum(-self.channel_min, self.channel_max) if reference == "absmax" else self.channel_max
        if not per_channel:
            ref = ref.max(keepdims=True)
        live = ref > 0
        ref = np.where(live, ref, 1)  # a zero threshold would make quantize divide by zero
        x = self.sample
        errors = np.empty((grid.size, ref.size))
        for i, g in enumerate(grid):
            thr = (g * ref).astype(np.float32)
            q = np.asarray(quantize(x, thr if per_channel else thr[0]))
            if q.shape != x.shape:
                raise SpikecError(f"tap '{self.name}': quantize returned shape {q.shape}, expected {x.shape}")
            # in float64: the square of a float32 error can overflow float32
            per_channel_error = np.square(q.astype(np.float64) - x).sum(axis=0)
            errors[i] = per_channel_error if per_channel else per_channel_error.sum()
        best = np.where(live, grid[errors.argmin(axis=0)] * ref, 0).astype(np.float32)
        return best if per_channel else best[0]

    def to_json(self) -> dict:
        """A JSON-serialisable summary for reports."""
        p1, p99, p999 = np.percentile(self.sample, [1, 99, 99.9])
        return {
            "name": self.name,
            "shape": list(self.shape),
            "channel_axis": self.channel_axis,
            "channels": self.channels,
            "count": self.count,
            "min": float(self.min()),
            "max": float(self.max()),
            "p1": float(p1),
            "p99": float(p99),
            "p99.9": float(p999),
            "mean": float(self.sample.mean(dtype=np.float64)),
            "std": float(self.sample.std(dtype=np.float64)),
        }


class _TapAccumulator:
    """Exact per-channel min/max plus a reservoir sample of rows, fed one batch at a time.

    The sample depends only on the data and the fixed seed, not on how it was split into batches.
    """

    def __init__(self, name: str, channel_axis: int, max_values: int):
        self.name = name
        self.requested_axis = channel_axis
        self.max_values = max_values
        # Set from the first batch:
        self.axis = 0
        self.capacity = 0  # rows kept
        self.shape: list[int | None] | None = None
        self.cmin = self.cmax = np.empty(0, np.float32)
        self.rows_seen = 0
        self.chunks: list[np.ndarray] = []  # rows kept while the reservoir is still filling
        self.reservoir: np.ndarray | None = None
        self.rng = np.random.default_rng(_SAMPLE_SEED)

    def add(self, x: np.ndarray) -> None:
        rows = self._rows(x)
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

    def _sample(self, rows: np.ndarray) -> None:
        fill = max(0, min(len(rows), self.capacity - self.rows_seen))
        if fill:
            self.chunks.append(rows[:fill])
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

    def finish(self) -> TapStats:
        if self.rows_seen == 0 or self.shape is None:
            raise SpikecError(f"tap '{self.name}': produced no values (shape {self.shape})")
        sample = self.reservoir if self.reservoir is not None else np.concatenate(self.chunks)
        return TapStats(
            name=self.name,
            shape=tuple(self.shape),
            channel_axis=self.axis,
            count=self.rows_seen * sample.shape[1],
            sample=sample,
            channel_min=self.cmin,
            channel_max=self.cmax,
        )


def collect_statistics(
    model: ModelLike,
    inputs: str | os.PathLike | Mapping[str, np.ndarray],
    taps: Sequence[str],
    *,
    batch_size: int = 32,
    channel_axis: int = -1,
    max_values: int = 2_000_000,
    progress: bool = True,
) -> dict[str, TapStats]:
    """Run calibration and return `TapStats` for each tap (a float tensor of the top-level graph).

    Each tap is viewed as rows over `channel_axis` (default last, i.e. hidden size for Transformers) and
    keeps at most `max_values` sampled values (at least one row); see the module docstring.
    """
    names = list(dict.fromkeys(taps))
    if not names:
        raise SpikecError("argument taps is empty; name at least one tensor to calibrate")
    max_values = _check_positive_int(max_values, "max_values")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise SpikecError(f"argument channel_axis={channel_axis!r}: expected an integer axis")
    accumulators = {name: _TapAccumulator(name, int(channel_axis), max_values) for name in names}
    for batch in run_batches(model, inputs, names, batch_size=batch_size, progress=progress):
        for name, value in batch.items():
            accumulators[name].add(value)
    return {name: acc.finish() for name, acc in accumulators.items()}
