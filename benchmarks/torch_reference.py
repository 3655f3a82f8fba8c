"""A PyTorch step-by-step simulator of a spikec SNN, for benchmarks only (not a library feature).

The papers' code simulates an SNN as a Python loop over time steps that calls the whole network once
per step, with neuron and compensation modules keeping their state between calls, in eager PyTorch.
This simulator runs that loop over the *stateful* spikec model of the same SNN: every ONNX node
becomes the eager torch call a hand-written module would make (one kernel per op, Python between
them), and the spikec step ops become the neuron/EC updates written in torch. So it does the work of
the papers' loop on the same network, with the same numbers, and its result can be checked against
onnxruntime's.

    simulator = TorchStepSimulator(onnx.load("snn_stateful.onnx"))
    outputs = simulator.run({"pixels": images}, timesteps=8)   # {"logits": [B, 10], "logits.steps": [T, B, 10]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

STATE_PREFIX, NEXT_STATE_PREFIX, TIME_INPUT, STEPS_SUFFIX = "spikec.state.", "spikec.next_state.", "spikec.t", ".steps"

_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 11: torch.float64}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _slice(data, starts, ends, axes=None, steps=None):
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    index = [slice(None)] * data.dim()
    for axis, start, end, step in zip(axes, _ints(starts), _ints(ends), steps):
        size = data.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        if step < 0:
            raise NotImplementedError("negative Slice steps")
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


def _reshape(data, shape):
    dims = [data.shape[i] if d == 0 else d for i, d in enumerate(_ints(shape))]
    return data.reshape(dims)


def _reduce(op: Callable, data, axes, keepdims, noop_with_empty_axes=0):
    if axes is None or len(axes) == 0:
        if noop_with_empty_axes:
            return data
        axes = list(range(data.dim()))
    return op(data, dim=[int(a) for a in axes], keepdim=bool(keepdims))


def _div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _mt_step(x, v, theta_pos, theta_neg, t, levels):
    """runtime/ops.py's MTNeuron step: the largest power of two p <= |m|/theta + 1/2 (p < on the negative
    side), capped at 2^(levels-1), nothing when p < 1; soft reset; the code in units of theta_pos."""
    membrane = v + x
    positive = membrane >= 0
    theta = torch.where(positive, theta_pos, theta_neg)
    ratio = membrane.abs() / theta + 0.5
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    power = torch.ldexp(torch.ones_like(ratio), exponent - 1)
    power = torch.where(~positive & (mantissa == 0.5), power / 2, power)
    level = torch.where(
        (ratio >= 1) & (power >= 1), torch.clamp(power, max=2.0 ** (levels - 1)), torch.zeros_like(ratio)
    )
    emitted = torch.where(positive, level, -level) * theta
    return emitted / theta_pos, membrane - emitted


def _count_per_row(spike):
    """runtime/ops.py's count output: |spikes| summed per row of the leading axis."""
    return spike.abs().reshape(spike.shape[0], -1).sum(1)


def _stbif_step(x, v, tracer, theta, s_min, s_max, t):
    membrane = v + x
    half = theta * 0.5
    spike = ((membrane >= half) & (tracer < s_max)).float() - ((membrane < -half) & (tracer > s_min)).float()
    return spike, membrane - spike * theta, tracer + spike, _count_per_row(spike)


def _stbif_integer_step(y, tracer, theta, s_min, s_max, t, burst, half_even):
    """runtime/ops.py's STBIFIntegerNeuron step: the membrane is the level less the tracer."""
    scaled = y / theta
    rounded = torch.round(scaled) if half_even else torch.floor(scaled + 0.5)  # torch.round: half to even
    spike = torch.clamp(torch.minimum(torch.maximum(rounded, s_min), s_max) - tracer, -burst, burst)
    return spike, tracer + spike, _count_per_row(spike)


def _if_count(drive, v, emitted, signed, burst, negated=False):
    """runtime/ops.py's IF neuron in units of its spike value theta/burst: the spikes fired, an integer."""
    membrane = v - drive if negated else v + drive
    reach = torch.maximum(membrane, -(signed * emitted))
    spikes = torch.trunc(torch.clamp(reach, -burst, burst))
    return spikes, membrane - spikes, emitted + spikes


