"""Bring the variants model hubs ship beside a float32 model.onnx back to the float32 model spikec converts.

Hugging Face Hub repos (optimum exports, transformers.js) publish, next to model.onnx, files a user may
have alone:

* float16/bfloat16 models (``onnxruntime.transformers.float16``, optimum's O4): every half-precision
  tensor, Cast target and value type is upcast to float32 (`upcast_half`). spikec's neurons and
  calibration are float32, and an upcast is exact, so the float32 model computes what the half model
  means without its rounding; it is the SNN's fidelity reference and its inputs and outputs are float32.
* weight-only and dynamically quantized models: onnxruntime's dynamic quantization
  (DynamicQuantizeLinear on the activation, MatMulInteger/ConvInteger, a Cast to float and a Mul by the
  product of the activation's and the weight's scales) and com.microsoft MatMulNBits (2-8-bit block
  weights) become a float MatMul/Conv with the dequantized weights: the stored integers minus their zero
  points times their scales, exactly (`dequantize_weights`). The dynamic quantization of the activations
  is dropped: a per-tensor range computed at run time spans the whole batch, which time steps folded
  into the batch would change, and spikec's own calibration takes its place.

Static QDQ models keep their QuantizeLinear/DequantizeLinear pairs (SpikeZIP-TF converts them as its
QANN; constant folding turns their weights' DequantizeLinear into float initializers); methods that
convert float models drop the activations' pairs (`drop_activation_quantizers`).

A form these rewrites do not recognize is refused with one line naming the node.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
from onnx_graphsurgeon.logger import G_LOGGER
from spikec.passes.builder import GraphBuilder, export_like
from spikec.passes.patterns import find_regions
from spikec.runtime.session import quiet_options

from spikec.errors import SpikecError

MS = "com.microsoft"
_HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_HALF_NAMES = ("float16", "bfloat16")
_INTEGER_OPS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}
# Quantized forms refused by name rather than left to fail later: weight-only ops without a rewrite here,
# onnxruntime's fusions of the dynamic form, and the static QOperator format.
_REFUSED = {
    (MS, "MatMulBnb4"),
    (MS, "GatherBlockQuantized"),
    (MS, "DynamicQuantizeMatMul"),
    (MS, "MatMulIntegerToFloat"),
    (MS, "QAttention"),
    (MS, "QGemm"),
    ("", "QLinearMatMul"),
    ("", "QLinearConv"),
}


class ImportNotice(UserWarning):
    """A model rewritten at import into the float32 model spikec converts (one line says what changed)."""


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` upcast and dequantized (`upcast_half`, `dequantize_weights`), with one notice line for each;
    `model` itself when there is nothing to rewrite (it is never modified)."""
    if not _needs_rewrite(model):
        return model
    # graphsurgeon says on stdout that it has no numpy bfloat16 and casts such values when they are read:
    # reading them as float32 is what the upcast does
    with G_LOGGER.suppress(G_LOGGER.CRITICAL):
        graph = gs.import_onnx(model)
        upcast = upcast_half(graph)
    rewritten = dequantize_weights(graph)
    graph.cleanup().toposort()
    if upcast:
        warnings.warn(
            f"{upcast} float16/bfloat16 tensors, types and casts upcast to float32: the SNN and the ANN its "
            f"fidelity is measured against are this float32 model, with float32 inputs and outputs",
            ImportNotice,
            stacklevel=2,
        )
    if rewritten:
        counts = ", ".join(f"{count} {op}" for op, count in sorted(rewritten.items()))
        dynamic = set(rewritten) & set(_INTEGER_OPS)
        warnings.warn(
            f"{counts} nodes rewritten into float MatMul/Conv on their dequantized weights"
            + ("; the activations' dynamic quantization is dropped (calibration replaces it)" if dynamic else "")
            + ": the SNN and the ANN its fidelity is measured against are this float model",
            ImportNotice,
            stacklevel=2,
        )
    return export_like(graph, model)


