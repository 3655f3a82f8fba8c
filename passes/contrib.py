"""Expand onnxruntime's fused contrib ops back into the standard ONNX subgraphs they replace.

`onnxruntime.transformers.optimizer` and sessions saved with graph optimizations fuse LayerNorm,
GELU, attention, embeddings and bias/residual adds into com.microsoft ops (and two ORT-only ops in
the default domain: SimplifiedLayerNormalization, and LayerNormalization below opset 17). spikec's
recognizer and every conversion method work on the standard forms, so `decompose` rewrites each fused
op into the subgraph an exporter writes for the same computation: a LayerNormalization op (the
ReduceMean chain below opset 17), the erf/tanh GELU chains, MatMul + Add(bias), MatMul/Softmax/MatMul
attention with its mask as an additive tensor, residual Adds. Projections fused into one weight
(Attention's QKV) are split back into one MatMul per projection, so that each gets its own neuron
and quantizer as in the unfused model.

The semantics are onnxruntime's CPU kernels', attribute by attribute (tests/test_contrib.py runs each
op and its expansion through onnxruntime). What cannot be expanded exactly (an attribute, input or
layout the CPU kernels do not implement, a type other than float32) is refused with one line naming
the node. Contrib ops this pass does not know are left as they are, for the later passes to judge.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder

from spikec.errors import SpikecError

MS = "com.microsoft"
NCHWC = "com.microsoft.nchwc"
# An additive mask must push a masked score below every other: onnxruntime's causal mask writes the
# lowest float32 into the scores' buffer.
_LOWEST = float(np.finfo(np.float32).min)
_MASK_FILTER = -10000.0  # onnxruntime's default mask_filter_value


class _Postpone(Exception):
    """An input's rank or type is not known yet: it will be after the next round of shape inference."""

    def __init__(self, tensor: gs.Tensor):
        super().__init__(tensor.name)
        self.tensor = tensor


def decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every supported onnxruntime contrib op expanded into standard ONNX ops.

    Some expansions depend on input ranks (a 3D or 4D rotary input, a 1D or 2D mask), which shape
    inference cannot see past an unexpanded contrib op. Each round infers shapes, then expands every
    node whose inputs are known; the rest wait for the next round. `model` itself is left untouched.
    """
    if not any(_is_contrib(n.domain, n.op_type, _opset(model)) for n in model.graph.node):
        return model
    from spikec.passes.canonicalize import infer_shapes  # canonicalize imports this module

    while True:
        graph = gs.import_onnx(infer_shapes(model))
        pending = [n for n in graph.nodes if _is_contrib(n.domain, n.op, graph.opset)]
        if not pending:
            return model
        names = set(graph.tensors())
        postponed: list[tuple[gs.Node, gs.Tensor]] = []
        for node in pending:
            try:
                _expand(graph, node, names)
            except _Postpone as wait:
                postponed.append((node, wait.tensor))
        if len(postponed) == len(pending):
            node, tensor = postponed[0]
            raise _refuse(node, f"the rank and type of input '{tensor.name}' cannot be inferred")
        graph.cleanup().toposort()
        model = _export(graph, model)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _is_contrib(domain: str | None, op: str, opset: int) -> bool:
    """An onnxruntime op this pass expands or refuses; other contrib ops are left to the later passes."""
    key = _key(domain, op)
    if key == ("", "LayerNormalization"):
        return opset < 17
    return key in _SPECS or domain == NCHWC


def _key(domain: str | None, op: str) -> tuple[str, str]:
    return ("" if domain in (None, "", "ai.onnx") else domain), op


def _export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    kept = [o for o in original.opset_import if o.domain in used or o.domain not in (MS, NCHWC)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = original.ir_version
    return model


def _refuse(node: gs.Node, reason: str) -> SpikecError:
    return SpikecError(f"node '{node.name}' ({node.domain or 'ai.onnx'} {node.op}): {reason}")


@contextlib.contextmanager
def onnxruntime_schemas() -> Iterator[None]:
    """onnx.checker knows no SimplifiedLayerNormalization and no LayerNormalization below opset 17,
    which onnxruntime registers in the default domain and its optimizer writes: while this context
    lasts, the checker validates them against onnxruntime's signatures. The registration is undone on
    exit so that onnx's shape inference keeps skipping them (it has no inference function for them)."""
    added = []
    try:
        for schema in _ort_default_domain_schemas():
            if not onnx.defs.has(schema.name, schema.since_version, schema.domain):
                onnx.defs.register_schema(schema)
                added.append(schema)
        yield
    finally:
        for schema in added:
            onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)


def _ort_default_domain_schemas() -> list[onnx.defs.OpSchema]:
    param, option = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption
    attr, kind = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    constraints = [
        ("T", floats, ""),
        ("U", ["tensor(float)", "tensor(double)", "tensor(bfloat16)"], ""),
        ("V", floats, ""),
    ]
    attributes = [
        attr("axis", kind.INT, "", required=False),
        attr("epsilon", kind.FLOAT, "", required=False),
        attr("stash_type", kind.INT, "", required=False),
    ]
    optional = option.Optional
    return [
        onnx.defs.OpSchema(
            "SimplifiedLayerNormalization",
            "",
            1,
            doc="onnxruntime",
            type_constraints=constraints,
            inputs=[param("X", "T"), param("scale", "V")],
            outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=optional)],
            attributes=attributes,
        ),
        onnx.defs.OpSchema(
            "LayerNormalization",
            "",
            1,
            doc="onnxruntime",
            type_constraints=constraints,
            inputs=[param("X", "T"), param("Scale", "V"), param("B", "V", param_option=optional)],
            outputs=[
                param("Y", "V"),
                param("Mean", "U", param_option=optional),
                param("InvStdDev", "U", param_option=optional),
            ],
            attributes=attributes,
        ),
    ]


# ----------------------------------------------------------------------------- emitting