def _if_step(x, v, emitted, theta, t, signed, burst, negated=False):
    spikes, v, emitted = _if_count(x * (burst / theta), v, emitted, signed, burst, negated)
    return spikes * (theta / burst), v, emitted


def _weight(t, average):
    return average * t + (1 - average)


def _spikec(op: str, attrs: dict, args: list):
    if op == "MTNeuronStep":
        x, v, theta_pos, theta_neg, t = args
        return _mt_step(x, v, theta_pos, theta_neg, t, attrs["levels"])
    if op == "STBIFNeuronStep":
        return _stbif_step(*args)
    if op == "STBIFIntegerNeuronStep":
        return _stbif_integer_step(*args, float(attrs["burst"]), bool(attrs["half_even"]))
    if op == "IFNeuronStep":
        return _if_step(*args, float(attrs["signed"]), float(attrs["burst"]))
    if op == "X2XEncoderStep":
        x, v_pos, emitted_pos, v_neg, emitted_neg, theta_pos, theta_neg, t = args
        signed, burst = float(attrs["signed"]), float(attrs["burst"])
        positive, v_pos, emitted_pos = _if_step(x, v_pos, emitted_pos, theta_pos, t, signed, burst)
        negative, v_neg, emitted_neg = _if_step(x, v_neg, emitted_neg, theta_neg, t, signed, burst, negated=True)
        return positive - negative, v_pos, emitted_pos, v_neg, emitted_neg
    if op == "UGOStep":  # the reference code's UGO module: a Linear expansion, IF neurons, a Linear sum
        x, v, emitted, w1, b1, theta, w2, b2, t = args
        signed, burst = float(attrs["signed"]), float(attrs["burst"])
        w1, b1, theta, w2 = (p.reshape(-1, *[1] * x.dim()) for p in (w1, b1, theta, w2))  # states [N, *x.shape]
        drive = x.unsqueeze(0) * (w1 * (burst / theta)) + b1 * (burst / theta)
        spikes, v, emitted = _if_count(drive, v, emitted, signed, burst)
        return (spikes * (w2 * (theta / burst))).sum(0) + b2, v, emitted
    if op == "ECAccumulateStep":
        x, total, t = args
        total = total + x
        return total / _weight(t, attrs["average"]), total
    if op == "ECCompensateStep":
        y, previous, t = args
        weighted = _weight(t, attrs["average"]) * y
        return weighted - previous, weighted
    raise NotImplementedError(f"spikec op {op}")


def _conv(x, w, b=None, *, strides=None, pads=None, dilations=None, group=1, **_):
    rank = w.dim() - 2
    pads = pads or [0] * (2 * rank)
    if pads[:rank] != pads[rank:]:
        raise NotImplementedError("asymmetric Conv pads")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(x, w, b, stride=strides or 1, padding=pads[:rank], dilation=dilations or 1, groups=group)


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    out = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return out if c is None else out + beta * c


def _layernorm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, **_):
    axis = axis % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


