"""Bring an exported model into the one form the later passes expect.

Convention: every graph input carries the batch on axis 0. Later passes fold time into that
axis (batch becomes T*batch), so canonicalization keeps the graph free of constants that pin
axis 0 of an activation to the exported batch size.

Each pass is small and usable alone; graph passes mutate a gs.Graph in place and return it.
The whole pipeline is deterministic: the same model gives byte-identical output.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER
from spikec.passes.builder import GraphBuilder
from spikec.passes.contrib import decompose as decompose_contrib_ops
from spikec.passes.dequantize import to_float32
from spikec.runtime import weights
from spikec.runtime.session import quiet_default_logger

from spikec.errors import SpikecError

# Initializers up to this many elements keep their values for shape inference: data propagation
# needs shape-like constants, never weights.
_SHAPE_CONSTANT_MAX_ELEMENTS = 1024


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upcast, dequantize, fold, name and batch-relax `model`; `model` itself is left untouched."""
    graph = gs.import_onnx(fold_constants(decompose_contrib_ops(to_float32(model))))
    inference_dropout(graph)
    name_nodes(graph)
    relax_batch_shapes(graph)
    squeeze_batch_constants(graph)
    expand_batch_constants(graph)
    return infer_shapes(gs.export_onnx(graph))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` with onnx shape inference (data_prop=True) applied.

    Inference runs on a weightless skeleton so that models over 2 GB, which protobuf cannot
    serialize, are inferred too, and so that weights are not copied through serialization.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise SpikecError(f"shape inference failed: {' '.join(str(exc).split())}") from exc
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for field in ("value_info", "output"):
        out.graph.ClearField(field)
        getattr(out.graph, field).extend(getattr(inferred.graph, field))
    return out


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with large initializers replaced by data-less tensors of the same name, type and dims."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) <= _SHAPE_CONSTANT_MAX_ELEMENTS:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return skeleton


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-infer and fold constants until nothing folds any more.

    Folds constant subgraphs and Shape chains over static dims; symbolic dims stay dynamic.
    One round is not enough: folding a computed shape (e.g. Swin's Pad amounts) lets inference
    find static dims that unlock the next Shape chain. Every round removes nodes, so it ends.
    """
    model = infer_shapes(model)
    while True:
        graph = gs.import_onnx(model)
        before = len(graph.nodes)
        # graphsurgeon prints (to stdout) a warning for every subgraph it cannot fold and goes on: not
        # the user's to act on; a model that is really broken is rejected with one line further on.
        weights.read_foldable(graph)
        with G_LOGGER.suppress(G_LOGGER.CRITICAL), quiet_default_logger():
            graph.fold_constants()
        graph.cleanup()
        graph.toposort()
        model = infer_shapes(gs.export_onnx(graph))
        if len(graph.nodes) == before:
            return model


def inference_dropout(graph: gs.Graph) -> gs.Graph:
    """Every Dropout becomes what it is at inference, the identity (with its mask, where that is used:
    all ones), and one warning names those that were in training mode.

    A model exported without ``model.eval()`` keeps ``training_mode`` true: onnxruntime would then drop
    values at random during calibration, so thresholds would be miscalibrated and two compiles of the
    same model would differ."""
    training = []
    dropouts = [node for node in graph.nodes if node.op == "Dropout"]
    for node in dropouts:
        mode = node.inputs[2] if len(node.inputs) > 2 else None
        if mode is not None and mode.name and not (isinstance(mode, gs.Constant) and not mode.values.any()):
            training.append(node.name or node.outputs[0].name)
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        if mask is None or (not mask.outputs and mask not in graph.outputs):
            node.op, node.inputs, node.outputs, node.attrs = "Identity", node.inputs[:1], node.outputs[:1], {}
        else:
            node.inputs = node.inputs[:2]
    if training:
        warnings.warn(
            f"{len(training)} Dropout node(s) in training mode ('{training[0]}'{', ...' if len(training) > 1 else ''}: "
            f"the model was exported without model.eval()): treated as identity, as at inference",
            stacklevel=2,
        )
    if dropouts:
        graph.cleanup()  # the ratios and modes they no longer read
    return graph


def name_nodes(graph: gs.Graph) -> gs.Graph:
    """Give every node a unique, readable, deterministic name.

    Later passes name state tensors after nodes. Unique existing names are kept; an empty name
    becomes the op type, and a name already taken gets the first free `_<k>` suffix, in
    topological order.
    """
    counts: dict[str, int] = {}
    for node in graph.nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    taken = {name for name, count in counts.items() if name and count == 1}
    for node in graph.nodes:
        if node.name in taken and counts[node.name] == 1:
            continue
        base = node.name or node.op
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        taken.add(name)
    return graph


def graph_batch(graph: gs.Graph) -> int | None:
    """The static batch size shared by axis 0 of all graph inputs, or None if symbolic or inconsistent."""
    dims = {inp.shape[0] for inp in graph.inputs if inp.shape}
    if len(dims) != 1:
        return None
    (dim,) = dims
    return dim if isinstance(dim, int) and dim > 0 else None


def relax_batch_shapes(graph: gs.Graph) -> gs.Graph:
    """Stop Reshape and Expand target shapes from hard-coding the exported batch size at axis 0.

    With a static batch B, exporters write B into target shapes. Reshape: where the data keeps
    the batch in axis 0 unchanged (data dim0 == shape[0] == B) shape[0] becomes 0 (copy); where
    the batch is merged with other dims on either side (e.g. [B*H, S, d] -> [B, H, S, d], as the
    dynamo exporter decomposes attention) shape[0] becomes -1 (infer). Expand: shape[0] == B on
    data of dim0 B becomes 1 (keep). All rewrites leave the output unchanged at batch B and stay
    right when axis 0 grows to T*B. The dynamo exporter sets Reshape allowzero=1, which only
    changes the meaning of shapes holding a 0, so it is cleared on shapes without one.
    """
    batch = graph_batch(graph)
    if batch is None:
        return graph
    for node in graph.nodes:
        if node.op not in ("Reshape", "Expand"):
            continue
        data, target = node.inputs[0], node.inputs[1]
        if not isinstance(target, gs.Constant) or not data.shape or not isinstance(data.shape[0], int):
            continue
        shape = target.values
        if node.op == "Reshape":
            literal_zero = node.attrs.get("allowzero", 0) and 0 in shape
            dim0 = None if literal_zero else _reshape_batch_dim0(data.shape[0], shape, batch)
        else:
            dim0 = 1 if len(shape) == len(data.shape) and shape[0] == data.shape[0] == batch else None
        if dim0 is None:
            continue
        relaxed = shape.copy()
        relaxed[0] = dim0
        node.inputs[1] = gs.Constant(f"{node.name}_shape", relaxed)
        if node.op == "Reshape":
            node.attrs["allowzero"] = 0
    return graph


def _reshape_batch_dim0(data_dim0: int, shape: np.ndarray, batch: int) -> int | None:
    """0 or -1 to replace Reshape shape[0] with, or None when axis 0 does not carry the batch."""
    if shape.ndim != 1 or shape.size == 0 or shape[0] <= 0 or shape[0] % batch or data_dim0 % batch:
        return None
    if shape[0] == data_dim0:
        return 0
    return None if -1 in shape else -1


# Ops whose inputs broadcast numpy-style against each other.
_BROADCASTING_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "And", "Or", "Equal", "Less", "Greater"}
)


def squeeze_batch_constants(graph: gs.Graph) -> gs.Graph:
    """Shrink folded constants that repeat one row B times along axis 0 down to one row.

    Folding a batch-expanded buffer (e.g. BERT's default token_type_ids) yields a constant of
    dim0 B that an elementwise op broadcasts against an activation; one row broadcasts the same
    at batch B and at T*B.
    """
    batch = graph_batch(graph)
    if batch is None or batch == 1:
        return graph
    squeezed: dict[str, gs.Constant] = {}  # one replacement per constant, shared like the original
    for node in graph.nodes:
        if node.op not in _BROADCASTING_OPS or not _batched(node.outputs[0], batch, None):
            continue
        rank = len(node.outputs[0].shape)
        # Another input must still bring the batch, or the output would shrink to one row.
        if not any(isinstance(t, gs.Variable) and _batched(t, batch, rank) for t in node.inputs):
            continue
        for i, tensor in enumerate(node.inputs):
            if (
                isinstance(tensor, gs.Constant)
                and _batched(tensor, batch, rank)
                and (tensor.values == tensor.values[:1]).all()
            ):
                if tensor.name not in squeezed:
                    squeezed[tensor.name] = gs.Constant(f"{tensor.name}_row", np.ascontiguousarray(tensor.values[:1]))
                node.inputs[i] = squeezed[tensor.name]
    graph.cleanup()
    return graph


def expand_batch_constants(graph: gs.Graph) -> gs.Graph:
    """Rebuild folded batch-sized constants that Concat joins to activations as Expand of one row.

    With a static batch B, folding turns e.g. ViT's ``cls_token.expand(B, -1, -1)`` into a constant of
    dim0 B, concatenated with the patch tokens along axis 1. At T*B rows the Concat would no longer
    match: the constant becomes Expand(row, [rows of the activation, 1, ...]). A constant whose rows
    differ depends on the sample index, which time folding cannot preserve: it stays, and the compiler's
    check_time_folding refuses the unrolled form.
    """
    batch = graph_batch(graph)
    if batch is None:
        return graph
    for node in list(graph.nodes):
        if node.op != "Concat" or not node.outputs[0].shape:
            continue
        rank = len(node.outputs[0].shape)
        if node.attrs.get("axis", 0) % rank == 0:
            continue
        rows = next((t for t in node.inputs if isinstance(t, gs.Variable) and _batched(t, batch, rank)), None)
        if rows is None:
            continue
        for i, tensor in enumerate(node.inputs):
            if not (isinstance(tensor, gs.Constant) and _batched(tensor, batch, rank)):
                continue
            if not (tensor.values == tensor.values[:1]).all():
                continue  # per-sample rows: only the stateful form can keep them (see check_time_folding)
            prefix = f"{node.name}/{tensor.name}.rows"
            b = GraphBuilder(graph, prefix)
            shape = b.op("Shape", rows, out=gs.Variable(f"{prefix}.shape", dtype=np.int64), name=f"{prefix}/Shape")
            count = b.op(
                "Slice",
                shape,
                b.const([0], np.int64, name=f"{prefix}.start"),
                b.const([1], np.int64, name=f"{prefix}.end"),
                out=gs.Variable(f"{prefix}.count", dtype=np.int64),
                name=f"{prefix}/Slice",
            )
            target = b.op(
                "Concat",
                count,
                b.const(np.ones(rank - 1), np.int64, name=f"{prefix}.ones"),
                out=gs.Variable(f"{prefix}.target", dtype=np.int64),
                name=f"{prefix}/Concat",
                axis=0,
            )
            expanded = b.op(
                "Expand",
                b.const(np.ascontiguousarray(tensor.values[:1]), None, name=f"{tensor.name}_row"),
                target,
                out=gs.Variable(f"{prefix}.expanded", dtype=tensor.values.dtype),
                name=f"{prefix}/Expand",
            )
            node.inputs[i] = expanded
    graph.cleanup()
    graph.toposort()
    return graph


def _batched(tensor: gs.Tensor, batch: int, rank: int | None) -> bool:
    """Whether `tensor` has dim0 == batch (and the given rank, unless None)."""
    shape = tensor.shape
    return bool(shape) and shape[0] == batch and (rank is None or len(shape) == rank)
