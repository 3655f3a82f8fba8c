"""Recognize the Transformer building blocks in a canonicalized graph.

`find_regions` returns one Region per recognized block. Composite blocks (attention op,
layer norm and its RMS and L2 variants, GELU, other activations, softmax) are matched first, then
matmuls, gated products and residual adds over the nodes they left, so every node belongs to at most
one region. The op sequences matched are the ones torch.onnx emits (TorchScript and dynamo exporters);
tests/test_frontend.py and tests/test_blocks.py export each. Activations are also recognized by the
function they compute, whatever ops write them (ELEMENTWISE_FUNCTIONS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import onnx_graphsurgeon as gs

KINDS = (
    "quantizer",
    "attention",
    "layernorm",
    "gelu",
    "activation",
    "softmax",
    "weight_matmul",
    "act_matmul",
    "act_mul",
    "residual_add",
)

# An additive attention mask holds 0 where attention is allowed and a large negative number
# elsewhere: -inf or finfo.min from torch/transformers, -1e4 in older code, -100 in Swin.
_MASK_MAX_NEGATIVE = -100.0
_MATMUL_OPS = frozenset({"MatMul", "Gemm", "Attention"})
_SHAPE_OPS = frozenset({"Shape", "Size"})  # outputs depend on the input's shape, not its values


@dataclass
class Region:
    kind: str  # one of KINDS
    nodes: list[gs.Node]  # topological order
    inputs: list[gs.Variable]  # non-constant tensors entering from outside, masks included
    outputs: list[gs.Variable]  # tensors produced inside and used outside, or graph outputs
    attrs: dict  # kind-specific, see the matchers below
    name: str  # the main node's name


def find_regions(graph: gs.Graph) -> list[Region]:
    """All recognized regions of a toposorted graph, in the order of their first node."""
    ctx = _Context(graph)
    regions = []
    for kind, matcher in _MATCHERS:
        for node in graph.nodes:
            if id(node) in ctx.claimed:
                continue
            match = matcher(node, ctx)
            if match is None:
                continue
            nodes, attrs = match
            if any(id(n) in ctx.claimed for n in nodes):
                continue
            ctx.claimed.update(id(n) for n in nodes)
            regions.append(ctx.region(kind, node, nodes, attrs))
    regions.sort(key=lambda r: ctx.order[id(r.nodes[0])])
    return regions


def describe(regions: list[Region]) -> list[dict]:
    """JSON-serializable summaries; tensors in attrs are replaced by their names."""
    return [
        {
            "kind": r.kind,
            "name": r.name,
            "nodes": [n.name for n in r.nodes],
            "ops": [n.op for n in r.nodes],
            "inputs": [t.name for t in r.inputs],
            "outputs": [t.name for t in r.outputs],
            "attrs": _named(r.attrs),
        }
        for r in regions
    ]


def _named(value):
    """``value`` with every tensor replaced by its name, through lists and dicts."""
    if isinstance(value, gs.Tensor):
        return value.name
    if isinstance(value, dict):
        return {k: _named(v) for k, v in value.items()}
    return [_named(v) for v in value] if isinstance(value, list) else value


class _Context:
    """Graph facts shared by the matchers."""

    def __init__(self, graph: gs.Graph):
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}
        self.graph_outputs = {id(t) for t in graph.outputs}
        self.claimed: set[int] = set()
        self.opset = graph.opset
        self.functions: dict[int, tuple[list[gs.Node], str] | None] = {}
        # Tensors whose values are computed from a matmul: attention scores are; masks, built from
        # an attention_mask input or from activation shapes (Swin's window mask), are not.
        self.from_matmul: set[int] = set()
        # Tensors whose values depend on no input's values (weights an exporter left as Slice/Transpose of an
        # initializer, as torch.nn.MultiheadAttention's split in-projection): products by them are weight products.
        self.input_free: set[int] = set()
        data = {id(t) for t in graph.inputs}
        for node in graph.nodes:
            if node.op in _SHAPE_OPS:
                self.input_free.update(id(t) for t in node.outputs)
                continue
            if node.op in _MATMUL_OPS or any(id(t) in self.from_matmul for t in node.inputs):
                self.from_matmul.update(id(t) for t in node.outputs)
            if any(id(t) in data for t in node.inputs):
                data.update(id(t) for t in node.outputs)
            else:
                self.input_free.update(id(t) for t in node.outputs)

    def sole_consumer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The one node reading `tensor`, if nothing else (graph outputs included) does."""
        if len(tensor.outputs) != 1 or id(tensor) in self.graph_outputs:
            return None
        return tensor.outputs[0]

    def region(self, kind: str, main: gs.Node, nodes: list[gs.Node], attrs: dict) -> Region:
        nodes = sorted(nodes, key=lambda n: self.order[id(n)])
        inside = {id(n) for n in nodes}
        produced = {id(t) for n in nodes for t in n.outputs}
        inputs, outputs = [], []
        for n in nodes:
            for t in n.inputs:
                if id(t) not in produced and _const(t) is None and t.name and t not in inputs:
                    inputs.append(t)
            for t in n.outputs:
                if id(t) in self.graph_outputs or any(id(c) not in inside for c in t.outputs):
                    outputs.append(t)
        return Region(kind, nodes, inputs, outputs, attrs, main.name)


# ----------------------------------------------------------------------------- tensor helpers


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or Constant-node output, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producer = _producer(tensor)
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        return producer.attrs["value"].values
    return None


def _const_tensor(tensor: gs.Tensor) -> gs.Tensor | None:
    return tensor if _const(tensor) is not None else None