_OPS: dict[str, Callable] = {
    "Abs": lambda a, x: x.abs(),
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: _div(x, y),
    "Pow": lambda a, x, y: torch.pow(x, y),
    "Sqrt": lambda a, x: torch.sqrt(x),
    "Erf": lambda a, x: torch.erf(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "Neg": lambda a, x: -x,
    "And": lambda a, x, y: x & y,
    "Equal": lambda a, x, y: x == y,
    "Greater": lambda a, x, y: x > y,
    "GreaterOrEqual": lambda a, x, y: x >= y,
    "Less": lambda a, x, y: x < y,
    "Where": lambda a, c, x, y: torch.where(c, x, y),
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Gemm": lambda a, *xs: _gemm(*xs, **a),
    "Conv": lambda a, *xs: _conv(*xs, **a),
    "Softmax": lambda a, x: torch.softmax(x, dim=a.get("axis", -1)),
    "LayerNormalization": lambda a, *xs: _layernorm(*xs, **a),
    "Clip": lambda a, x, lo=None, hi=None: torch.clamp(x, lo, hi),
    "Cast": lambda a, x: x.to(_DTYPES[a["to"]]),
    "Identity": lambda a, x: x,
    "Shape": lambda a, x: torch.tensor(x.shape, dtype=torch.int64),
    "Reshape": lambda a, x, shape: _reshape(x, shape),
    "Transpose": lambda a, x: x.permute(*(a.get("perm") or reversed(range(x.dim())))),
    "Unsqueeze": lambda a, x, axes: _unsqueeze(x, _ints(axes)),
    "Squeeze": lambda a, x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(_ints(axes))),
    "Flatten": lambda a, x: x.reshape(math.prod(x.shape[: a.get("axis", 1)]), -1),
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Gather": lambda a, x, i: _gather(x, i, a.get("axis", 0) % x.dim()),
    "Slice": lambda a, x, *rest: _slice(x, *rest),
    "Expand": lambda a, x, shape: x * torch.ones(_ints(shape), dtype=x.dtype),
    "ConstantOfShape": lambda a, shape: torch.full(
        _ints(shape),
        numpy_helper.to_array(a["value"]).item() if "value" in a else 0.0,
        dtype=_DTYPES[a["value"].data_type] if "value" in a else torch.float32,
    ),
    "Range": lambda a, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),
    "ReduceSum": lambda a, x, axes=None: _reduce(
        torch.sum, x, None if axes is None else _ints(axes), a.get("keepdims", 1), a.get("noop_with_empty_axes", 0)
    ),
    "ReduceMean": lambda a, x, axes=None: _reduce(
        torch.mean, x, a.get("axes", None if axes is None else _ints(axes)), a.get("keepdims", 1)
    ),
    "ReduceL2": lambda a, x, axes=None: torch.sqrt(
        _reduce(torch.sum, x * x, a.get("axes", None if axes is None else _ints(axes)), a.get("keepdims", 1))
    ),
    "Sum": lambda a, *xs: sum(xs[1:], xs[0]),
}


def _gather(x, indices, axis):
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = torch.index_select(x, axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))


def _unsqueeze(x, axes):
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return x


class TorchStepSimulator:
    """Eager PyTorch per-step execution of a stateful spikec model (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        if not any(i.name == TIME_INPUT for i in graph.input):
            raise ValueError("expected a stateful spikec model (compile with mode='stateful')")
        self.constants = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
        self.nodes = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                self.constants[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
                continue
            run = (
                (lambda a, *xs, op=node.op_type: _spikec(op, a, list(xs)))
                if node.domain == "spikec"
                else _OPS[node.op_type]
            )
            self.nodes.append((run, attrs, list(node.input), list(node.output)))
        self.states = {
            i.name: len(i.type.tensor_type.shape.dim) for i in graph.input if i.name.startswith(STATE_PREFIX)
        }
        self.outputs = [o.name for o in graph.output if not o.name.startswith(NEXT_STATE_PREFIX)]

    @torch.inference_mode()
    def run(self, feeds: Mapping[str, np.ndarray], timesteps: int) -> dict[str, np.ndarray]:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        states = {name: torch.zeros([1] * rank) for name, rank in self.states.items()}
        history: dict[str, list[torch.Tensor]] = {name: [] for name in self.outputs}
        for t in range(1, timesteps + 1):
            env = {**self.constants, **inputs, **states, TIME_INPUT: torch.tensor(float(t)), "": None}
            for run, attrs, names_in, names_out in self.nodes:
                result = run(attrs, *[env[n] for n in names_in])
                if isinstance(result, tuple):
                    env.update(zip(names_out, result))
                else:
                    env[names_out[0]] = result
            for name in self.outputs:
                history[name].append(env[name])
            states = {name: env[NEXT_STATE_PREFIX + name[len(STATE_PREFIX) :]] for name in states}
        result = {}
        for name, steps in history.items():
            result[name] = steps[-1].numpy()
            result[name + STEPS_SUFFIX] = torch.stack(steps).numpy()
        return result
