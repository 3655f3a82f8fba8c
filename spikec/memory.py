"""How much memory a compiled model needs to run, estimated before it is emitted.

A time-unrolled model folds T into the batch axis: every activation is T times larger than the ANN's,
so a large T (or batch) can ask for more memory than the machine has. `compile` estimates the run-time
memory from the canonicalized ANN and refuses, with the numbers, when the unrolled form would not fit
the budget (`memory_budget`, default 80 % of physical RAM, or of the cgroup's memory limit if lower).

The estimate, for a run batch B (the compile option ``batch_size``, or the model's static batch):

1. **Shapes.** ONNX shape inference (with data propagation) on the ANN with its inputs pinned to
   ``[B, *calibration_shape[1:]]``: symbolic sequence lengths etc. come from the calibration data.
   A tensor whose shape stays unknown counts as large as the largest known activation.
2. **Live activations** ``A``: the nodes run in graph (topological) order; a tensor is allocated when
   produced and freed after its last consumer (graph outputs stay). ``A`` is the largest total size of
   the tensors alive at once, each node's inputs and outputs included. Initializers are not activations.
3. **spikec ops** (one step, ``S`` = the largest float activation): a spikec op adds its output next to
   its input, plus the Scan output buffer in the unrolled form (``2 S`` per step), and its Scan state
   and step-body temporaries, which hold one step only (one ``S`` per node of the largest step body).

    unrolled = weights + T * (A + 2 S) + body * S
    stateful = weights + A + 2 S + body * S + states      (states: each spikec op's state goes in and
                                                           out; 4 x the neuron sites' sizes, as many EC
                                                           states counted as neuron states; N x for a
                                                           UGO's input, N hidden neurons per element)

Conservative on purpose: onnxruntime's planner reuses buffers in place where it can, so a real run
usually stays below the estimate; its arena can round allocations up, which the margin covers.
Measured on MiniLM (seq 32, batch 32), peak RSS of `run` minus the interpreter's: 3.1 GiB at T=128
against an estimate of 5.5 GiB. Not included: onnxruntime's transient memory while it creates a session
(graph optimization of the inlined spikec functions), which does not grow with T: about 0.3 GiB for the
digits ViT and 1.1 GiB for MiniLM, and it dominates for small T.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from spikec.errors import SpikecError

DEFAULT_BUDGET_FRACTION = 0.8

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 10**3,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 10**6,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 10**9,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 10**12,
    "TIB": 2**40,
}


def physical_memory() -> int | None:
    """Bytes of physical RAM (os.sysconf), lowered to the cgroup's memory limit where one is set (a
    container), or None where the platform does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    if pages <= 0 or size <= 0:
        return None
    total = pages * size
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as handle:
                limit = handle.read().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < total:
            total = int(limit)
    return total


def default_budget() -> int | None:
    total = physical_memory()
    return None if total is None else int(total * DEFAULT_BUDGET_FRACTION)


def parse_budget(value: int | float | str | None) -> int | None:
    """A memory budget in bytes: an int, or a string with an optional unit (``512M``, ``8GiB``, ``2e9``).
    None means the default (80 % of physical RAM; no limit where that is unknown)."""
    if value is None:
        return default_budget()
    number: float
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _UNITS:
            raise SpikecError(
                f"argument memory_budget={value!r}: expected bytes, optionally with a unit (e.g. 512M, 8G, 8GiB)"
            )
        number = float(match.group(1)) * _UNITS[match.group(2).upper()]
    else:
        raise SpikecError(f"argument memory_budget={value!r}: expected bytes (an int) or a string like '8G'")
    if not np.isfinite(number) or number <= 0:
        raise SpikecError(f"argument memory_budget={value!r}: expected a positive number of bytes")
    return int(number)


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    batch: int
    weights: int  # initializer bytes
    live: int  # A: peak live activation bytes of one step
    largest: int  # S: the largest float activation of one step
    body: int  # nodes of the largest spikec step body
    states: int  # stateful neuron/EC state bytes (in + out)

    def unrolled(self, timesteps: int) -> int:
        return self.weights + timesteps * (self.live + 2 * self.largest) + self.body * self.largest

    def most_timesteps(self, budget: int) -> int:
        """The largest T whose unrolled form fits ``budget`` (0: not even one step)."""
        return max(0, (budget - self.weights - self.body * self.largest) // max(1, self.live + 2 * self.largest))

    def stateful(self) -> int:
        return self.weights + self.live + 2 * self.largest + self.body * self.largest + self.states

    def bytes(self, mode: str, timesteps: int) -> int:
        return self.unrolled(timesteps) if mode == "unrolled" else self.stateful()


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.float64)) * _itemsize(tensor.data_type)


