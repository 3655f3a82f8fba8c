"""Fine-tuning a QANN from its ONNX graph: SpikeZIP-TF's step 1 (LSQ quantization-aware training with
distillation) without the model's Python class.

The QANN that post-training quantization writes (passes/quantize.py) is interpreted op by op in PyTorch
(`GraphModule`): its float initializers become parameters, and every quantizer
clamp(floor(x/s + 1/2), low, high) * s stays the graph's own Div/Add/Floor/Clip/Mul, with Floor's gradient
passed straight through and s = exp(log s) a parameter: autograd then gives LSQ's step-size gradient, and
the log keeps s positive with steps relative to its size. The student learns to reproduce the float ANN's
outputs on the calibration data (no labels needed); the result is written back into the same graph, so
`compile --method spikezip` converts it as it converts the PTQ model.

torch is imported by this module only (spikec.finetune, the API, imports it on use): the rest of spikec runs without it.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from tqdm import tqdm

from spikec.errors import SpikecError
from spikec.passes.stats import check_positive_int
from spikec.refit import held_back_samples

SCALE_SUFFIX = ".quant_scale"
# The quantizer's other constants (0.5, the clamp bounds) are part of its definition, not parameters.
_FIXED_SUFFIXES = (".quant_half", ".quant_low", ".quant_high")
# Steps between measurements of the loss over the held-back samples (finetune keeps the best parameters
# measured): a measurement is one forward pass over them, small beside the training steps between two.
EVALUATE_EVERY = 200
# Checkpoints of another layout, measurement rule or fingerprint are refused, not resumed (3: the QANN's
# graph fingerprinted without its metadata, which records provenance, not what is trained).
CHECKPOINT_VERSION = 3


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ste_floor(x: torch.Tensor) -> torch.Tensor:
    """floor(x) forward, identity backward (the straight-through estimator of LSQ's rounding)."""
    return x + (torch.floor(x) - x).detach() if x.is_floating_point() else x


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _reshape(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = _ints(axes) if axes is not None else list(range(len(_ints(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    index: list[slice] = [slice(None)] * x.dim()
    for axis, start, end, step in zip(axes, _ints(starts), _ints(ends), steps, strict=True):
        if step < 0:
            raise NotImplementedError("Slice with negative steps")
        size = x.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return x[tuple(index)]


def _gather(x, indices, axis=0):
    axis = axis % x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _gather_elements(x, indices, axis=0):
    axis = axis % x.dim()
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def _split(x, split=None, axis=0, num_outputs=None, *, outputs: int):
    size = x.shape[axis]
    sizes = _ints(split) if split is not None else [-(-size // outputs)] * (outputs - 1)
    if split is None:
        sizes.append(size - sum(sizes))
    return tuple(torch.split(x, sizes, dim=axis))


def _pad(x, pads, value=None, axes=None, mode=b"constant"):
    pads = _ints(pads)
    rank = x.dim()
    axes = [a % rank for a in _ints(axes)] if axes is not None else list(range(rank))
    half = len(pads) // 2
    widths = [0] * (2 * rank)  # torch: the last axis first, (before, after) each
    for i, axis in enumerate(axes):
        widths[2 * (rank - 1 - axis)], widths[2 * (rank - 1 - axis) + 1] = pads[i], pads[half + i]
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return F.pad(x, widths, value=0.0 if value is None else float(value.item()))
    trimmed = widths[: 2 * (rank - 2)]  # torch pads the spatial axes only in reflect/replicate
    if any(widths[2 * (rank - 2) :]):
        raise NotImplementedError(f"Pad mode={mode} of the batch or channel axis")
    return F.pad(x, trimmed, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _gather_nd(x, indices, batch_dims=0):
    if batch_dims:
        raise NotImplementedError("GatherND with batch_dims")
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    flat = torch.where(flat < 0, flat + torch.tensor(x.shape[:depth]), flat)
    return x[tuple(flat.T)].reshape((*indices.shape[:-1], *x.shape[depth:]))


def _scatter_nd(x, indices, updates, reduction=b"none"):
    if reduction not in (b"none", "none"):
        raise NotImplementedError(f"ScatterND reduction={reduction!r}")
    depth = indices.shape[-1]
    out = x.clone()
    out[tuple(indices.reshape(-1, depth).T)] = updates.reshape(-1, *x.shape[depth:])
    return out


def _cumsum(x, axis, exclusive=0, reverse=0):
    axis = int(axis.reshape(-1)[0])
    y = x.flip(axis) if reverse else x
    y = torch.cumsum(y, axis) - (y if exclusive else 0)
    return y.flip(axis) if reverse else y


def _channels(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] parameter broadcast along axis 1 of ``x``."""
    return t.reshape(1, -1, *[1] * (x.dim() - 2))


def _normalize(x, mean, var, scale, bias, epsilon):
    return (x - mean) / torch.sqrt(var + epsilon) * _channels(scale, x) + _channels(bias, x)


def _batch_norm(x, scale, bias, mean, var, epsilon=1e-5, **_):
    return _normalize(x, _channels(mean, x), _channels(var, x), scale, bias, epsilon)


def _instance_norm(x, scale, bias, epsilon=1e-5):
    dims = tuple(range(2, x.dim()))
    return _normalize(x, x.mean(dims, keepdim=True), x.var(dims, keepdim=True, unbiased=False), scale, bias, epsilon)


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


def _conv(x, w, b=None, group=1, pads=None, strides=None, dilations=None, auto_pad=b"NOTSET", **_):
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv auto_pad={auto_pad}")
    n = w.dim() - 2
    pads = list(pads or [0] * 2 * n)
    if pads[:n] != pads[n:]:
        x, pads = F.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]), [0] * 2 * n
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(x, w, b, stride=strides or 1, padding=pads[:n], dilation=dilations or 1, groups=group)


def _layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, **_):
    shape = x.shape[axis % x.dim() :]
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), epsilon)


def _reduce(fn: Callable) -> Callable:
    def reduce(x, axes=None, keepdims=1, noop_with_empty_axes=0):
        dims = _ints(axes) if isinstance(axes, torch.Tensor) else list(axes) if axes is not None else []
        if not dims:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=dims, keepdim=bool(keepdims))

    return reduce


def _argmax(x, axis=0, keepdims=1, select_last_index=0):
    if not select_last_index:
        return torch.argmax(x, axis, keepdim=bool(keepdims))
    return x.shape[axis] - 1 - torch.argmax(x.flip(axis), axis, keepdim=bool(keepdims))


def _prod(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    for axis in sorted((d % x.dim() for d in dim), reverse=True):
        x = torch.prod(x, axis, keepdim=keepdim)
    return x


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT16: torch.float16,
}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


# Each op as torch computes it, with ONNX's input order and attribute names. What the transformers spikec
# converts use; others are refused by name.
_OPS: dict[str, Callable] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": lambda a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b,
    "Pow": torch.pow,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Erf": torch.erf,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": _ste_floor,
    "MatMul": torch.matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "Clip": lambda x, low=None, high=None: torch.clamp(x, low, high),
    # ties give the first operand the whole gradient, as Clip passes it at its bounds: a quantizer with
    # per-channel bounds (Max, Min) lands levels exactly on them, where torch.maximum would halve it
    "Max": lambda a, b: torch.where(a < b, b, a),
    "Min": lambda a, b: torch.where(a > b, b, a),
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "Not": torch.logical_not,
    "And": torch.logical_and,
    "Where": torch.where,
    "Identity": lambda x: x,
    "Softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "LayerNormalization": _layer_norm,
    "Reshape": _reshape,
    "Flatten": lambda x, axis=1: x.reshape(math.prod(x.shape[:axis]), -1),
    "Transpose": lambda x, perm=None: x.permute(*(perm if perm is not None else reversed(range(x.dim())))),
    "Unsqueeze": lambda x, axes: _unsqueeze(x, _ints(axes)),
    "Squeeze": lambda x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(_ints(axes))),
    "Concat": lambda *xs, axis: torch.cat(xs, axis),
    "Shape": lambda x, start=0, end=None: torch.tensor(list(x.shape)[start:end], dtype=torch.int64),
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "Split": _split,
    "Pad": _pad,
    "Tile": lambda x, repeats: x.repeat(*_ints(repeats)),
    "CumSum": _cumsum,
    "IsNaN": torch.isnan,
    "IsInf": lambda x, detect_negative=1, detect_positive=1: (
        (torch.isneginf(x) & bool(detect_negative)) | (torch.isposinf(x) & bool(detect_positive))
    ),
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Log": torch.log,
    "Sign": torch.sign,
    "Ceil": torch.ceil,
    "Round": torch.round,  # halves to even, as ONNX
    "Mod": lambda a, b, fmod=0: torch.fmod(a, b) if fmod else torch.remainder(a, b),
    "Gelu": lambda x, approximate=b"none": F.gelu(
        x, approximate=approximate.decode() if isinstance(approximate, bytes) else approximate
    ),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0.0, 1.0),
    "HardSwish": F.hardswish,
    "Softplus": F.softplus,
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "GlobalAveragePool": lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True),
    "ArgMax": _argmax,
    "ReduceMin": _reduce(torch.amin),
    "ReduceProd": _reduce(_prod),
    "Trilu": lambda x, k=None, upper=1: (torch.triu if upper else torch.tril)(x, 0 if k is None else int(k.item())),
    "Slice": _slice,
    "Expand": lambda x, shape: torch.broadcast_to(x, torch.broadcast_shapes(x.shape, tuple(_ints(shape)))),
    "Cast": lambda x, to: x.to(_DTYPES[to]),
    "ConstantOfShape": lambda shape, value=None: torch.full(
        _ints(shape),
        0.0 if value is None else numpy_helper.to_array(value).item(),
        dtype=torch.float32 if value is None else _DTYPES[value.data_type],
    ),
    "Range": lambda start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)),
}


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint ``finetune`` wrote, refused in one line where unreadable or of another version (compile's
    finetune reads it before quantizing too: a wrong file is said at once, not after minutes)."""
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SpikecError(f"argument checkpoint: {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise SpikecError(f"argument checkpoint: {path} was written by an older spikec; start without it")
    return state


def check_torch_forms(model: onnx.ModelProto) -> None:
    """Refuse, by node, a model with an op torch cannot run here (``_OPS``): before the quantizing that
    precedes training, not after it."""
    for node in model.graph.node:
        if node.op_type != "Constant" and node.op_type not in _OPS:
            raise SpikecError(f"node '{node.name}': op {node.op_type} has no torch form for fine-tuning")


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _key(name: str) -> str:
    """A parameter name torch accepts (no dots), kept distinct for distinct ONNX names."""
    return "p" + hashlib.sha1(name.encode()).hexdigest()[:16]


class GraphModule(torch.nn.Module):
    """An ONNX graph as a torch module: float initializers of more than one value and every quantizer scale
    are parameters (the scales as their logs), the rest constants. ``forward`` takes the graph's inputs by
    name and returns its outputs in order."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        self.model = model
        self.constants: dict[str, torch.Tensor] = {}
        self.trainable: dict[str, str] = {}  # ONNX initializer name -> parameter key
        self.params = torch.nn.ParameterDict()
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if init.name.endswith(SCALE_SUFFIX):
                self.params[_key(init.name)] = torch.nn.Parameter(torch.log(_tensor(array)))
                self.trainable[init.name] = _key(init.name)
            elif array.dtype == np.float32 and array.size > 1 and not init.name.endswith(_FIXED_SUFFIXES):
                self.params[_key(init.name)] = torch.nn.Parameter(_tensor(array))
                self.trainable[init.name] = _key(init.name)
            else:
                self.constants[init.name] = _tensor(array)
        check_torch_forms(model)
        self.nodes = list(graph.node)
        # QDrop: each quantizer's output (its Mul by the scale) may be replaced by the quantizer's float input
        # (the Div's dividend: after the zero point's Sub where there is one, so both sides live on one grid)
        dividends = {
            n.input[1]: n.input[0] for n in self.nodes if n.op_type == "Div" and n.input[1].endswith(SCALE_SUFFIX)
        }
        self.float_inputs = {
            n.output[0]: dividends[n.input[1]]
            for n in self.nodes
            if n.op_type == "Mul" and len(n.input) == 2 and n.input[1] in dividends
        }
        self.qdrop = 0.0
        self.input_names = [
            i.name for i in graph.input if i.name not in self.constants and i.name not in self.trainable
        ]
        self.output_names = [o.name for o in graph.output]

    def value(self, name: str) -> torch.Tensor:
        """An initializer's current value as the graph uses it (a scale, not its log)."""
        key = self.trainable.get(name)
        if key is None:
            return self.constants[name]
        param = self.params[key]
        return torch.exp(param) if name.endswith(SCALE_SUFFIX) else param

    def forward(self, feeds: Mapping[str, torch.Tensor], extra: Sequence[str] = ()) -> list[torch.Tensor]:
        """The graph's outputs, then the tensors named in ``extra``. In training mode with ``qdrop`` > 0, each
        element of a quantizer's output is its float input instead with probability ``qdrop`` (QDrop)."""
        drop = self.qdrop if self.training else 0.0
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update({name: self.value(name) for name in self.trainable})
        env.update(feeds)
        for node in self.nodes:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                env[node.output[0]] = _tensor(numpy_helper.to_array(attrs["value"]))
                continue
            args = [env[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            if node.op_type == "Split":  # equal parts: as many as the node has outputs
                attrs["outputs"] = len(node.output)
            try:
                out = _OPS[node.op_type](*args, **attrs)
            except (RuntimeError, NotImplementedError, TypeError, IndexError) as e:
                raise SpikecError(f"node '{node.name}' ({node.op_type}): {str(e).splitlines()[0]}") from None
            outs = out if isinstance(out, tuple) else (out,)
            env.update(zip(node.output, outs, strict=False))
            source = self.float_inputs.get(node.output[0]) if drop else None
            if source is not None:
                keep = torch.rand_like(out) >= drop
                env[node.output[0]] = torch.where(keep, out, env[source])
        return [env[name] for name in [*self.output_names, *extra]]

    def export(self) -> onnx.ModelProto:
        """The graph with its initializers replaced by the trained values."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        with torch.no_grad():
            for init in model.graph.initializer:
                if init.name in self.trainable:
                    array = self.value(init.name).detach().numpy().astype(np.float32)
                    init.CopyFrom(numpy_helper.from_array(array, init.name))
        return model


def _torch_feeds(feeds: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(array[index])) for name, array in feeds.items()}


def relative_errors(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mean squared error per tensor, relative to the teacher's mean square (scale-free)."""
    return [
        torch.mean(torch.square(s - t)) / torch.mean(torch.square(t)).clamp_min(1e-12)
        for s, t in zip(student, teacher, strict=True)
    ]


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The relative errors of the outputs, summed."""
    return sum(relative_errors(student, teacher), torch.tensor(0.0))


def training_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], outputs: int, hidden_weight: float
) -> torch.Tensor:
    """The distillation loss of the first ``outputs`` tensors plus ``hidden_weight`` times the mean relative
    error of the rest (the hidden states: each layer gets its own target, as TernaryBERT's distillation
    does, so an early layer's error is corrected where it arises rather than through every layer after it)."""
    errors = relative_errors(student, teacher)
    loss = sum(errors[:outputs], torch.tensor(0.0))
    if len(errors) > outputs:
        loss = loss + hidden_weight * sum(errors[outputs:]) / (len(errors) - outputs)
    return loss


def hidden_states(model: onnx.ModelProto) -> list[str]:
    """The tensors that intermediate distillation matches: the output of every normalization (LayerNorm,
    RMSNorm) that is no graph output. In a post-LN transformer (BERT) these are the residual stream after
    each attention and MLP block; in a pre-LN one, each block's normalized input."""
    from spikec.graphinfo import nonlinear_regions

    outputs = {o.name for o in model.graph.output}
    return [
        name
        for region in nonlinear_regions(model)
        if region["kind"] == "layernorm"
        for name in region["outputs"]
        if name not in outputs
    ]


def evaluate_loss(
    module: GraphModule, feeds: Mapping[str, np.ndarray], targets: Sequence[np.ndarray], batch_size: int
) -> float:
    """The distillation loss over the samples given (batch-weighted mean), without QDrop."""
    module.eval()
    samples = len(next(iter(feeds.values())))
    total = 0.0
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            index = slice(start, start + batch_size)
            out = module(_torch_feeds(feeds, index))
            total += float(distillation_loss(out, [torch.from_numpy(t[index]) for t in targets])) * len(
                targets[0][index]
            )
    return total / samples


def _fingerprint(qann: onnx.ModelProto, feeds: Mapping[str, np.ndarray], settings: Mapping[str, object]) -> str:
    """What a checkpoint must match to resume: the starting QANN's graph, the data and the loss's settings."""
    h = hashlib.sha256(qann.graph.SerializeToString(deterministic=True))
    h.update(repr(sorted(settings.items())).encode())
    for name in sorted(feeds):
        h.update(name.encode())
        h.update(np.ascontiguousarray(feeds[name]).tobytes())
    return h.hexdigest()


def check_training_arguments(
    *,
    steps: int,
    batch_size: int,
    evaluate_every: int = EVALUATE_EVERY,
    lr: float,
    scale_lr: float,
    time_budget: float | None,
    hidden_weight: float,
    qdrop: float,
) -> None:
    """finetune's arguments, refused in one line before any work (spikec finetune quantizes first)."""
    for argument, count in (("steps", steps), ("batch_size", batch_size), ("evaluate_every", evaluate_every)):
        check_positive_int(count, argument)
    for argument, value in (("lr", lr), ("scale_lr", scale_lr), ("time_budget", time_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SpikecError(f"argument {argument}={value!r}: expected a finite number > 0")
    if not 0.0 <= qdrop < 1.0:
        raise SpikecError(f"argument qdrop: {qdrop} is no probability in [0, 1)")
    if hidden_weight < 0 or not math.isfinite(hidden_weight):
        raise SpikecError(f"argument hidden_weight: {hidden_weight} is not a finite weight >= 0")


def finetune(
    qann: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    steps: int,
    hidden: Mapping[str, np.ndarray] | None = None,
    hidden_weight: float = 1.0,
    qdrop: float = 0.0,
    time_budget: float | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    scale_lr: float = 1e-3,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    evaluate_every: int = EVALUATE_EVERY,
) -> tuple[onnx.ModelProto, dict]:
    """Train ``qann``'s weights and quantizer scales to reproduce ``targets`` (the float ANN's outputs on
    ``feeds``) for ``steps`` Adam steps or ``time_budget`` seconds, whichever ends first; resumes from
    ``checkpoint`` where it holds a run of the same QANN, data and settings, and saves to it every minute and
    at the end. ``hidden`` maps tensor names of the QANN to the float ANN's values there (see hidden_states):
    their mean relative error joins the loss with weight ``hidden_weight``. ``qdrop`` > 0 trains with QDrop
    (each quantizer's output element replaced by its float input with that probability; the QANN written is
    unchanged in structure). Every fifth sample (refit.held_back_samples) is held back from training, and
    every ``evaluate_every`` steps and at the end the output distillation loss over those is measured; the
    parameters of the lowest one so far (the start included) are what is returned: training that diverges
    (it can, from a QANN whose scales sit far from a minimum), overfits the samples it sees or ends worse
    than it started never hands back a worse QANN. With fewer than five samples nothing is held back and
    the loss is measured on all of them. Returns that QANN and a summary: the measured loss before and of
    the QANN returned, the samples it was measured on ("measured_on": "held-back" or "training") and their
    count, the steps run and the step whose parameters were kept."""
    check_training_arguments(
        steps=steps,
        batch_size=batch_size,
        evaluate_every=evaluate_every,
        lr=lr,
        scale_lr=scale_lr,
        time_budget=time_budget,
        hidden_weight=hidden_weight,
        qdrop=qdrop,
    )
    hidden = dict(hidden or {})
    torch.manual_seed(seed)
    module = GraphModule(qann)
    module.qdrop = qdrop
    known = {t for n in qann.graph.node for t in n.output}
    missing = [name for name in hidden if name not in known]
    if missing:
        raise SpikecError(f"hidden state '{missing[0]}' is no tensor of the QANN")
    scales = [module.params[k] for n, k in module.trainable.items() if n.endswith(SCALE_SUFFIX)]
    others = [module.params[k] for n, k in module.trainable.items() if not n.endswith(SCALE_SUFFIX)]
    optimizer = torch.optim.Adam([{"params": others, "lr": lr}, {"params": scales, "lr": scale_lr}])
    fingerprint = _fingerprint(
        qann, feeds, {"hidden": sorted(hidden), "hidden_weight": hidden_weight if hidden else 0.0, "qdrop": qdrop}
    )
    samples = len(targets[0])
    held_back = held_back_samples(samples)
    training = np.flatnonzero(~held_back)
    if not held_back.any():  # too few samples to hold any back: measure the ones trained on
        held_back = np.ones(samples, bool)
    measured_feeds = {name: array[held_back] for name, array in feeds.items()}
    measured_targets = [t[held_back] for t in targets]
    step = 0
    loss_before = None
    best: dict = {}  # the lowest loss measured so far: "loss", "step", "params"
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = read_checkpoint(path)
        if state.get("fingerprint") != fingerprint:
            raise SpikecError(f"argument checkpoint: {path} is from another model, level count or data set")
        module.params.load_state_dict(state["params"])
        optimizer.load_state_dict(state["optimizer"])
        step, loss_before, best = state["step"], state["loss_before"], state["best"]
    if loss_before is None:
        loss_before = evaluate_loss(module, measured_feeds, measured_targets, batch_size)
        best = {"loss": loss_before, "step": 0, "params": _copy(module.params.state_dict())}

    def measure() -> None:
        loss = evaluate_loss(module, measured_feeds, measured_targets, batch_size)
        if loss < best["loss"]:
            best.update(loss=loss, step=step, params=_copy(module.params.state_dict()))

    batches = -(-len(training) // batch_size)  # per pass over the data, each pass in its own order
    torch_targets = [torch.from_numpy(t) for t in [*targets, *hidden.values()]]
    extra = list(hidden)

    def save() -> None:
        if path is None:
            return
        temporary = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "version": CHECKPOINT_VERSION,
                "fingerprint": fingerprint,
                "params": module.params.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "loss_before": loss_before,
                "best": best,
            },
            temporary,
        )
        os.replace(temporary, path)

    start = last_save = time.monotonic()
    with tqdm(total=steps, initial=step, desc="fine-tuning", unit="step", disable=None if progress else True) as bar:
        while step < steps and (time_budget is None or time.monotonic() - start < time_budget):
            epoch, batch = divmod(step, batches)
            order = np.random.default_rng([seed, epoch]).permutation(len(training))
            index = np.sort(training[order[batch * batch_size : (batch + 1) * batch_size]])
            module.train()
            student = module(_torch_feeds(feeds, index), extra)
            loss = training_loss(student, [t[index] for t in torch_targets], len(targets), hidden_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
            if step % evaluate_every == 0:
                measure()
            if time.monotonic() - last_save > 60:
                save()
                last_save = time.monotonic()
    if step != best["step"] and step % evaluate_every:
        measure()
    save()
    module.params.load_state_dict(best["params"])
    # the start itself where no step did better (the module's log scales would round some scales by an ulp)
    tuned = module.export() if best["step"] else onnx.ModelProto.FromString(qann.SerializeToString())
    return tuned, {
        "steps": step,
        "loss_before": loss_before,
        "loss_after": best["loss"],
        "measured_on": "training" if len(training) == samples else "held-back",
        "measured_samples": int(held_back.sum()),
        "kept_step": best["step"],
    }


def _copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}