def _scalar(tensor: gs.Tensor) -> float | None:
    value = _const(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _among(node: gs.Node | None, nodes: list[gs.Node]) -> bool:
    """Identity membership: gs.Node equality compares whole subgraphs and is not meant for this."""
    return any(node is n for n in nodes)


def _default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def _is(node: gs.Node | None, *ops: str) -> TypeGuard[gs.Node]:
    return node is not None and node.op in ops


def _close(value: float | None, expected: float) -> bool:
    # float16 models (upcast at import) round constants such as sqrt(2) by up to 2^-11 relative
    return value is not None and math.isclose(value, expected, rel_tol=1e-3)


def _with_scalar(node: gs.Node | None, op: str) -> tuple[gs.Tensor, float] | None:
    """(variable operand, scalar) of a binary `op` node with one scalar-constant operand."""
    if not _is(node, op) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    scalar_a, scalar_b = _scalar(a), _scalar(b)
    if scalar_b is not None and _const(a) is None:
        return a, scalar_b
    if op in ("Add", "Mul", "Max", "Min") and scalar_a is not None and _const(b) is None:
        return b, scalar_a
    return None


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary node that is not `tensor` (None unless `tensor` is one of two)."""
    a, b = node.inputs
    return b if a is tensor else a if b is tensor else None


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _negative_axis(axis: int, rank: int | None) -> int:
    return axis - rank if axis >= 0 and rank is not None else axis


# ----------------------------------------------------------------------------- matchers
# Each takes a candidate main node and returns (nodes, attrs) or None.

Match = tuple[list[gs.Node], dict] | None


# Integer ranges of the zero-point types QuantizeLinear/DequantizeLinear pairs use.
_QDQ_RANGES = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.uint16): (0, 65535),
}


def _match_qdq(quantize: gs.Node, ctx: _Context) -> Match:
    """QuantizeLinear -> DequantizeLinear with one scalar scale and zero point (per-tensor), as
    onnxruntime.quantization's QDQ format and QAT exports write an activation quantizer. Its value is
    (clamp(round_half_even(x/s) + z, qmin, qmax) - z) * s: levels in [qmin - z, qmax - z]."""
    if quantize.op != "QuantizeLinear" or not _default_domain(quantize) or _const(quantize.inputs[0]) is not None:
        return None
    dequantize = ctx.sole_consumer(quantize.outputs[0])
    if not _is(dequantize, "DequantizeLinear"):
        return None
    scale, zero = _scalar(quantize.inputs[1]), quantize.inputs[2] if len(quantize.inputs) > 2 else None
    zero_value = _const(zero) if zero is not None and zero.name else np.zeros((), np.uint8)
    if scale is None or zero_value is None or zero_value.size != 1 or zero_value.dtype not in _QDQ_RANGES:
        return None
    dq_zero = dequantize.inputs[2] if len(dequantize.inputs) > 2 and dequantize.inputs[2].name else None
    dq_zero_value = _const(dq_zero) if dq_zero is not None else np.zeros((), zero_value.dtype)
    if (
        _scalar(dequantize.inputs[1]) != scale
        or dq_zero_value is None
        or dq_zero_value.reshape(-1)[0] != zero_value.reshape(-1)[0]
    ):
        return None
    qmin, qmax = _QDQ_RANGES[zero_value.dtype]
    z = int(zero_value.reshape(-1)[0])
    return [quantize, dequantize], {
        "format": "qdq",
        "scale": scale,
        "low": qmin - z,
        "high": qmax - z,
        "rounding": "half_even",
        "input": quantize.inputs[0],
    }


def _match_quantize_chain(floor: gs.Node, ctx: _Context) -> Match:
    """spikec's own quantizer (passes/quantize.py, the reference code's LSQ forward):
    Div(x, s) -> Add(0.5) -> Floor -> Clip(low, high) -> Mul(s) = clamp(floor(x/s + 1/2), low, high) * s, or
    with per-channel bounds (vectors over the last axis, as a per-channel s) Max(low) -> Min(high) for the Clip."""
    if floor.op != "Floor":
        return None
    add = _producer(floor.inputs[0])
    shifted = _with_scalar(add, "Add")
    div = _producer(shifted[0]) if shifted and _close(shifted[1], 0.5) else None
    divided = _with_channel_scale(div, "Div")
    clamp = _match_clamp(floor.outputs[0], ctx)
    mul = ctx.sole_consumer(clamp[0][-1].outputs[0]) if clamp else None
    scaled = _with_channel_scale(mul, "Mul")
    if (
        not divided
        or not scaled
        or add is None
        or div is None
        or clamp is None
        or not np.array_equal(scaled[1], divided[1])
        or len(add.outputs[0].outputs) != 1
        or len(div.outputs[0].outputs) != 1
    ):
        return None
    nodes, low, high = clamp
    scale = divided[1]
    return [div, add, floor, *nodes, mul], {
        "format": "spikec",
        "scale": float(scale) if scale.ndim == 0 else scale,
        "low": low,
        "high": high,
        "rounding": "half_up",
        "input": divided[0],
    }


def _match_clamp(levels: gs.Tensor, ctx: _Context) -> tuple[list[gs.Node], int | np.ndarray, int | np.ndarray] | None:
    """The clamp of a quantizer's levels to integer bounds: Clip(low, high) with scalars, or Max(low) ->
    Min(high) with each bound a scalar or a vector over the last axis (per-channel bounds, int64 [C])."""
    first = ctx.sole_consumer(levels)
    if first is None:
        return None
    if _is(first, "Clip"):
        scalars = [v for v in (_scalar(t) for t in first.inputs[1:]) if v is not None] if len(first.inputs) == 3 else []
        return ([first], int(scalars[0]), int(scalars[1])) if len(scalars) == 2 else None
    second = ctx.sole_consumer(first.outputs[0]) if _is(first, "Max") and len(first.inputs) == 2 else None
    if second is None or not _is(second, "Min") or len(second.inputs) != 2 or first.inputs[0] is not levels:
        return None
    found = [_const(first.inputs[1]), _const(second.inputs[1])]
    bounds = [b for b in found if b is not None and b.ndim <= 1 and np.array_equal(b, np.round(b))]
    if len(bounds) != 2 or second.inputs[0] is not first.outputs[0]:
        return None
    low, high = (int(b.reshape(-1)[0]) if b.size == 1 else b.astype(np.int64) for b in bounds)
    if (np.asarray(low) > np.asarray(high)).any():
        return None
    return [first, second], low, high


def _with_channel_scale(node: gs.Node | None, op: str) -> tuple[gs.Tensor, np.ndarray] | None:
    """(variable operand, scale) of a binary ``op`` whose second operand is a positive constant scale: a
    scalar, or a 1-D vector over the variable's last axis (a per-channel quantizer)."""
    if not _is(node, op) or len(node.inputs) != 2 or _const(node.inputs[0]) is not None:
        return None
    scale = _const(node.inputs[1])
    if scale is None or scale.ndim > 1 or not (scale > 0).all():
        return None
    return node.inputs[0], (scale.reshape(()) if scale.size == 1 else scale.astype(np.float32))