def _pinned(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A weightless copy of `model` with the given input shapes, shapes re-inferred where possible."""
    from spikec.passes.canonicalize import _skeleton  # weightless, keeps shape-like constants

    skeleton = _skeleton(model)
    skeleton.graph.ClearField("value_info")
    for vi in skeleton.graph.input:
        if vi.name in shapes and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape
            dims.ClearField("dim")
            for size in shapes[vi.name]:
                dims.dim.add().dim_value = int(size)
    for out in skeleton.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort here; the symbolic shapes remain
        return _symbolic_fallback(model, shapes)


def _symbolic_fallback(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The canonicalized model's own (symbolic) shapes with the inputs' dim names bound to sizes."""
    bound: dict[str, int] = {}
    for vi in model.graph.input:
        for dim, size in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, ())):
            if dim.WhichOneof("value") == "dim_param":
                bound.setdefault(dim.dim_param, int(size))
    out = onnx.ModelProto()
    out.graph.node.extend(model.graph.node)
    for field in ("input", "output", "value_info"):
        getattr(out.graph, field).extend(getattr(model.graph, field))
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.WhichOneof("value") == "dim_param" and dim.dim_param in bound:
                dim.dim_value = bound[dim.dim_param]
        if vi.name in shapes:
            vi.type.tensor_type.shape.ClearField("dim")
            for size in shapes[vi.name]:
                vi.type.tensor_type.shape.dim.add().dim_value = int(size)
    return out


def _tensor_sizes(inferred: onnx.ModelProto) -> tuple[dict[str, int | None], set[str]]:
    """Bytes of every typed tensor (None where a dim is unknown), and the names of float tensors."""
    sizes: dict[str, int | None] = {}
    floats: set[str] = set()
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if np.issubdtype(_np_dtype(tensor.elem_type), np.floating):
            floats.add(vi.name)
        if not tensor.HasField("shape") or any(d.WhichOneof("value") != "dim_value" for d in tensor.shape.dim):
            sizes.setdefault(vi.name, None)
            continue
        sizes[vi.name] = int(np.prod([d.dim_value for d in tensor.shape.dim], dtype=np.float64)) * _itemsize(
            tensor.elem_type
        )
    return sizes, floats


def _np_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return np.dtype(np.int8)


def _step_body_nodes() -> int:
    from spikec.runtime import ops

    return max(
        sum(1 for n in ops.step_function(op, ops.MIN_ONNX_OPSET).node if n.op_type != "Constant")
        for op in ops.OPS.values()
    )


def estimate(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    batch: int,
    neuron_sites: Iterable[str] = (),
    hidden: Mapping[str, int] | None = None,
) -> MemoryEstimate:
    """Estimate the memory of running the compiled form of the canonicalized ANN `model` on batches of
    `batch` samples shaped like `feeds` (see the module docstring for the formula). ``hidden`` gives the
    sites whose neurons are N per element (an STA UGO's input: N)."""
    constants = {t.name for t in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in model.graph.input:
        if vi.name in constants or vi.name not in feeds:
            continue
        dims = vi.type.tensor_type.shape.dim
        static0 = dims[0].dim_value if len(dims) and dims[0].WhichOneof("value") == "dim_value" else 0
        shapes[vi.name] = (static0 or batch, *np.shape(feeds[vi.name])[1:])
    run_batch = next(iter(shapes.values()))[0] if shapes else batch
    sizes, floats = _tensor_sizes(_pinned(model, shapes))

    known = [s for s in sizes.values() if s is not None]
    largest_known = max(known, default=0)
    # Every node output and graph input is an activation: the unrolled form tiles the inputs T times.
    last_use: dict[str, int] = {}
    nodes = list(model.graph.node)
    for index, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = index
    keep = {o.name for o in model.graph.output}

    def size(name: str) -> int:
        value = sizes.get(name)
        return largest_known if value is None else value

    live = {name: size(name) for name in shapes}
    current = peak = sum(live.values())
    for index, node in enumerate(nodes):
        for name in node.output:
            if name and name not in live:
                live[name] = size(name)
                current += live[name]
        peak = max(peak, current)
        for name in [*node.input, *node.output]:
            if name in live and name not in keep and last_use.get(name, -1) <= index:
                current -= live.pop(name)
    largest = max((size(n) for n in sizes if n in floats and n not in constants), default=largest_known)
    states = 4 * sum(size(name) * (hidden or {}).get(name, 1) for name in set(neuron_sites))
    return MemoryEstimate(
        batch=run_batch,
        weights=sum(_initializer_bytes(t) for t in model.graph.initializer),
        live=peak,
        largest=largest,
        body=_step_body_nodes(),
        states=states,
    )


def stateful_instead(est: MemoryEstimate) -> str:
    """The form whose memory does not grow with T, as a refusal of an unrolled one offers it."""
    return f"--mode stateful (about {format_bytes(est.stateful())}, independent of T)"


def check_budget(est: MemoryEstimate, *, mode: str, timesteps: int, budget: int | None) -> int:
    """The estimate for `mode`; raise a one-line SpikecError when the unrolled form exceeds `budget`.

    Only the unrolled form is refused: it is the one whose memory grows with T. A stateful model
    needs about one step's memory and its run batch is chosen when it runs."""
    need = est.bytes(mode, timesteps)
    if mode == "unrolled" and budget is not None and need > budget:
        raise SpikecError(
            f"argument timesteps={timesteps}: the time-unrolled model needs an estimated {format_bytes(need)} "
            f"to run a batch of {est.batch} (T={timesteps} x {format_bytes(est.live + 2 * est.largest)} of "
            f"activations per step), over the memory budget of {format_bytes(budget)} (argument memory_budget); "
            f"compile with {stateful_instead(est)}, "
            f"or use a smaller --timesteps or --batch-size"
        )
    return need