def _needs_rewrite(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return (
        any(t.data_type in _HALF for t in graph.initializer)
        or any(vi.type.tensor_type.elem_type in _HALF for vi in [*graph.input, *graph.output, *graph.value_info])
        or any(_half_attribute(n) or _quantized_op(n.domain, n.op_type) for n in graph.node)
    )


def _half_attribute(node: onnx.NodeProto) -> bool:
    return any(
        (a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in _HALF)
        or (a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _HALF)
        or a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for a in node.attribute
    )


def _quantized_op(domain: str | None, op: str) -> bool:
    default = domain in (None, "", "ai.onnx")
    return (
        (op in _INTEGER_OPS and default)
        or (domain == MS and op == "MatMulNBits")
        or (("" if default else domain), op) in _REFUSED
    )


# ----------------------------------------------------------------------------- float16 / bfloat16


def _is_half(dtype) -> bool:
    if isinstance(dtype, int):  # graphsurgeon's bfloat16: the ONNX type, numpy has none
        return dtype in _HALF
    return dtype is not None and np.dtype(dtype).name in _HALF_NAMES


def upcast_half(graph: gs.Graph) -> int:
    """Make every float16/bfloat16 constant, tensor type, Cast target and tensor attribute of ``graph`` (its
    subgraphs included) float32, in place; returns how many it changed."""
    changed = 0
    for tensor in graph.tensors().values():
        if _is_half(tensor.dtype):
            if isinstance(tensor, gs.Constant):
                tensor.values = np.asarray(tensor.values, np.float32)
            else:
                tensor.dtype = np.float32
            changed += 1
    for node in graph.nodes:
        for key, value in node.attrs.items():
            if key in ("to", "dtype") and isinstance(value, int) and value in _HALF:
                node.attrs[key] = onnx.TensorProto.FLOAT
                changed += 1
            elif isinstance(value, gs.Constant) and _is_half(value.dtype):
                value.values = np.asarray(value.values, np.float32)
                changed += 1
            elif isinstance(value, gs.Graph):
                changed += upcast_half(value)
            elif isinstance(value, list) and value and isinstance(value[0], gs.Graph):
                changed += sum(upcast_half(g) for g in value)
    return changed


# ----------------------------------------------------------------------------- quantized weights


def _refuse(node: gs.Node, reason: str) -> SpikecError:
    return SpikecError(f"node '{node.name}' ({node.domain or 'ai.onnx'} {node.op}): {reason}")


def _const(node: gs.Node, index: int, what: str) -> np.ndarray | None:
    """Input ``index`` of ``node`` as an array; None where it is left out; refused where it is not constant."""
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        return None
    tensor = node.inputs[index]
    if not isinstance(tensor, gs.Constant):
        raise _refuse(node, f"{what} '{tensor.name}' is computed, not stored: only stored weights can be dequantized")
    return np.asarray(tensor.values)


def _stored(node: gs.Node, index: int, what: str) -> np.ndarray:
    value = _const(node, index, what)
    if value is None:
        raise _refuse(node, f"its {what} input is left out")
    return value


def _sole_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    if len(tensor.outputs) != 1 or any(tensor is o for o in graph.outputs):
        return None
    return tensor.outputs[0]


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def dequantize_weights(graph: gs.Graph) -> dict[str, int]:
    """Rewrite, in place, every MatMulInteger/ConvInteger of onnxruntime's dynamic quantization and every
    MatMulNBits into its float op on the dequantized weights; returns how many of each op it rewrote.
    DynamicQuantizeLinear nodes are left to cleanup once nothing reads them; one still read is refused."""
    counts: dict[str, int] = {}
    for node in list(graph.nodes):
        if not _quantized_op(node.domain, node.op):
            continue
        if node.op not in _INTEGER_OPS and node.op != "MatMulNBits":
            raise _refuse(
                node,
                "this form of quantized weights is not supported (MatMulInteger/ConvInteger of onnxruntime's "
                "dynamic quantization, MatMulNBits and QDQ are): convert the float model or one of those files",
            )
        (_matmul_nbits if node.op == "MatMulNBits" else _integer_op)(graph, node)
        counts[node.op] = counts.get(node.op, 0) + 1
    graph.cleanup()
    for node in graph.nodes:
        if node.op == "DynamicQuantizeLinear":
            reader = node.outputs[0].outputs[0] if node.outputs[0].outputs else None
            raise _refuse(
                node,
                "a dynamically quantized activation read by "
                + (f"'{reader.name}' ({reader.op})" if reader is not None else "a graph output")
                + ", which spikec cannot dequantize: convert the float model the file was quantized from",
            )
    return counts


def _weight_name(node: gs.Node) -> str:
    # after the node's output, which is unique where its weight may be shared by several nodes
    return f"{node.outputs[0].name}_dequantized_weight"


def _integer_op(graph: gs.Graph, node: gs.Node) -> None:
    """DynamicQuantizeLinear(x) -> MatMulInteger/ConvInteger(x_q, W_q, x_zp, W_zp) -> Cast(float) ->
    Mul(x_scale * W_scale), as onnxruntime.quantization.quantize_dynamic writes it, becomes
    MatMul/Conv(x, (W_q - W_zp) * W_scale) writing the Mul's output."""
    form = (
        "is not onnxruntime's dynamic quantization (DynamicQuantizeLinear on the activation, the int32 result "
        "Cast to float and multiplied by the activation's and the weight's scales)"
    )
    quantize = _producer(node.inputs[0])
    if quantize is None or quantize.op != "DynamicQuantizeLinear" or node.inputs[0] is not quantize.outputs[0]:
        raise _refuse(node, form)
    if len(node.inputs) < 3 or node.inputs[2] is not quantize.outputs[2]:
        raise _refuse(node, form)
    cast = _sole_consumer(node.outputs[0], graph)
    if cast is None or cast.op != "Cast" or cast.attrs.get("to") != onnx.TensorProto.FLOAT:
        raise _refuse(node, form)
    scale_mul = _sole_consumer(cast.outputs[0], graph)
    if scale_mul is None or scale_mul.op != "Mul":
        raise _refuse(node, form)
    scales = scale_mul.inputs[1] if scale_mul.inputs[0] is cast.outputs[0] else scale_mul.inputs[0]
    product = _producer(scales)
    if product is None or product.op != "Mul" or quantize.outputs[1] not in product.inputs:
        raise _refuse(node, form)
    weight_scale = product.inputs[1] if product.inputs[0] is quantize.outputs[1] else product.inputs[0]
    if not isinstance(weight_scale, gs.Constant):
        raise _refuse(node, f"weight scale '{weight_scale.name}' is computed, not stored")
    weights = _stored(node, 1, "weight")
    zero = _const(node, 3, "weight zero point")
    scale = np.asarray(weight_scale.values, np.float32)
    values = weights.astype(np.float32) - (0 if zero is None else zero.astype(np.float32))
    if node.op == "ConvInteger":
        if scale.size != 1 or (zero is not None and zero.size != 1):
            raise _refuse(node, "per-channel ConvInteger weights are not supported")
    elif scale.ndim > 1 or (zero is not None and zero.ndim > 1):
        raise _refuse(node, "weight scales or zero points of rank above 1 are not supported")
    dequantized = values * scale.reshape(-1) if scale.ndim else values * scale
    float_op = _INTEGER_OPS[node.op]
    attrs = dict(node.attrs) if float_op == "Conv" else {}
    scale_mul.op, scale_mul.attrs = float_op, attrs
    scale_mul.inputs.clear()
    scale_mul.inputs.extend([quantize.inputs[0], gs.Constant(_weight_name(node), dequantized)])
    node.outputs.clear()


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values packed into the bytes of the last axis, lowest bits first."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def _matmul_nbits(graph: gs.Graph, node: gs.Node) -> None:
    """com.microsoft MatMulNBits(A, B, scales, zero_points, bias) with B [N, blocks, block bytes] becomes
    MatMul(A, W^T) (+ bias), W[n, k] = (q[n, k] - zero[n, block]) * scale[n, block], zero 2^(bits-1) where
    left out."""
    attrs = node.attrs
    n, k, bits, block = (attrs.get(name) for name in ("N", "K", "bits", "block_size"))
    if bits not in (2, 4, 8) or not n or not k or not block:
        raise _refuse(node, f"bits {bits} with N {n}, K {k}, block_size {block} is not supported")
    if len(node.inputs) > 4 and not node.inputs[4].is_empty():
        raise _refuse(node, "g_idx (act-order block indices) is not supported")
    packed = _stored(node, 1, "weight")
    scales = _stored(node, 2, "scales").astype(np.float32)
    zero = _const(node, 3, "zero points")
    bias = node.inputs[5] if len(node.inputs) > 5 and not node.inputs[5].is_empty() else None
    blocks = -(-k // block)
    if packed.dtype != np.uint8 or packed.size != n * blocks * block * bits // 8 or scales.size != n * blocks:
        raise _refuse(node, f"weight {packed.dtype} {list(packed.shape)} and scales {list(scales.shape)} do not fit "
                      f"N {n}, K {k}, bits {bits}, block_size {block}")  # fmt: skip
    levels = _unpack(packed.reshape(n, blocks * block * bits // 8), bits).reshape(n, blocks, block)
    if zero is None:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    elif zero.dtype == np.uint8:
        zeros = _unpack(zero.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    else:
        raise _refuse(node, f"{zero.dtype} zero points are not supported (uint8 packed ones are)")
    weight = (levels.astype(np.float32) - zeros[..., None]) * scales.reshape(n, blocks)[..., None]
    weight = np.ascontiguousarray(weight.reshape(n, blocks * block)[:, :k].T)
    out = node.outputs[0]
    b = GraphBuilder(graph, node.name)
    constant = gs.Constant(_weight_name(node), weight)
    if bias is None:
        b.op("MatMul", node.inputs[0], constant, out=out, name=f"{node.name}/MatMul")
    else:
        b.op("Add", b.op("MatMul", node.inputs[0], constant, name=f"{node.name}/MatMul"), bias, out=out)
    node.outputs.clear()


# ----------------------------------------------------------------------------- static QDQ activations


def float_model(qdq: onnx.ModelProto, method: str) -> onnx.ModelProto:
    """A static QDQ model as the float model it quantizes, for a method that converts float models, with one
    notice line: its activation quantizers dropped, its quantized constants folded. The methods that code
    values in spike rates or times build their own quantization of every activation; the QDQ pairs would
    split the regions they convert (a softmax from its guard) and stay float ops between neurons."""
    graph = gs.import_onnx(qdq)
    dropped = drop_activation_quantizers(graph, find_regions(graph))
    warnings.warn(
        f"{dropped} activation QuantizeLinear/DequantizeLinear pairs dropped: {method} converts float models; "
        f"the SNN and the ANN its fidelity is measured against are the model without them",
        ImportNotice,
        stacklevel=4,
    )
    return export_like(graph, qdq)


def drop_activation_quantizers(graph: gs.Graph, regions) -> int:
    """Bypass, in place, every activation quantizer region (a QuantizeLinear -> DequantizeLinear pair,
    passes/patterns.py) of ``graph``: its readers read the float activation it quantized. Returns how many."""
    quantizers = [r for r in regions if r.kind == "quantizer"]
    for region in quantizers:
        source, result = region.attrs["input"], region.nodes[-1].outputs[0]
        for reader in list(result.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is result:
                    reader.inputs[index] = source
        if any(result is o for o in graph.outputs):
            dequantize = region.nodes[-1]
            dequantize.op, dequantize.attrs = "Identity", {}
            dequantize.inputs.clear()
            dequantize.inputs.append(source)
    _fold_quantized_constants(graph)
    graph.cleanup().toposort()
    return len(quantizers)


def _fold_quantized_constants(graph: gs.Graph) -> None:
    """Make the QuantizeLinear/DequantizeLinear nodes that only read constants (the weights, and constants
    such as GELU's that the quantizer rounded) the constants they compute: graphsurgeon's folding leaves
    Q/DQ nodes alone, and a weight a node computes is an activation to the passes. onnxruntime evaluates
    them, so their values are its own."""
    known = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    folded = []
    for node in graph.toposort().nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear") and all(
            t.is_empty() or t.name in known for t in node.inputs
        ):
            folded.append(node)
            known.update(t.name for t in node.outputs)
    if not folded:
        return
    outputs = [t for node in folded for t in node.outputs]
    sub = gs.Graph(nodes=folded, inputs=[], outputs=outputs, opset=graph.opset, import_domains=graph.import_domains)
    model = gs.export_onnx(sub)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), quiet_options(), providers=["CPUExecutionProvider"]
    )
    values = session.run(None, {})
    for tensor, value in zip(outputs, values, strict=True):
        tensor.to_constant(value)
    for node in folded:
        node.outputs.clear()
