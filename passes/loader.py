"""Load an ONNX model, validate it, and optionally override its input shapes.

Every failure is a one-line SpikecError naming the file (or the argument) at fault.
The source file is only ever read.
"""

from __future__ import annotations

import heapq
import math
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from spikec.passes.contrib import MS, NCHWC, onnxruntime_schemas
from spikec.runtime.metadata import IN_MEMORY, PREFIX
from spikec.runtime.weights import check_external

from spikec.errors import SpikecError

MIN_OPSET = 13


def load_model(
    src: str | Path | onnx.ModelProto,
    *,
    input_shapes: dict[str, list[int | str]] | None = None,
    convert_with: str | None = None,
    map_weights: bool = False,
) -> onnx.ModelProto:
    """Return a checked copy of `src` (a path, or a ModelProto that is left untouched).

    External data is read into the model, unless `map_weights`: then the tensors stay references to their
    files (checked to be there and long enough), to be resolved within ``spikec.runtime.weights.source(the model's
    directory)`` (see runtime/weights.py).

    `input_shapes` replaces the dims of the named graph inputs: ints are static, strings are
    symbolic (e.g. {"input_ids": ["batch", 32]}). `convert_with` names the method the model is loaded
    to be converted with: then it must be an ANN spikec can convert (`check_convertible`).
    """
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        where = IN_MEMORY
        _check_opset(model, where)
        _import_contrib_domains(model)
        _sort_nodes(model)
        _run_checker(model, where)
    else:
        where = str(src)
        model = _read(Path(src), map_weights)
    _check_tensors(model, where)
    if convert_with is not None:
        check_convertible(model, where, convert_with)
    if input_shapes:
        _override_input_shapes(model, input_shapes, where)
    return model


def check_convertible(model: onnx.ModelProto, where: str, method: str) -> None:
    """Refuse, in one line, the inputs a conversion would turn into an invalid or a different model: a
    spikec model (converting it again mixes two op sets of the same names), outputs no node computes (the
    time-stepped forms repeat the graph inputs over time; TTFS drops such an output). float16 models and
    quantized weights are made float32 by canonicalize (passes/dequantize.py)."""
    meta = {p.key.removeprefix(PREFIX): p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if "method" in meta:
        steps = "one pass" if meta.get("mode") == "ttfs" else f"T {meta.get('timesteps', '?')}"
        raise SpikecError(
            f"{where}: already a spikec model (method {meta['method']}, {steps}); convert the original ANN instead"
        )
    spiking = sorted({n.op_type for n in model.graph.node if n.domain == "spikec"})
    if spiking:
        raise SpikecError(
            f"{where}: already a spikec model (it runs spikec ops: {', '.join(spiking[:4])}); "
            f"convert the original ANN instead"
        )
    computed = {o for n in model.graph.node for o in n.output}
    for output in model.graph.output:
        if output.name not in computed:
            raise SpikecError(
                f"{where}: output '{output.name}' is not computed by any node (a graph input or "
                f"constant passed through), which a {method} conversion cannot keep as it is: drop "
                f"that output from the model"
            )


def check_input_file(path: str | os.PathLike, label: str) -> Path:
    """``path`` if it is a regular file to read; a directory, FIFO or device is refused, not read (reading
    a FIFO nobody writes would block for ever)."""
    path = Path(path)
    if not path.is_file():
        raise SpikecError(f"{label}: {'not a file' if path.exists() else 'no such file'}")
    return path


def _read(path: Path, map_weights: bool) -> onnx.ModelProto:
    check_input_file(path, str(path))
    try:
        # External data is loaded only after the checks: a model over 2 GB cannot be serialized
        # back for the in-memory checker, so the checker reads it from its path instead.
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise SpikecError(f"{path}: not an ONNX model ({_one_line(exc)})") from exc
    if model.ir_version == 0 or not model.HasField("graph"):
        # Protobuf parses many byte strings (the empty file included) into an empty message.
        raise SpikecError(f"{path}: not an ONNX model (no ir_version or graph)")
    _check_opset(model, str(path))
    # the in-memory copy holds no external data, so it is small enough to check wherever the file is not
    changed = _import_contrib_domains(model)
    changed |= _sort_nodes(model)
    _run_checker(model if changed else path, str(path))
    if map_weights:
        check_external(model, path.parent, str(path))
        return model
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:  # missing, unreadable, or shorter than the tensors it should hold
        raise SpikecError(f"{path}: cannot read external data ({_one_line(exc)})") from exc
    return model


def _check_opset(model: onnx.ModelProto, where: str) -> None:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise SpikecError(f"{where}: no default-domain opset_import")
    if versions[0] < MIN_OPSET:
        raise SpikecError(
            f"{where}: opset {versions[0]} is below the minimum {MIN_OPSET}; re-export with opset_version>={MIN_OPSET}"
        )


def _import_contrib_domains(model: onnx.ModelProto) -> bool:
    """Add the opset import of onnxruntime's contrib domains where nodes use them without one (a model an
    optimizer wrote with onnx.save, not with its own save, which adds it): onnxruntime runs such models,
    assuming version 1, and the checker would refuse them. Says whether it added one."""
    imported = {o.domain for o in model.opset_import}
    missing = sorted({n.domain for n in model.graph.node if n.domain in (MS, NCHWC)} - imported)
    model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in missing)
    return bool(missing)