class _Emitter:
    """Writes the standard nodes that replace one contrib node, named after it, into the graph.

    Inputs may be tensors or numpy values (which become constants); `out` writes into an existing
    tensor, so that the contrib node's consumers and graph outputs read the expansion unchanged.
    """

    def __init__(self, graph: gs.Graph, node: gs.Node, names: set[str]):
        self.graph, self.node, self.names = graph, node, names
        self.opset = graph.opset
        self.prefix = node.name
        self.b = GraphBuilder(graph, node.name)

    def _name(self, base: str) -> str:
        name, k = f"{self.prefix}/{base}", 0
        while name in self.names:
            k += 1
            name = f"{self.prefix}/{base}_{k}"
        self.names.add(name)
        return name

    def tensor(self, value) -> gs.Tensor:
        if isinstance(value, gs.Tensor):
            return value
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.b.const(array, None, name=self._name("const"))

    def __call__(self, op: str, *inputs, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        """Emit one node (None leaves an optional input out); returns its output."""
        name = self._name(op)
        result = out if out is not None else gs.Variable(self._name(f"{op}_output"))
        tensors = [gs.Variable.empty() if i is None else self.tensor(i) for i in inputs]
        return self.b.op(op, *tensors, out=result, name=name, **attrs)

    def node_with_outputs(self, op: str, inputs: list, outputs: list[gs.Variable | None], **attrs) -> None:
        """A node with several optional outputs: None leaves an output out."""
        tensors = [gs.Variable.empty() if i is None else self.tensor(i) for i in inputs]
        results = [gs.Variable.empty() if o is None else o for o in outputs]
        for trimmed in (tensors, results):
            while trimmed and trimmed[-1].is_empty():
                trimmed.pop()
        self.b.node(op, tensors, results, self._name(op), **attrs)

    def reduce_mean(self, x, axes: list[int], out=None):
        if self.opset >= 18:
            return self("ReduceMean", x, np.array(axes, np.int64), out=out, keepdims=1)
        return self("ReduceMean", x, out=out, axes=axes, keepdims=1)

    def dim(self, x, axis: int) -> gs.Variable:
        """Dimension `axis` of `x` at run time, as a 1-element int64 vector (folded when static)."""
        return self("Slice", self("Shape", x), np.array([axis], np.int64), np.array([axis + 1], np.int64))

    def scalar(self, vector) -> gs.Variable:
        return self("Squeeze", vector, np.array([0], np.int64))

    def slice(self, x, start, end, axis: int, step: int = 1) -> gs.Variable:
        """x[start:end:step] along `axis`; start/end are ints or 1-element tensors."""
        start, end = (np.array([v], np.int64) if isinstance(v, int) else v for v in (start, end))
        return self("Slice", x, start, end, np.array([axis], np.int64), np.array([step], np.int64))


# ----------------------------------------------------------------------------- node facts


def _used(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return not tensor.is_empty() and (bool(tensor.outputs) or any(tensor is o for o in graph.outputs))


def _output(node: gs.Node, index: int, graph: gs.Graph) -> gs.Variable | None:
    """The node's output `index` if something reads it."""
    if index < len(node.outputs) and _used(node.outputs[index], graph):
        return node.outputs[index]
    return None


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and not node.inputs[index].is_empty():
        return node.inputs[index]
    return None


def _rank(tensor: gs.Tensor) -> int:
    if tensor.shape is None:
        raise _Postpone(tensor)
    return len(tensor.shape)


def _static_dim(node: gs.Node, tensor: gs.Tensor, axis: int, what: str) -> int:
    """A dimension the expansion's structure depends on (a weight's width): it must be static."""
    if tensor.shape is None:
        raise _Postpone(tensor)
    dim = tensor.shape[axis]
    if not isinstance(dim, int) or dim < 0:
        raise _refuse(node, f"{what} ('{tensor.name}' dim {axis}) must be static, got {dim!r}")
    return dim


def _check_float(node: gs.Node, *tensors: gs.Tensor | None) -> None:
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.dtype is None:
            raise _Postpone(tensor)
        if np.dtype(tensor.dtype) != np.float32:
            raise _refuse(node, f"input '{tensor.name}' is {np.dtype(tensor.dtype).name}; only float32 is supported")


@dataclass(frozen=True)
class _Spec:
    build: Callable[[_Emitter, gs.Node, dict], None]
    attrs: dict  # every attribute the expansion honours, with onnxruntime's default
    inputs: int  # how many inputs the expansion reads; a node with more is refused


def _expand(graph: gs.Graph, node: gs.Node, names: set[str]) -> None:
    """Replace `node` by its expansion, or raise (_Postpone: nothing emitted yet)."""
    key = _key(node.domain, node.op)
    if node.domain == NCHWC:
        raise _refuse(node, _NCHWC_REFUSAL)
    spec = _SPECS[key]
    unknown = sorted(set(node.attrs) - set(spec.attrs))
    if unknown:
        raise _refuse(node, f"attribute {unknown[0]!r} is not supported")
    extra = [t.name for t in node.inputs[spec.inputs :] if not t.is_empty()]
    if extra:
        raise _refuse(node, f"input '{extra[0]}' is not supported")
    attrs = {**spec.attrs, **node.attrs}
    emitter = _Emitter(graph, node, names)
    before = len(graph.nodes)
    try:
        spec.build(emitter, node, attrs)
    except _Postpone:
        del graph.nodes[before:]
        raise
    node.inputs.clear()
    node.outputs.clear()


# ----------------------------------------------------------------------------- normalization


def _layer_norm(
    em: _Emitter,
    x,
    scale,
    bias,
    epsilon: float,
    axis: int,
    rank: int | None,
    out: gs.Variable | None,
    mean: gs.Variable | None = None,
    inv_std: gs.Variable | None = None,
) -> None:
    """LayerNormalization over axes axis..-1: the op from opset 17, before it the chain the TorchScript
    exporter writes for nn.LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)."""
    if em.opset >= 17:
        em.node_with_outputs(
            "LayerNormalization",
            [x, scale, bias],
            [out, mean, inv_std],
            axis=axis,
            epsilon=float(epsilon),
            stash_type=1,
        )
        return
    axes = _normalized_axes(em.node, axis, rank)
    average = em.reduce_mean(x, axes, out=mean)
    centered = em("Sub", x, average)
    variance = em.reduce_mean(em("Pow", centered, np.float32(2.0)), axes)
    std = em("Sqrt", em("Add", variance, np.float32(epsilon)))
    if inv_std is not None:
        em("Reciprocal", std, out=inv_std)
    normalized = em("Div", centered, std)
    if bias is None:
        em("Mul", normalized, scale, out=out)
    else:
        em("Add", em("Mul", normalized, scale), bias, out=out)


def _rms_norm(
    em: _Emitter,
    x,
    scale,
    epsilon: float,
    axis: int,
    rank: int | None,
    out: gs.Variable | None,
    inv_std: gs.Variable | None = None,
) -> None:
    """x / sqrt(mean(x^2) + eps) * scale as transformers' RMSNorm exports it: Pow, ReduceMean, Add, Sqrt,
    Div(1, .), Mul(x, .), Mul(weight, .)."""
    axes = _normalized_axes(em.node, axis, rank)
    mean_square = em.reduce_mean(em("Pow", x, np.float32(2.0)), axes)
    inverse = em("Div", np.float32(1.0), em("Sqrt", em("Add", mean_square, np.float32(epsilon))), out=inv_std)
    em("Mul", scale, em("Mul", x, inverse), out=out)


def _normalized_axes(node: gs.Node, axis: int, rank: int | None) -> list[int]:
    if axis < 0:
        return list(range(axis, 0))
    if rank is None:
        raise _Postpone(node.inputs[0])
    return list(range(axis - rank, 0))


def _layer_norm_v1(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """onnxruntime's LayerNormalization below opset 17 (same signature as the opset-17 op)."""
    x, scale, bias = node.inputs[0], node.inputs[1], _input(node, 2)
    _check_float(node, x, scale, bias)
    _check_stash(node, attrs)
    rank = _rank(x) if attrs["axis"] >= 0 else None
    _layer_norm(
        em,
        x,
        scale,
        bias,
        attrs["epsilon"],
        attrs["axis"],
        rank,
        _output(node, 0, em.graph),
        _output(node, 1, em.graph),
        _output(node, 2, em.graph),
    )


def _simplified_layer_norm(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    x, scale = node.inputs[0], node.inputs[1]
    _check_float(node, x, scale)
    _check_stash(node, attrs)
    rank = _rank(x) if attrs["axis"] >= 0 else None
    _rms_norm(
        em, x, scale, attrs["epsilon"], attrs["axis"], rank, _output(node, 0, em.graph), _output(node, 1, em.graph)
    )


def _check_stash(node: gs.Node, attrs: dict) -> None:
    # stash_type is the precision of the statistics: float32 inputs are computed in float32 either way.
    if attrs["stash_type"] != 1:
        raise _refuse(node, f"stash_type {attrs['stash_type']} is not supported (only 1, float32)")


def _skip_layer_norm(em: _Emitter, node: gs.Node, attrs: dict, simplified: bool) -> None:
    """(input + bias) + skip, then LayerNorm (RMSNorm when simplified) over the last axis.

    The optimizer folds the bias of the MatMul that produces `input` into the op: it goes back onto
    that MatMul's output, and the residual Add follows. Output 3 is the sum itself (pre-LN models
    continue the residual stream from it). Output 1 is the mean (LayerNorm only)."""
    graph = em.graph
    x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    beta = None if simplified else _input(node, 3)
    bias = _input(node, 3 if simplified else 4)
    _check_float(node, x, skip, gamma, beta, bias)
    mean, inv_std, total = (_output(node, i, graph) for i in (1, 2, 3))
    if simplified and mean is not None:
        raise _refuse(node, "output 'mean' is not defined for the simplified (RMS) form")
    biased = x if bias is None else em("Add", x, bias)
    summed = em("Add", biased, skip, out=total)
    if simplified:
        _rms_norm(em, summed, gamma, attrs["epsilon"], -1, None, _output(node, 0, graph), inv_std)
    else:
        _layer_norm(em, summed, gamma, beta, attrs["epsilon"], -1, None, _output(node, 0, graph), mean, inv_std)


def _embed_layer_norm(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """BERT's embeddings: word[ids] + position[position_ids or 0..S-1] (+ segment[segment_ids]), then
    LayerNorm. Output 1 (mask_index) counts each row's mask entries equal to 1, as the kernel does
    (0 without a mask); output 2 is the sum before LayerNorm."""
    graph = em.graph
    ids, segments, words, positions = node.inputs[0], _input(node, 1), node.inputs[2], node.inputs[3]
    segment_table, gamma, beta = _input(node, 4), node.inputs[5], node.inputs[6]
    mask, position_ids = _input(node, 7), _input(node, 8)
    _check_float(node, words, positions, segment_table, gamma, beta)
    if (segments is None) != (segment_table is None):
        raise _refuse(node, "segment_ids and segment_embedding must be given together")
    if attrs["mask_index_type"] not in (0, 1):
        raise _refuse(node, f"mask_index_type {attrs['mask_index_type']} is not supported")
    if position_ids is None:
        position_ids = em("Range", np.int64(0), em.scalar(em.dim(ids, 1)), np.int64(1))
    total = em(
        "Add",
        em("Gather", words, ids, axis=0),
        em("Gather", positions, position_ids, axis=0),
        out=None if segments is not None else _output(node, 2, graph),
    )
    if segments is not None:
        total = em("Add", total, em("Gather", segment_table, segments, axis=0), out=_output(node, 2, graph))
    _layer_norm(em, total, gamma, beta, attrs["epsilon"], -1, None, _output(node, 0, graph))
    mask_index = _output(node, 1, graph)
    if mask_index is None:
        return
    if mask is None:
        em("ConstantOfShape", em.dim(ids, 0), out=mask_index, value=onnx.numpy_helper.from_array(np.zeros(1, np.int32)))
    else:
        ones = em("Cast", em("Equal", mask, np.ones((), np.int32)), to=onnx.TensorProto.INT32)
        em("ReduceSum", ones, np.array([1], np.int64), out=mask_index, keepdims=0)


# ----------------------------------------------------------------------------- activations


def _gelu_erf(em: _Emitter, x, out=None) -> gs.Variable:
    """0.5 * x * (1 + erf(x / sqrt(2))), as the TorchScript exporter writes nn.GELU()."""
    erf = em("Erf", em("Div", x, np.float32(math.sqrt(2.0))))
    return em("Mul", em("Mul", x, em("Add", erf, np.float32(1.0))), np.float32(0.5), out=out)


def _gelu_tanh(em: _Emitter, x, out=None) -> gs.Variable:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), as GPT-2's NewGELU exports."""
    inner = em("Add", x, em("Mul", em("Pow", x, np.float32(3.0)), np.float32(0.044715)))
    tanh = em("Tanh", em("Mul", inner, np.float32(math.sqrt(2.0 / math.pi))))
    return em("Mul", em("Mul", x, em("Add", tanh, np.float32(1.0))), np.float32(0.5), out=out)


def _gelu(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """Gelu (erf), BiasGelu (Add then erf GELU), FastGelu (optional bias, tanh approximation)."""
    x, bias = node.inputs[0], _input(node, 1)
    _check_float(node, x, bias)
    if bias is not None:
        x = em("Add", x, bias)
    (_gelu_tanh if node.op == "FastGelu" else _gelu_erf)(em, x, _output(node, 0, em.graph))


def _quick_gelu(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """x * sigmoid(alpha * x): alpha 1 is SiLU (onnxruntime fuses SiLU into this op), 1.702 CLIP's quick_gelu."""
    x = node.inputs[0]
    _check_float(node, x)
    alpha = float(attrs["alpha"])
    gate = em("Sigmoid", x if alpha == 1.0 else em("Mul", x, np.float32(alpha)))
    em("Mul", x, gate, out=_output(node, 0, em.graph))


def _bias_add(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """(X + bias) + skip (no CPU kernel: checked against its definition)."""
    x, bias, skip = node.inputs
    _check_float(node, x, bias, skip)
    em("Add", em("Add", x, bias), skip, out=_output(node, 0, em.graph))


def _bias_split_gelu(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """Diffusion UNets' GEGLU: (X + bias) split in halves along the last axis, left * GELU(right)
    (no CPU kernel: checked against its definition)."""
    x, bias = node.inputs
    _check_float(node, x, bias)
    width = _static_dim(node, bias, 0, "the bias width")
    if width % 2:
        raise _refuse(node, f"the bias width {width} is odd")
    biased = em("Add", x, bias)
    gelu = _gelu_erf(em, em.slice(biased, width // 2, width, -1))
    em("Mul", em.slice(biased, 0, width // 2, -1), gelu, out=_output(node, 0, em.graph))


def _gemm_fast_gelu(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """FastGelu(X @ W + bias) (no CPU kernel: checked against its definition)."""
    x, weight, bias = node.inputs[0], node.inputs[1], _input(node, 2)
    _check_float(node, x, weight, bias)
    product = em("MatMul", x, weight)
    _gelu_tanh(em, product if bias is None else em("Add", product, bias), _output(node, 0, em.graph))


# ----------------------------------------------------------------------------- products


def _fused_matmul(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """alpha * (A' @ B'), A'/B' transposed on their last two axes when transA/transB are set."""
    a, b = node.inputs
    _check_float(node, a, b)
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise _refuse(node, "transBatchA/transBatchB are not supported")
    operands = []
    for tensor, transposed in ((a, attrs["transA"]), (b, attrs["transB"])):
        if transposed:
            rank = _rank(tensor)
            if rank < 2:
                raise _refuse(node, f"input '{tensor.name}' of rank {rank} cannot be transposed")
            tensor = em("Transpose", tensor, perm=[*range(rank - 2), rank - 1, rank - 2])
        operands.append(tensor)
    alpha = float(attrs["alpha"])
    out = _output(node, 0, em.graph)
    if alpha == 1.0:
        em("MatMul", *operands, out=out)
    else:
        em("Mul", em("MatMul", *operands), np.float32(alpha), out=out)


# onnxruntime's fused activations and the attributes that parameterize them, in order
_ACTIVATIONS = {
    "Relu": (),
    "Tanh": (),
    "Sigmoid": (),
    "LeakyRelu": ("alpha",),
    "HardSigmoid": ("alpha", "beta"),
    "Clip": (),
}


def _activation(em: _Emitter, node: gs.Node, x, name: str, params: list[float], out) -> None:
    if name not in _ACTIVATIONS:
        raise _refuse(node, f"activation {name!r} is not supported")
    if name == "Clip":
        if len(params) != 2:
            raise _refuse(node, "a Clip activation needs its min and max")
        em("Clip", x, np.float32(params[0]), np.float32(params[1]), out=out)
        return
    names = _ACTIVATIONS[name]
    if len(params) < len(names):
        raise _refuse(node, f"activation {name} needs {len(names)} parameter(s)")
    em(name, x, out=out, **{key: float(value) for key, value in zip(names, params)})


def _fused_gemm(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    a, b, c = node.inputs[0], node.inputs[1], _input(node, 2)
    _check_float(node, a, b, c)
    gemm = em(
        "Gemm",
        a,
        b,
        c,
        alpha=float(attrs["alpha"]),
        beta=float(attrs["beta"]),
        transA=int(attrs["transA"]),
        transB=int(attrs["transB"]),
    )
    params = [attrs[k] for k in ("activation_alpha", "activation_beta") if attrs[k] is not None]
    _activation(em, node, gemm, attrs["activation"], params, _output(node, 0, em.graph))


def _fused_conv(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """Conv (+ Z) then the activation."""
    x, w, b, z = node.inputs[0], node.inputs[1], _input(node, 2), _input(node, 3)
    _check_float(node, x, w, b, z)
    conv_attrs = {k: v for k, v in attrs.items() if k not in ("activation", "activation_params") and v is not None}
    result = em("Conv", x, w, b, **conv_attrs)
    if z is not None:
        result = em("Add", result, z)
    _activation(
        em, node, result, attrs["activation"], list(attrs["activation_params"] or []), _output(node, 0, em.graph)
    )


# ----------------------------------------------------------------------------- attention


@dataclass
class _Heads:
    """Q, K, V in (batch, heads, sequence, head size) layout, with what the attention core needs."""

    query: gs.Tensor
    key: gs.Tensor
    value: gs.Tensor
    heads: int
    head_size: int
    v_hidden: int


def _to_heads(em: _Emitter, x, heads: int, head_size: int) -> gs.Variable:
    """(B, S, N*H) -> (B, N, S, H)."""
    split = em("Reshape", x, np.array([0, 0, heads, head_size], np.int64))
    return em("Transpose", split, perm=[0, 2, 1, 3])


def _attention_core(
    em: _Emitter,
    node: gs.Node,
    qkv: _Heads,
    attrs: dict,
    *,
    mask,
    attention_bias,
    past_key,
    past_value,
    out,
    present_key=None,
    present_value=None,
    scores_out=None,
) -> tuple[gs.Tensor, gs.Tensor]:
    """softmax(scale * Q K^T + mask) V over (B, N, S, H) heads, merged back to (B, S, N*Hv).

    ``attrs`` are the node's scale, mask_filter_value and unidirectional (Attention and MultiHeadAttention
    share them). The mask is additive, as onnxruntime builds it: masked keys get mask_filter_value, and with
    unidirectional set the keys after each query's position get the lowest float32 (written over the padding
    value, as the kernel does); attention_bias is added to it. Past keys/values are concatenated in
    front. Returns K and V with the past, for the present outputs."""
    key, value = qkv.key, qkv.value
    past_length = np.zeros(1, np.int64) if past_key is None else em.dim(past_key, 2)
    if past_key is not None:
        key = em("Concat", past_key, key, axis=2, out=present_key)
        value = em("Concat", past_value, value, axis=2, out=present_value)
    scores = em("MatMul", qkv.query, em("Transpose", key, perm=[0, 1, 3, 2]))
    scale = attrs["scale"]
    factor = np.float32(1.0 / math.sqrt(qkv.head_size)) if not scale else np.float32(scale)
    scores = em("Mul", scores, factor)
    additive = _additive_mask(
        em, node, qkv, key, mask, float(attrs["mask_filter_value"]), bool(attrs["unidirectional"]), past_length
    )
    if attention_bias is not None:
        additive = attention_bias if additive is None else em("Add", attention_bias, additive)
    if additive is not None:
        scores = em("Add", scores, additive, out=scores_out)
    elif scores_out is not None:
        scores = em("Identity", scores, out=scores_out)
    context = em("MatMul", em("Softmax", scores, axis=-1), value)
    em("Reshape", em("Transpose", context, perm=[0, 2, 1, 3]), np.array([0, 0, qkv.v_hidden], np.int64), out=out)
    return key, value


def _additive_mask(em: _Emitter, node: gs.Node, qkv: _Heads, key, mask, mask_filter: float, causal: bool, past_length):
    """The mask onnxruntime's PrepareMask builds, broadcastable to (B, N, S, T), or None."""
    additive = None
    total = em.dim(key, 2)  # T: past + new keys
    if mask is not None:
        rank = _rank(mask)
        if rank == 1:
            additive = _mask_from_lengths(em, mask, total, mask_filter, batch=em.dim(qkv.query, 0))
        elif rank in (2, 3):
            keep = em("Greater", mask, np.zeros((), np.int32))
            additive = em("Where", keep, np.float32(0.0), np.float32(mask_filter))
            additive = em("Unsqueeze", additive, np.array([1, 2] if rank == 2 else [1], np.int64))
        else:
            raise _refuse(node, f"a {rank}D mask is not supported (the CPU kernel implements 1D, 2D and 3D masks)")
    if causal:
        # query s sits at position P + s (P past keys) and sees keys up to it. The kernel's causal loop
        # stops before the last query, which sees every key (all of them are before it in self-attention).
        queries = em.scalar(em.dim(qkv.query, 2))
        rows = em("Unsqueeze", em("Range", np.int64(0), queries, np.int64(1)), np.array([1], np.int64))
        keys = em("Range", np.int64(0), em.scalar(total), np.int64(1))
        key_positions = em("Unsqueeze", keys, np.array([0], np.int64))
        future = em(
            "And",
            em("Greater", key_positions, em("Add", rows, past_length)),
            em("Less", rows, em("Sub", queries, np.int64(1))),
        )
        additive = em("Where", future, np.float32(_LOWEST), np.float32(0.0) if additive is None else additive)
    return additive


def _mask_from_lengths(em: _Emitter, mask, total, mask_filter: float, batch) -> gs.Variable:
    """A 1D mask_index: the first B values are each row's end (keys at or after it are masked); a mask of
    2B values adds each row's start (keys before it are masked). (B, 1, 1, T)."""
    lengths = em("Cast", mask, to=onnx.TensorProto.INT64)
    ends = em.slice(lengths, 0, batch, 0)
    doubled = em("Mul", batch, np.array([2], np.int64))
    padded = em("Concat", lengths, em("Mul", ends, np.zeros((), np.int64)), axis=0)
    has_starts = em("Equal", em.dim(lengths, 0), doubled)
    starts = em("Where", has_starts, em.slice(padded, batch, doubled, 0), np.zeros((), np.int64))
    positions = em("Unsqueeze", em("Range", np.int64(0), em.scalar(total), np.int64(1)), np.array([0], np.int64))
    column = np.array([1], np.int64)
    outside = em(
        "Or",
        em("GreaterOrEqual", positions, em("Unsqueeze", ends, column)),
        em("Less", positions, em("Unsqueeze", starts, column)),
    )
    additive = em("Where", outside, np.float32(mask_filter), np.float32(0.0))
    return em("Unsqueeze", additive, np.array([1, 2], np.int64))


def _attention(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """BERT/GPT-2 self-attention with the Q, K, V projections merged into one weight.

    The weight (and bias) are sliced back into three projections, each a MatMul + Add(bias) as in
    the unfused model."""
    graph = em.graph
    x, weight, bias, mask = node.inputs[0], node.inputs[1], _input(node, 2), _input(node, 3)
    past, attention_bias = _input(node, 4), _input(node, 5)
    _check_float(node, x, weight, bias, past, attention_bias)
    if attrs["do_rotary"]:
        raise _refuse(node, "do_rotary is not supported (onnxruntime's CPU kernel does not implement it)")
    if attrs["past_present_share_buffer"] or _input(node, 6) is not None:
        raise _refuse(node, "past_present_share_buffer / past_sequence_length are not supported")
    heads = int(attrs["num_heads"])
    width = _static_dim(node, weight, 1, "the merged QKV weight width")
    sizes = [int(s) for s in attrs["qkv_hidden_sizes"]] if attrs["qkv_hidden_sizes"] else [width // 3] * 3
    if len(sizes) != 3 or sum(sizes) != width or sizes[0] != sizes[1] or any(s % heads or s <= 0 for s in sizes):
        raise _refuse(
            node,
            f"qkv_hidden_sizes {sizes} do not split the weight width {width} into Q = K and V "
            f"hidden sizes divisible by num_heads={heads}",
        )
    offsets = np.cumsum([0, *sizes])
    projections = []
    for index in range(3):
        start, end = int(offsets[index]), int(offsets[index + 1])
        projected = em("MatMul", x, em.slice(weight, start, end, 1))
        if bias is not None:
            projected = em("Add", projected, em.slice(bias, start, end, 0))
        projections.append(_to_heads(em, projected, heads, sizes[index] // heads))
    past_key = past_value = None
    if past is not None:
        past_key = em("Gather", past, np.array(0, np.int64), axis=0)
        past_value = em("Gather", past, np.array(1, np.int64), axis=0)
    query, key, value = projections
    qkv = _Heads(query, key, value, heads=heads, head_size=sizes[0] // heads, v_hidden=sizes[2])
    key, value = _attention_core(
        em,
        node,
        qkv,
        attrs,
        mask=mask,
        attention_bias=attention_bias,
        past_key=past_key,
        past_value=past_value,
        out=_output(node, 0, graph),
    )
    present = _output(node, 1, graph)
    if present is not None:
        stacked = [em("Unsqueeze", t, np.array([0], np.int64)) for t in (key, value)]
        em("Concat", *stacked, axis=0, out=present)


def _multi_head_attention(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """Attention over projected Q (B, S, D), K and V (B, L, D) with the projections' bias (D + D + Dv), or
    K and V already in (B, N, L, H) heads (cross-attention over cached keys: no bias, no past)."""
    graph = em.graph
    query, key, value, bias = node.inputs[0], _input(node, 1), _input(node, 2), _input(node, 3)
    mask, attention_bias, past_key, past_value = (_input(node, i) for i in (4, 5, 6, 7))
    _check_float(node, query, key, value, bias, attention_bias, past_key, past_value)
    if _input(node, 8) is not None or _input(node, 9) is not None:
        raise _refuse(node, "past_sequence_length / cache_indirection are not supported")
    if key is None or value is None or _rank(query) != 3:
        raise _refuse(
            node, "packed QKV/KV layouts are not supported (onnxruntime's CPU kernel does not implement them)"
        )
    if (past_key is None) != (past_value is None):
        raise _refuse(node, "past_key and past_value must be given together")
    heads = int(attrs["num_heads"])
    hidden = _static_dim(node, query, 2, "the query width")
    key_rank, value_rank = _rank(key), _rank(value)
    if key_rank != value_rank or key_rank not in (3, 4):
        raise _refuse(node, "key and value must both be 3D (B, L, D) or both 4D (B, N, L, H)")
    if key_rank == 4 and (bias is not None or past_key is not None):
        raise _refuse(node, "4D key/value take no bias and no past")
    v_hidden = (
        _static_dim(node, value, 2, "the value width")
        if value_rank == 3
        else heads * _static_dim(node, value, 3, "the value head size")
    )
    if hidden % heads or v_hidden % heads:
        raise _refuse(node, f"hidden sizes {hidden}/{v_hidden} are not divisible by num_heads={heads}")
    head_size = hidden // heads
    projected = [query, key, value]
    if bias is not None:
        bounds = [0, hidden, 2 * hidden, 2 * hidden + v_hidden]
        projected = [em("Add", t, em.slice(bias, bounds[i], bounds[i + 1], 0)) for i, t in enumerate(projected)]
    q = _to_heads(em, projected[0], heads, head_size)
    if key_rank == 3:
        k, v = _to_heads(em, projected[1], heads, head_size), _to_heads(em, projected[2], heads, v_hidden // heads)
    else:
        k, v = key, value
    qkv = _Heads(q, k, v, heads=heads, head_size=head_size, v_hidden=v_hidden)
    _attention_core(
        em,
        node,
        qkv,
        attrs,
        mask=mask,
        attention_bias=attention_bias,
        past_key=past_key,
        past_value=past_value,
        out=_output(node, 0, graph),
        present_key=_output(node, 1, graph),
        present_value=_output(node, 2, graph),
        scores_out=_output(node, 3, graph),
    )
    if past_key is None:
        for index, tensor in ((1, k), (2, v)):
            present = _output(node, index, graph)
            if present is not None:
                em("Identity", tensor, out=present)


def _rotary_embedding(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """RoPE on (B, S, N*H) or (B, N, S, H): the first rotary_embedding_dim features of each head rotate
    by the cached angles of their position, the rest pass through. Written as transformers writes it:
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (interleaved: pairs (x[2i], x[2i+1]))."""
    x, position_ids, cos_cache, sin_cache = node.inputs
    _check_float(node, x, cos_cache, sin_cache)
    if attrs["is_packed_batching"]:
        raise _refuse(node, "is_packed_batching is not supported")
    rank = _rank(x)
    if rank not in (3, 4):
        raise _refuse(node, f"a {rank}D input is not supported (3D or 4D)")
    half = _static_dim(node, cos_cache, 1, "the cos_cache width")
    rotary = int(attrs["rotary_embedding_dim"]) or 2 * half
    heads = int(attrs["num_heads"])
    if rank == 4:
        head_size = _static_dim(node, x, 3, "the head size")
    elif heads:
        head_size = _static_dim(node, x, 2, "the hidden size") // heads
    elif attrs["rotary_embedding_dim"]:
        raise _refuse(node, "rotary_embedding_dim needs num_heads for a 3D input")
    else:
        head_size = rotary
    if rotary != 2 * half or rotary > head_size:
        raise _refuse(
            node, f"rotary_embedding_dim {rotary} does not match the cos_cache width {half} and head size {head_size}"
        )
    if _rank(position_ids) == 1:  # one offset: positions offset, offset + 1, ...
        steps = em("Range", np.int64(0), em.scalar(em.dim(x, 2 if rank == 4 else 1)), np.int64(1))
        position_ids = em("Unsqueeze", em("Add", steps, em.scalar(position_ids)), np.array([0], np.int64))
    heads_axis = np.array([1 if rank == 4 else 2], np.int64)
    angles = [
        em("Unsqueeze", em("Gather", cache, position_ids, axis=0), heads_axis) for cache in (cos_cache, sin_cache)
    ]
    split = x if rank == 4 else em("Reshape", x, np.array([0, 0, -1, head_size], np.int64))
    rotated = em.slice(split, 0, rotary, -1) if rotary < head_size else split
    if attrs["interleaved"]:
        cos, sin = (
            em(
                "Reshape",
                em("Concat", *[em("Unsqueeze", a, np.array([-1], np.int64))] * 2, axis=-1),
                np.array([0, 0, 0, rotary], np.int64),
            )
            for a in angles
        )
        pairs = [
            em("Unsqueeze", em.slice(rotated, start, rotary, -1, step=2), np.array([-1], np.int64)) for start in (0, 1)
        ]
        turned = em(
            "Reshape", em("Concat", em("Neg", pairs[1]), pairs[0], axis=-1), np.array([0, 0, 0, rotary], np.int64)
        )
    else:
        cos, sin = (em("Concat", a, a, axis=-1) for a in angles)
        turned = em("Concat", em("Neg", em.slice(rotated, half, rotary, -1)), em.slice(rotated, 0, half, -1), axis=-1)
    embedded = em("Add", em("Mul", rotated, cos), em("Mul", turned, sin))
    if rotary < head_size:
        embedded = em("Concat", embedded, em.slice(split, rotary, head_size, -1), axis=-1)
    out = _output(node, 0, em.graph)
    if rank == 4:
        em("Identity", embedded, out=out)
    else:
        em("Reshape", embedded, np.array([0, 0, -1], np.int64), out=out)


def _group_query_attention(em: _Emitter, node: gs.Node, attrs: dict) -> None:
    """Attention whose N query heads share KV heads in groups of N / kv_num_heads, causal, with a past
    (B, kv heads, P, H) concatenated in front of the new keys. seqlens_k holds each row's total length
    minus one: keys at or after it are masked. A prompt (no past) starts at position 0 in every row; with a
    past, each row's queries end at its total length, as onnxruntime's kernel places them (the past must
    then hold exactly the keys before the chunk: a longer shared buffer is not this layout)."""
    graph = em.graph
    query, key, value, past_key, past_value = (
        node.inputs[0],
        _input(node, 1),
        _input(node, 2),
        _input(node, 3),
        _input(node, 4),
    )
    seqlens = node.inputs[5]
    _check_float(node, query, key, value, past_key, past_value)
    for name, default in (
        ("do_rotary", 0),
        ("softcap", 0.0),
        ("local_window_size", -1),
        ("smooth_softmax", 0),
        ("qk_output", 0),
    ):
        if attrs[name] != default:
            raise _refuse(node, f"{name}={attrs[name]} is not supported")
    if key is None or value is None:
        raise _refuse(node, "packed QKV is not supported (give key and value)")
    if (past_key is None) != (past_value is None):
        raise _refuse(node, "past_key and past_value must be given together")
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    hidden = _static_dim(node, query, 2, "the query width")
    if heads <= 0 or kv_heads <= 0 or hidden % heads or heads % kv_heads:
        raise _refuse(node, f"num_heads={heads}, kv_num_heads={kv_heads} do not split the query width {hidden}")
    head_size, group = hidden // heads, heads // kv_heads
    present_key, present_value = _output(node, 1, graph), _output(node, 2, graph)
    k, v = (_to_heads(em, t, kv_heads, head_size) for t in (key, value))
    if past_key is not None:
        k = em("Concat", past_key, k, axis=2, out=present_key)
        v = em("Concat", past_value, v, axis=2, out=present_value)
    else:
        for tensor, present in ((k, present_key), (v, present_value)):
            if present is not None:
                em("Identity", tensor, out=present)
    if group > 1:  # kv head h serves query heads h * group ... (h + 1) * group - 1
        k, v = (
            em(
                "Reshape",
                em("Tile", em("Unsqueeze", t, np.array([2], np.int64)), np.array([1, 1, group, 1, 1], np.int64)),
                np.array([0, heads, -1, head_size], np.int64),
            )
            for t in (k, v)
        )
    q = _to_heads(em, query, heads, head_size)
    scores = em("MatMul", q, em("Transpose", k, perm=[0, 1, 3, 2]))
    factor = np.float32(attrs["scale"]) if attrs["scale"] else np.float32(1.0 / math.sqrt(head_size))
    scores = em("Mul", scores, factor)
    queries = em.dim(q, 2)
    rows = em("Reshape", em("Range", np.int64(0), em.scalar(queries), np.int64(1)), np.array([1, 1, -1, 1], np.int64))
    keys = em(
        "Reshape", em("Range", np.int64(0), em.scalar(em.dim(k, 2)), np.int64(1)), np.array([1, 1, 1, -1], np.int64)
    )
    lengths = em(
        "Reshape",
        em("Add", em("Cast", seqlens, to=onnx.TensorProto.INT64), np.int64(1)),
        np.array([-1, 1, 1, 1], np.int64),
    )
    last = rows if past_key is None else em("Add", rows, em("Sub", lengths, queries))
    hidden_keys = em("Or", em("Greater", keys, last), em("GreaterOrEqual", keys, lengths))
    scores = em("Add", scores, em("Where", hidden_keys, np.float32(_LOWEST), np.float32(0.0)))
    context = em("MatMul", em("Softmax", scores, axis=-1), v)
    em(
        "Reshape",
        em("Transpose", context, perm=[0, 2, 1, 3]),
        np.array([0, 0, hidden], np.int64),
        out=_output(node, 0, graph),
    )


# ----------------------------------------------------------------------------- registry

_NCHWC_REFUSAL = (
    "onnxruntime's NCHWc layout (optimization level 99) depends on the CPU that optimized the model; "
    "optimize with opt_level <= 2"
)

_NORM_ATTRS = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}
_SPECS: dict[tuple[str, str], _Spec] = {
    ("", "LayerNormalization"): _Spec(_layer_norm_v1, _NORM_ATTRS, 3),
    ("", "SimplifiedLayerNormalization"): _Spec(_simplified_layer_norm, _NORM_ATTRS, 2),
    (MS, "SkipLayerNormalization"): _Spec(
        lambda em, n, a: _skip_layer_norm(em, n, a, simplified=False), {"epsilon": 1e-12}, 5
    ),
    (MS, "SkipSimplifiedLayerNormalization"): _Spec(
        lambda em, n, a: _skip_layer_norm(em, n, a, simplified=True), {"epsilon": 1e-12}, 4
    ),
    (MS, "EmbedLayerNormalization"): _Spec(_embed_layer_norm, {"epsilon": 1e-12, "mask_index_type": 1}, 9),
    (MS, "Gelu"): _Spec(_gelu, {}, 1),
    (MS, "BiasGelu"): _Spec(_gelu, {}, 2),
    (MS, "FastGelu"): _Spec(_gelu, {}, 2),
    (MS, "QuickGelu"): _Spec(_quick_gelu, {"alpha": 1.702}, 1),
    (MS, "BiasAdd"): _Spec(_bias_add, {}, 3),
    (MS, "BiasSplitGelu"): _Spec(_bias_split_gelu, {}, 2),
    (MS, "GemmFastGelu"): _Spec(_gemm_fast_gelu, {}, 3),
    (MS, "FusedMatMul"): _Spec(
        _fused_matmul, {"alpha": 1.0, "transA": 0, "transB": 0, "transBatchA": 0, "transBatchB": 0}, 2
    ),
    (MS, "TransposeMatMul"): _Spec(_fused_matmul, {"alpha": 1.0, "transA": 0, "transB": 0}, 2),
    (MS, "FusedGemm"): _Spec(
        _fused_gemm,
        {
            "alpha": 1.0,
            "beta": 1.0,
            "transA": 0,
            "transB": 0,
            "activation": None,
            "activation_alpha": None,
            "activation_beta": None,
            "activation_gamma": None,
        },
        3,
    ),
    (MS, "FusedConv"): _Spec(
        _fused_conv,
        {
            "activation": None,
            "activation_params": None,
            "auto_pad": None,
            "dilations": None,
            "group": None,
            "kernel_shape": None,
            "pads": None,
            "strides": None,
        },
        4,
    ),
    (MS, "Attention"): _Spec(
        _attention,
        {
            "num_heads": 0,
            "qkv_hidden_sizes": None,
            "scale": None,
            "mask_filter_value": _MASK_FILTER,
            "unidirectional": 0,
            "do_rotary": 0,
            "rotary_embedding_dim": 0,
            "past_present_share_buffer": 0,
        },
        7,
    ),
    (MS, "MultiHeadAttention"): _Spec(
        _multi_head_attention,
        {"num_heads": 0, "scale": None, "mask_filter_value": _MASK_FILTER, "unidirectional": 0},
        10,
    ),
    (MS, "GroupQueryAttention"): _Spec(
        _group_query_attention,
        {
            "num_heads": 0,
            "kv_num_heads": 0,
            "scale": None,
            "softcap": 0.0,
            "do_rotary": 0,
            "rotary_interleaved": 0,
            "local_window_size": -1,
            "smooth_softmax": 0,
            "qk_output": 0,
        },
        7,
    ),
    (MS, "RotaryEmbedding"): _Spec(
        _rotary_embedding,
        {"num_heads": 0, "rotary_embedding_dim": 0, "interleaved": 0, "is_packed_batching": 0, "scale": 1.0},
        4,
    ),
}