def _match_attention(node: gs.Node, ctx: _Context) -> Match:
    """Opset 23 Attention, which the dynamo exporter emits for scaled_dot_product_attention."""
    if node.op != "Attention" or not _default_domain(node):
        return None
    scale = node.attrs.get("scale")
    return [node], {
        "op": "Attention",
        "is_causal": bool(node.attrs.get("is_causal", 0)),
        "scale": None if scale is None else float(scale),
    }


def _match_layernorm_op(node: gs.Node, ctx: _Context) -> Match:
    """LayerNormalization: opset 17+, or the com.microsoft contrib op of the same signature."""
    if node.op != "LayerNormalization" or not (_default_domain(node) or node.domain == "com.microsoft"):
        return None
    scale = _const_tensor(node.inputs[1])
    bias = _const_tensor(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if scale is None or (len(node.inputs) > 2 and node.inputs[2].name and bias is None):
        return None
    return [node], {
        "epsilon": float(node.attrs.get("epsilon", 1e-5)),
        "axis": _negative_axis(int(node.attrs.get("axis", -1)), _rank(node.inputs[0])),
        "form": "op",
        "center": True,
        "reduction": "mean",
        "scale": scale,
        "bias": bias,
    }


def _match_layernorm_decomposed(mean_node: gs.Node, ctx: _Context) -> Match:
    """The pre-opset-17 TorchScript export of nn.LayerNorm:

    ReduceMean(x) -> Sub(x, mean) -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(sub, sqrt)
    [-> Mul(gamma)] [-> Add(beta)]. The Div may read its own second Sub(x, mean) (a Python
    `(x - u)` written twice), Pow(d, 2) may be Mul(d, d), and the Add(eps) may be missing: the
    dynamo exporter's optimizer drops an epsilon too small to matter in float32 (seen for 1e-12).
    """
    axes = _reduce_axes(mean_node)
    if axes is None:
        return None
    x, mean = mean_node.inputs[0], mean_node.outputs[0]
    subs = mean.outputs
    if not subs or len(subs) > 2 or id(mean) in ctx.graph_outputs:
        return None
    if any(s.op != "Sub" or s.inputs[0] is not x or s.inputs[1] is not mean for s in subs):
        return None
    square = next((c for s in subs for c in s.outputs[0].outputs if _is_square(c, s.outputs[0])), None)
    var_node = ctx.sole_consumer(square.outputs[0]) if square else None
    if var_node is None or _reduce_axes(var_node) != axes:
        return None
    after_var = ctx.sole_consumer(var_node.outputs[0])
    eps = _with_scalar(after_var, "Add")
    eps_nodes, sqrt = ([after_var], ctx.sole_consumer(after_var.outputs[0])) if eps and after_var else ([], after_var)
    div = ctx.sole_consumer(sqrt.outputs[0]) if _is(sqrt, "Sqrt") else None
    if (
        sqrt is None
        or not _is(div, "Div")
        or div.inputs[1] is not sqrt.outputs[0]
        or not _among(_producer(div.inputs[0]), subs)
    ):
        return None
    nodes = [mean_node, *subs, square, var_node, *eps_nodes, sqrt, div]
    if any(not _among(c, nodes) for s in subs for c in s.outputs[0].outputs):
        return None
    return _normalization(x, axes, nodes, eps[1] if eps else 0.0, "decomposed", True, "mean", ctx)


def _normalization(
    x: gs.Tensor,
    axes: list[int],
    nodes: list[gs.Node],
    epsilon: float,
    form: str,
    center: bool,
    reduction: str,
    ctx: _Context,
) -> Match:
    """A normalization of x over its last axes ending in nodes[-1], with the Mul(gamma) and Add(beta) after it
    that hold constants of the normalized shape. attrs: y = (x - mean if center) * (reduce(x^2 or (x - mean)^2)
    + epsilon)^(-1/2) [* scale] [+ bias], reduce = ReduceMean or ReduceSum over the last -axis axes."""
    rank = _rank(x)
    axis = -len(axes)
    if rank is not None and sorted(a % rank for a in axes) != list(range(rank - len(axes), rank)):
        return None
    normalized = x.shape[axis:] if x.shape is not None else None
    scale = _affine_param(nodes[-1], "Mul", normalized, ctx)
    if scale is not None:
        nodes.append(scale[0])
    bias = _affine_param(nodes[-1], "Add", normalized, ctx)
    if bias is not None:
        nodes.append(bias[0])
    return nodes, {
        "epsilon": epsilon,
        "axis": axis,
        "form": form,
        "center": center,
        "reduction": reduction,
        "scale": scale[1] if scale else None,
        "bias": bias[1] if bias else None,
    }


def _match_rmsnorm_op(node: gs.Node, ctx: _Context) -> Match:
    """RMSNormalization (opset 23): x / sqrt(mean(x^2 over axes [axis, rank)) + epsilon) * scale."""
    if node.op != "RMSNormalization" or not _default_domain(node):
        return None
    scale = _const_tensor(node.inputs[1])
    rank = _rank(node.inputs[0])
    if scale is None or rank is None:
        return None
    return [node], {
        "epsilon": float(node.attrs.get("epsilon", 1e-5)),
        "axis": int(node.attrs.get("axis", -1)) % rank - rank,
        "form": "op",
        "center": False,
        "reduction": "mean",
        "scale": scale,
        "bias": None,
    }


def _match_rmsnorm_decomposed(var_node: gs.Node, ctx: _Context) -> Match:
    """RMSNorm as LLaMA, Mistral, Qwen2, Gemma and T5 export it (x * rsqrt(mean(x^2) + eps) * weight):

    Pow(x, 2) or Mul(x, x) -> ReduceMean(last axes) -> Add(eps) -> Sqrt -> Div(1, .) or Reciprocal ->
    Mul(x, .) [-> Mul(weight)], or Div(x, Sqrt(...)). x is often the Cast to float32 LLaMA writes; Gemma's
    (1 + weight) reaches here folded into one constant."""
    axes = _reduce_axes(var_node)
    variance = var_node.outputs[0]
    square = _producer(var_node.inputs[0]) if axes is not None else None
    if (
        square is None
        or axes is None
        or ctx.sole_consumer(square.outputs[0]) is not var_node
        or not _is_square(square, square.inputs[0])
    ):
        return None
    x = square.inputs[0]
    after = ctx.sole_consumer(variance)
    eps = _with_scalar(after, "Add")
    eps_nodes, sqrt = ([after], ctx.sole_consumer(after.outputs[0])) if eps and after else ([], after)
    if sqrt is None:
        return None
    root = sqrt.outputs[0] if _is(sqrt, "Sqrt") else None
    step = ctx.sole_consumer(root) if root is not None else None
    if _is(step, "Div") and step.inputs[0] is x and step.inputs[1] is root:
        tail = [step]
    elif _is(step, "Reciprocal") or (
        _is(step, "Div") and step.inputs[1] is root and _close(_scalar(step.inputs[0]), 1.0)
    ):
        mul = ctx.sole_consumer(step.outputs[0])
        if not _is(mul, "Mul") or _other_input(mul, step.outputs[0]) is not x:
            return None
        tail = [step, mul]
    else:
        return None
    return _normalization(
        x, axes, [square, var_node, *eps_nodes, sqrt, *tail], eps[1] if eps else 0.0, "rms", False, "mean", ctx
    )


def _match_l2_normalize(norm: gs.Node, ctx: _Context) -> Match:
    """torch.nn.functional.normalize(x, dim=-1) (Swin-v2's cosine attention, sentence-transformers' Normalize):
    ReduceL2(x, last axis) -> Clip(min=eps) or Max(., eps) -> [Expand] -> Div(x, .). Taken as
    x * (sum(x^2) + eps^2)^(-1/2), which differs from x / max(|x|, eps) only for |x| within a few eps of 0."""
    axes = _reduce_axes(norm, "ReduceL2")
    clamp = ctx.sole_consumer(norm.outputs[0]) if axes is not None else None
    if _is(clamp, "Clip") and len(clamp.inputs) >= 2 and (len(clamp.inputs) < 3 or not clamp.inputs[2].name):
        eps = _scalar(clamp.inputs[1])
    else:
        floor = _with_scalar(clamp, "Max")
        eps = floor[1] if floor else None
    if eps is None or eps < 0 or axes is None or clamp is None:
        return None
    nodes, divisor = [norm, clamp], clamp.outputs[0]
    expand = ctx.sole_consumer(divisor)
    if _is(expand, "Expand") and expand.inputs[0] is divisor:
        nodes.append(expand)
        divisor = expand.outputs[0]
    div = ctx.sole_consumer(divisor)
    x = norm.inputs[0]
    if not _is(div, "Div") or div.inputs[0] is not x or div.inputs[1] is not divisor:
        return None
    return _normalization(x, axes, [*nodes, div], eps * eps, "l2", False, "sum", ctx)


def _reduce_axes(node: gs.Node | None, op: str = "ReduceMean") -> list[int] | None:
    """Axes of a keepdims reduction ``op`` (attribute before opset 18, input from 18 on)."""
    if not _is(node, op) or not node.attrs.get("keepdims", 1):
        return None
    if len(node.inputs) > 1:
        axes = _const(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def _is_square(node: gs.Node, tensor: gs.Tensor) -> bool:
    if _is(node, "Pow"):
        return node.inputs[0] is tensor and _scalar(node.inputs[1]) == 2.0
    return _is(node, "Mul") and node.inputs[0] is tensor and node.inputs[1] is tensor


def _affine_param(prev: gs.Node, op: str, normalized: list | None, ctx: _Context) -> tuple[gs.Node, gs.Tensor] | None:
    """(node, constant) when the sole consumer of `prev` is `op` with a constant of the normalized shape."""
    node = ctx.sole_consumer(prev.outputs[0])
    if not _is(node, op) or normalized is None:
        return None
    param = _other_input(node, prev.outputs[0])
    value = _const(param) if param is not None else None
    if value is None or list(value.shape) != list(normalized):
        return None
    return node, param


def _match_gelu_op(node: gs.Node, ctx: _Context) -> Match:
    """Gelu (opset 20+), or com.microsoft Gelu / FastGelu without bias (form "ms")."""
    if node.op == "Gelu" and _default_domain(node):
        return [node], {"form": "op", "approximate": node.attrs.get("approximate", "none")}
    if node.domain == "com.microsoft" and node.op in ("Gelu", "FastGelu") and len(node.inputs) == 1:
        return [node], {"form": "ms", "approximate": "none" if node.op == "Gelu" else "tanh"}
    return None


def _match_gelu_erf(erf: gs.Node, ctx: _Context) -> Match:
    """0.5 * x * (1 + erf(x / sqrt(2))): Div(x, sqrt2) or Mul(x, 1/sqrt2) -> Erf -> Add(1) -> x * 0.5 products."""
    if erf.op != "Erf":
        return None
    scaling = _producer(erf.inputs[0])
    div = _with_scalar(scaling, "Div")
    mul = _with_scalar(scaling, "Mul")
    if div and _close(div[1], math.sqrt(2.0)):
        x = div[0]
    elif mul and _close(mul[1], 1.0 / math.sqrt(2.0)):
        x = mul[0]
    else:
        return None
    assert scaling is not None  # _with_scalar matched it
    if ctx.sole_consumer(scaling.outputs[0]) is not erf:
        return None
    tail = _gelu_tail(erf, x, ctx)
    return ([scaling, erf, *tail], {"form": "erf", "approximate": "none"}) if tail else None


def _match_gelu_tanh(tanh: gs.Node, ctx: _Context) -> Match:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).

    x^3 is Pow(x, 3) (dynamo, GPT-2 NewGELU) or Mul(x, Mul(x, x)) (TorchScript nn.GELU('tanh')).
    """
    if tanh.op != "Tanh":
        return None
    outer = _producer(tanh.inputs[0])
    scaled = _with_scalar(outer, "Mul")
    if (
        not scaled
        or outer is None
        or not _close(scaled[1], math.sqrt(2.0 / math.pi))
        or ctx.sole_consumer(outer.outputs[0]) is not tanh
    ):
        return None
    inner = _producer(scaled[0])
    if not _is(inner, "Add") or ctx.sole_consumer(inner.outputs[0]) is not outer:
        return None
    for x, cubic_term in (inner.inputs, inner.inputs[::-1]):
        coeff_mul = _producer(cubic_term)
        coeff = _with_scalar(coeff_mul, "Mul")
        if not coeff or not _close(coeff[1], 0.044715) or ctx.sole_consumer(cubic_term) is not inner:
            continue
        cube = _cube_nodes(coeff[0], x, ctx)
        tail = _gelu_tail(tanh, x, ctx) if cube else None
        if cube and tail:
            return [*cube, coeff_mul, inner, outer, tanh, *tail], {"form": "tanh", "approximate": "tanh"}
    return None


def _cube_nodes(tensor: gs.Tensor, x: gs.Tensor, ctx: _Context) -> list[gs.Node] | None:
    """The nodes computing `tensor` = x^3, as Pow(x, 3) or x * (x * x) in either order."""
    node = _producer(tensor)
    if ctx.sole_consumer(tensor) is None:
        return None
    if _is(node, "Pow") and node.inputs[0] is x and _scalar(node.inputs[1]) == 3.0:
        return [node]
    if not _is(node, "Mul") or x not in node.inputs:
        return None
    square = _producer(_other_input(node, x))
    if (
        _is(square, "Mul")
        and square.inputs[0] is x
        and square.inputs[1] is x
        and ctx.sole_consumer(square.outputs[0]) is node
    ):
        return [square, node]
    return None


def _gelu_tail(anchor: gs.Node, x: gs.Tensor, ctx: _Context) -> list[gs.Node] | None:
    """Add(anchor, 1) times x times 0.5, in each association torch emits:

    (x * (1 + f)) * 0.5 (TorchScript), x * (0.5 * (1 + f)) (dynamo), (0.5 * x) * (1 + f) (NewGELU).
    """
    one_plus = ctx.sole_consumer(anchor.outputs[0])
    plus = _with_scalar(one_plus, "Add")
    if not plus or one_plus is None or not _close(plus[1], 1.0):
        return None
    first = ctx.sole_consumer(one_plus.outputs[0])
    if not _is(first, "Mul"):
        return None
    factor = _other_input(first, one_plus.outputs[0])
    if factor is x or _close(_scalar(factor), 0.5):
        second = ctx.sole_consumer(first.outputs[0])
        if not _is(second, "Mul"):
            return None
        rest = _other_input(second, first.outputs[0])
        ok = _close(_scalar(rest), 0.5) if factor is x else rest is x
        return [one_plus, first, second] if ok else None
    half_x = _producer(factor)
    half = _with_scalar(half_x, "Mul")
    if half and half[0] is x and _close(half[1], 0.5) and ctx.sole_consumer(factor) is first:
        return [half_x, one_plus, first]
    return None


# ----------------------------------------------------------------------------- elementwise functions
# An activation written as a small graph of elementwise ops (BLOOM's GELU, quick_gelu, SiLU, x * relu6(x + 3) / 6)
# is recognized by what it computes, not by how it is written: the subgraph between one input x and one output
# is evaluated on a grid of x and compared with these functions.


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


# name -> (kind, attrs, f)
ELEMENTWISE_FUNCTIONS: dict[str, tuple[str, dict, Callable[[np.ndarray], np.ndarray]]] = {
    "gelu": ("gelu", {"approximate": "none"}, lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))),
    "gelu_tanh": (
        "gelu",
        {"approximate": "tanh"},
        lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    ),
    "silu": ("activation", {"function": "silu"}, lambda x: x * _sigmoid(x)),
    "quick_gelu": ("activation", {"function": "quick_gelu"}, lambda x: x * _sigmoid(1.702 * x)),
    "sigmoid": ("activation", {"function": "sigmoid"}, _sigmoid),
    "tanh": ("activation", {"function": "tanh"}, np.tanh),
    "relu": ("activation", {"function": "relu"}, lambda x: np.maximum(x, 0.0)),
    "hardsigmoid": ("activation", {"function": "hardsigmoid"}, _hardsigmoid),
    "hardswish": ("activation", {"function": "hardswish"}, lambda x: x * _hardsigmoid(x)),
}
_FUNCTION_GRID = np.concatenate([np.linspace(-12.0, 12.0, 2401), [-60.0, -30.0, 30.0, 60.0]])
_FUNCTION_TOLERANCE = 1e-5  # of max(1, |f|): float32 rounding, far below GELU's erf/tanh difference (3e-4)
_MAX_FUNCTION_NODES = 24
# Nonlinear ops an activation subgraph must contain (Relu and Clip alone are activations too).
_FUNCTION_ANCHORS = frozenset(
    {
        "Tanh",
        "Sigmoid",
        "Erf",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Relu",
        "Clip",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Mish",
    }
)
_ELEMENTWISE = _FUNCTION_ANCHORS | {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Min",
    "Max",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Softsign",
    "Identity",
    "Cast",
}


def _elementwise(node: gs.Node, ctx: _Context) -> bool:
    """An unclaimed elementwise op whose constant operands are scalars (a bias vector is no part of a function)."""
    if node.op not in _ELEMENTWISE or not _default_domain(node) or id(node) in ctx.claimed:
        return False
    if node.op == "Cast" and node.attrs.get("to") != 1:
        return False
    return all(not t.name or (value := _const(t)) is None or value.size == 1 for t in node.inputs)


def _variables(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if t.name and _const(t) is None]


def _cone(root: gs.Tensor, top: gs.Tensor, ctx: _Context) -> list[gs.Node] | None:
    """The elementwise nodes computing ``top`` from ``root`` alone (``top`` is ``root``: none), or None when
    ``top`` also depends on another tensor."""
    if top is root:
        return []
    producer = _producer(top)
    if producer is None or not _elementwise(producer, ctx):
        return None
    nodes = [producer]
    for tensor in _variables(producer):
        below = _cone(root, tensor, ctx)
        if below is None or len(nodes) + len(below) > _MAX_FUNCTION_NODES:
            return None
        nodes += [n for n in below if not _among(n, nodes)]
    return nodes


def _roots(anchor: gs.Node, ctx: _Context) -> list[gs.Tensor]:
    """Candidate inputs x of a function through ``anchor``: the tensors its elementwise ancestors read, nearest first."""
    found: list[gs.Tensor] = []
    frontier = list(_variables(anchor))
    while frontier and len(found) < _MAX_FUNCTION_NODES:
        tensor = frontier.pop(0)
        if any(tensor is t for t in found):
            continue
        found.append(tensor)
        producer = _producer(tensor)
        if producer is not None and _elementwise(producer, ctx):
            frontier += _variables(producer)
    return found


def _extend(nodes: list[gs.Node], root: gs.Tensor, ctx: _Context) -> list[list[gs.Node]]:
    """``nodes`` (ending in the node computing the function's current output) and each longer chain of single
    readers after it that still computes a function of ``root`` alone (pulling in side branches such as the
    0.5 * x of a GELU written (0.5 * x) * (1 + tanh(...))), shortest first."""
    chains = [nodes]
    while len(nodes) < _MAX_FUNCTION_NODES:
        reader = ctx.sole_consumer(nodes[-1].outputs[0])
        if reader is None or not _elementwise(reader, ctx):
            break
        side: list[gs.Tensor] = []
        for tensor in _variables(reader):
            if tensor is root or any(tensor is t for n in nodes for t in n.outputs):
                continue
            branch = _cone(root, tensor, ctx)
            if branch is None:
                return chains
            side += [n for n in branch if not _among(n, nodes) and not _among(n, side)]
        nodes = [*nodes, *side, reader]
        chains.append(nodes)
    return chains


def _closed(nodes: list[gs.Node], ctx: _Context) -> bool:
    """Whether only the last node's output is read outside ``nodes``."""
    return all(
        not (id(t) in ctx.graph_outputs or any(not _among(c, nodes) for c in t.outputs))
        for n in nodes[:-1]
        for t in n.outputs
    )


def _evaluate(nodes: list[gs.Node], root: gs.Tensor, x: np.ndarray, ctx: _Context) -> np.ndarray | None:
    """The subgraph ``nodes`` (a function of ``root`` whose last node computes it) on the float32 values ``x``,
    by onnxruntime."""
    import onnx
    import onnxruntime as ort
    from spikec.runtime.session import quiet_options

    output = nodes[-1].outputs[0].name
    nodes = _ordered(nodes, ctx)
    constants = {t.name: _const(t) for n in nodes for t in n.inputs if t.name and _const(t) is not None}
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs], **n.attrs)
            for n in nodes
        ],
        "function",
        [onnx.helper.make_tensor_value_info(root.name, onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", ctx.opset)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), quiet_options(), providers=["CPUExecutionProvider"])
        return session.run(None, {root.name: x.astype(np.float32)})[0]
    except Exception:  # noqa: BLE001 - an op or attribute this check cannot evaluate: not a known function
        return None


def _function_of(anchor: gs.Node, ctx: _Context) -> tuple[list[gs.Node], str] | None:
    """(nodes, name in ELEMENTWISE_FUNCTIONS) of the largest elementwise subgraph through ``anchor`` that computes
    one of ELEMENTWISE_FUNCTIONS of one tensor, cached per anchor."""
    if id(anchor) not in ctx.functions:
        ctx.functions[id(anchor)] = _find_function(anchor, ctx)
    return ctx.functions[id(anchor)]


def _find_function(anchor: gs.Node, ctx: _Context) -> tuple[list[gs.Node], str] | None:
    if anchor.op not in _FUNCTION_ANCHORS or not _elementwise(anchor, ctx):
        return None
    candidates = []
    for root in _roots(anchor, ctx):
        if root.dtype is not None and np.dtype(root.dtype) != np.float32:
            continue
        cone = _cone(root, anchor.outputs[0], ctx)
        if cone is not None:
            candidates += [(chain, root) for chain in _extend(_ordered(cone, ctx), root, ctx)]
    for nodes, root in sorted(candidates, key=lambda c: -len(c[0])):
        if not _closed(nodes, ctx):
            continue
        got = _evaluate(nodes, root, _FUNCTION_GRID, ctx)
        if got is None or got.shape != _FUNCTION_GRID.shape:
            continue
        for name, (_, _, function) in ELEMENTWISE_FUNCTIONS.items():
            want = function(_FUNCTION_GRID)
            if np.all(np.abs(got - want) <= _FUNCTION_TOLERANCE * np.maximum(1.0, np.abs(want))):
                return nodes, name
    return None


def _ordered(nodes: list[gs.Node], ctx: _Context) -> list[gs.Node]:
    return sorted(nodes, key=lambda n: ctx.order[id(n)])


def _function_match(anchor: gs.Node, ctx: _Context, kind: str) -> Match:
    found = _function_of(anchor, ctx)
    if found is None or ELEMENTWISE_FUNCTIONS[found[1]][0] != kind:
        return None
    nodes, name = found
    return nodes, {"form": "function", **ELEMENTWISE_FUNCTIONS[name][1]}


def _match_gelu_function(anchor: gs.Node, ctx: _Context) -> Match:
    """GELU written in forms the matchers above do not follow, by what it computes: BLOOM's
    x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))."""
    return _function_match(anchor, ctx, "gelu")


def _match_activation(anchor: gs.Node, ctx: _Context) -> Match:
    """An activation by what it computes (attrs["function"]): SiLU x * Sigmoid(x), CLIP's quick_gelu
    x * Sigmoid(1.702 x), HardSwish (the op, or x * Clip(x + 3, 0, 6) / 6), HardSigmoid, Sigmoid, Tanh, Relu."""
    return _function_match(anchor, ctx, "activation")


def _match_act_mul(node: gs.Node, ctx: _Context) -> Match:
    """Elementwise Mul of two activations of equal shape computed from matmuls: the gated MLPs' act(gate) * up
    (LLaMA/Mistral/Qwen2 SwiGLU, Gemma GeGLU). A Mul by something computed from the inputs alone (rotary
    cos/sin, a padding mask) or by a constant is affine and not one."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is b or not all(id(t) in ctx.from_matmul and _const(t) is None for t in (a, b)):
        return None
    if a.shape is not None and b.shape is not None and not _same_shape(a.shape, b.shape):
        return None
    return [node], {}


def _match_softmax(softmax: gs.Node, ctx: _Context) -> Match:
    """Softmax over the last axis, with the masks applied to its input and sdpa's NaN guard after.

    Masks (attrs["masks"], innermost first; each mask is time-invariant: built from an attention_mask input
    or from shapes, or a constant, never computed from a matmul), any chain of:
    * additive, Add(scores, mask): a computed mask (0 / a large negative number, or any additive bias such
      as ALiBi's), or a constant of 0 and large negative values (a folded causal mask);
    * subtractive, Sub(scores, mask): the same with the mask's sign flipped (scores - 1e4 * (1 - mask));
    * masked_fill, Where(condition, fill, scores) or Where(condition, scores, fill) with a scalar fill of
      at most _MASK_MAX_NEGATIVE (DeBERTa's finfo.min): masked scores are replaced, not shifted, which a
      fully masked row tells apart (uniform whatever the scores);
    * clamp, Max(scores, c) with a scalar c of at most _MASK_MAX_NEGATIVE: OPT's guard against a mask
      summed to -inf (finfo.min + finfo.min);
    * reshape, a Reshape that keeps the last axis, between masks: Swin's window mask is added to the
      scores viewed as [batch, windows, heads, N, N] and the sum viewed back as [batch * windows, heads, N, N].
      A reshape with no mask above it stays outside the region.
    NaN guard: Where(IsNaN(p), 0, p), which sdpa exports emit for fully masked rows.
    """
    if softmax.op != "Softmax":
        return None
    rank = _rank(softmax.outputs[0])
    axis = softmax.attrs.get("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    nodes: list[gs.Node] = []
    masks: list[dict] = []
    scores = softmax.inputs[0]
    while ctx.sole_consumer(scores) is (nodes[0] if nodes else softmax):
        step = _mask_step(_producer(scores), ctx)
        if step is None:
            break
        nodes.insert(0, _producer(scores))
        scores, mask = step
        masks.insert(0, mask)
    while masks and masks[0]["form"] == "reshape":
        scores = nodes.pop(0).outputs[0]
        masks.pop(0)
    guard = _nan_guard(softmax, ctx)
    return [*nodes, softmax, *guard], {"axis": -1, "scores": scores, "masks": masks, "nan_guard": bool(guard)}


def _mask_step(node: gs.Node | None, ctx: _Context) -> tuple[gs.Tensor, dict] | None:
    """(the masked tensor, the mask) when ``node`` masks attention scores (see _match_softmax)."""
    if _is(node, "Add", "Sub"):
        orders = (node.inputs, node.inputs[::-1]) if node.op == "Add" else (node.inputs,)
        for scores, candidate in orders:
            if id(scores) in ctx.from_matmul and _is_mask(candidate, ctx, negated=node.op == "Sub"):
                return scores, {"form": node.op.lower(), "mask": candidate}
    if _is(node, "Where") and id(node.inputs[0]) not in ctx.from_matmul:
        condition, when_true, when_false = node.inputs
        for scores, fill, when in ((when_false, when_true, True), (when_true, when_false, False)):
            value = _scalar(fill)
            if id(scores) in ctx.from_matmul and value is not None and value <= _MASK_MAX_NEGATIVE:
                return scores, {"form": "fill", "mask": condition, "fill_value": value, "fill_when": when}
    clamped = _with_scalar(node, "Max")
    if clamped and id(clamped[0]) in ctx.from_matmul and clamped[1] <= _MASK_MAX_NEGATIVE:
        return clamped[0], {"form": "clamp", "value": clamped[1]}
    if (
        _is(node, "Reshape")
        and id(node.inputs[0]) in ctx.from_matmul
        and _last_dim(node.inputs[0]) is not None
        and _last_dim(node.inputs[0]) == _last_dim(node.outputs[0])
    ):
        return node.inputs[0], {"form": "reshape", "shape": node.inputs[1]}
    return None


def padding_mask_input(regions: list[Region]) -> str | None:
    """The graph input the softmax regions' masks are computed from, where there is exactly one and it is a
    [batch, seq] tensor of booleans or integers: a key-padding mask such as transformers' attention_mask,
    0 at padded positions. None where the masks read no input (causal or window masks alone), several, or
    a float one (an additive mask, whose zeros are the positions kept)."""
    sources: dict[str, gs.Variable] = {}
    seen: set[int] = set()
    pending = [m["mask"] for r in regions if r.kind == "softmax" for m in r.attrs["masks"] if "mask" in m]
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen or isinstance(tensor, gs.Constant):
            continue
        seen.add(id(tensor))
        if not tensor.inputs:
            sources[tensor.name] = tensor
        for node in tensor.inputs:
            # a mask sized from input_ids' shape does not depend on its values
            if node.op not in _SHAPE_OPS:
                pending.extend(node.inputs)
    if len(sources) != 1:
        return None
    (source,) = sources.values()
    dtype = np.dtype(source.dtype) if source.dtype is not None else None
    if dtype is None or dtype.kind not in "biu" or source.shape is None or len(source.shape) != 2:
        return None
    return source.name


def _last_dim(tensor: gs.Tensor) -> int | None:
    last = tensor.shape[-1] if tensor.shape else None
    return last if isinstance(last, int) else None


def _is_mask(tensor: gs.Tensor, ctx: _Context, negated: bool = False) -> bool:
    value = _const(tensor)
    if value is None:
        return id(tensor) not in ctx.from_matmul
    masked = (-value if negated else value) <= _MASK_MAX_NEGATIVE
    return bool(masked.any() and np.all((value == 0) | masked))


def _nan_guard(softmax: gs.Node, ctx: _Context) -> list[gs.Node]:
    probs = softmax.outputs[0]
    if id(probs) in ctx.graph_outputs or len(probs.outputs) != 2:
        return []
    isnan = next((c for c in probs.outputs if c.op == "IsNaN"), None)
    where = ctx.sole_consumer(isnan.outputs[0]) if isnan else None
    if (
        isnan is None
        or not _is(where, "Where")
        or not _among(where, probs.outputs)
        or where.inputs[0] is not isnan.outputs[0]
        or _scalar(where.inputs[1]) != 0.0
        or where.inputs[2] is not probs
    ):
        return []
    return [isnan, where]


def _match_weight_matmul(node: gs.Node, ctx: _Context) -> Match:
    """MatMul or Gemm with one constant operand (or one computed from constants alone), with the bias: Gemm's C,
    or MatMul's Add(bias)."""
    if node.op not in ("MatMul", "Gemm"):
        return None
    a, b = node.inputs[0], node.inputs[1]
    consts = [_const(a) is not None or id(a) in ctx.input_free, _const(b) is not None or id(b) in ctx.input_free]
    if consts.count(True) != 1:
        return None
    index = consts.index(True)
    nodes, bias = [node], None
    if node.op == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = _const_tensor(node.inputs[2])
    else:
        add = ctx.sole_consumer(node.outputs[0])
        param = _other_input(add, node.outputs[0]) if _is(add, "Add") else None
        value = _const(param) if param is not None else None
        out_shape = node.outputs[0].shape
        if value is not None and value.ndim == 1 and out_shape is not None and list(value.shape) == out_shape[-1:]:
            nodes.append(add)
            bias = param
    return nodes, {"weight": node.inputs[index], "op": node.op, "weight_input_index": index, "bias": bias}


def _match_act_matmul(node: gs.Node, ctx: _Context) -> Match:
    """MatMul of two activations (Q @ K^T, P @ V); the K transpose stays outside the region."""
    if node.op != "MatMul" or any(_const(t) is not None or id(t) in ctx.input_free for t in node.inputs):
        return None
    return [node], {"transposed_b": _is_transposed(node.inputs[1])}


def _is_transposed(tensor: gs.Tensor) -> bool:
    """Whether `tensor` comes from a Transpose that swaps the order of the last two axes.

    Looks through scalar scaling (sdpa scales K^T by d^-1/4) and Reshapes that keep the last two
    dims (the dynamo exporter transposes K as Reshape -> Transpose(0,2,1) -> Reshape).
    """
    node = _producer(tensor)
    while node is not None:
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            return perm is not None and len(perm) >= 2 and perm[-2] > perm[-1]
        last_two = _last_two(node.outputs[0])
        if node.op == "Reshape" and last_two is not None and _last_two(node.inputs[0]) == last_two:
            source = node.inputs[0]
        else:
            scaled = _with_scalar(node, "Mul") or _with_scalar(node, "Div")
            if not scaled:
                return False
            source = scaled[0]
        node = _producer(source)
    return False


def _last_two(tensor: gs.Tensor) -> list | None:
    return list(tensor.shape[-2:]) if tensor.shape is not None and len(tensor.shape) >= 2 else None


def _match_residual_add(node: gs.Node, ctx: _Context) -> Match:
    """Add of two activations of equal shape (residual streams, embedding sums)."""
    if node.op != "Add" or any(_const(t) is not None for t in node.inputs):
        return None
    a, b = node.inputs
    if a.shape is not None and b.shape is not None and not _same_shape(a.shape, b.shape):
        return None
    return [node], {}


def _same_shape(a: list, b: list) -> bool:
    """Shapes that may be equal. A symbolic dim may equal anything but 1: shape inference names
    the dims it cannot relate (unk__N) after Reshapes of dynamic-shape graphs, while a static 1
    against a symbolic dim is a broadcast such as [1, seq, H] + [batch, seq, H]."""
    return len(a) == len(b) and all(
        x == y or (isinstance(x, str) and y != 1) or (isinstance(y, str) and x != 1) for x, y in zip(a, b)
    )


_MATCHERS: list[tuple[str, Callable[[gs.Node, _Context], Match]]] = [
    ("quantizer", _match_qdq),
    ("quantizer", _match_quantize_chain),
    ("attention", _match_attention),
    ("layernorm", _match_layernorm_op),
    ("layernorm", _match_layernorm_decomposed),
    ("layernorm", _match_rmsnorm_op),
    ("layernorm", _match_rmsnorm_decomposed),
    ("layernorm", _match_l2_normalize),
    ("gelu", _match_gelu_op),
    ("gelu", _match_gelu_erf),
    ("gelu", _match_gelu_tanh),
    ("gelu", _match_gelu_function),
    ("activation", _match_activation),
    ("softmax", _match_softmax),
    ("weight_matmul", _match_weight_matmul),
    ("act_matmul", _match_act_matmul),
    ("act_mul", _match_act_mul),
    ("residual_add", _match_residual_add),
]