def _sort_nodes(model: onnx.ModelProto) -> bool:
    """Put the graph's nodes in topological order (ties in file order) where they are not, as
    onnxruntime.transformers.float16 with keep_io_types leaves them (its input Casts come last): onnxruntime
    sorts such a graph itself, and onnx.checker would refuse it. Says whether it reordered; a graph with a
    cycle or an undefined input is left as it is, for the checker to name."""
    graph = model.graph
    defined = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        if any(name not in defined for name in node.input):
            break
        defined.update(node.output)
    else:
        return False
    produced = {name: index for index, node in enumerate(graph.node) for name in node.output}
    waiting = [
        {produced[name] for name in node.input if name in produced and produced[name] != index}
        for index, node in enumerate(graph.node)
    ]
    readers: dict[int, list[int]] = {}
    for index, needs in enumerate(waiting):
        for need in needs:
            readers.setdefault(need, []).append(index)
    ready = [index for index, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, ()):
            waiting[reader].discard(index)
            if not waiting[reader]:
                heapq.heappush(ready, reader)
    if len(order) < len(graph.node):
        return False
    nodes = [graph.node[index] for index in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _run_checker(model: onnx.ModelProto | Path, where: str) -> None:
    try:
        with onnxruntime_schemas():  # what onnxruntime's optimizer writes (expanded by canonicalize)
            onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else os.fspath(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise SpikecError(f"{where}: rejected by onnx.checker: {_one_line(exc)}") from exc


def _check_tensors(model: onnx.ModelProto, where: str) -> None:
    """Every initializer and Constant value must hold exactly the data its dims and type declare.

    onnx.checker does not compare raw_data's length with the dims, and a mismatch would surface much
    later as a numpy error deep inside a pass."""
    tensors = [(f"initializer '{t.name}'", t) for t in model.graph.initializer]
    tensors += [
        (f"node '{n.name or n.output[0]}' ({n.op_type}) attribute '{a.name}'", a.t)
        for n in model.graph.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR
    ]
    for what, tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not loaded (a ModelProto with external data): the calibration session reports it
        if any(d < 0 for d in tensor.dims):
            raise SpikecError(f"{where}: {what} has negative dims {list(tensor.dims)}")
        try:
            values = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # numpy/onnx raise ValueError, TypeError, KeyError for unreadable data
            raise SpikecError(
                f"{where}: {what} ({onnx.TensorProto.DataType.Name(tensor.data_type)} "
                f"{list(tensor.dims)}) has unreadable data ({_one_line(exc)})"
            ) from None
        if values.size != math.prod(tensor.dims):
            raise SpikecError(
                f"{where}: {what} holds {values.size} values, its dims {list(tensor.dims)} "
                f"need {math.prod(tensor.dims)}"
            )


def _override_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int | str]], where: str) -> None:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise SpikecError(f"{where}: input_shapes names unknown input '{name}' (inputs: {', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if shape.dim and len(shape.dim) != len(dims):
            raise SpikecError(
                f"{where}: input_shapes['{name}'] has rank {len(dims)}, the model input has rank {len(shape.dim)}"
            )
        shape.ClearField("dim")
        for d in dims:
            if isinstance(d, str) and d:
                shape.dim.add().dim_param = d
            elif isinstance(d, int) and not isinstance(d, bool) and d > 0:
                shape.dim.add().dim_value = d
            else:
                raise SpikecError(f"{where}: input_shapes['{name}'] dim {d!r} is neither a positive int nor a name")
    # Shapes recorded by the exporter were derived from the old input dims and would now contradict
    # shape inference; canonicalize re-infers them.
    graph.ClearField("value_info")
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
