"""TTFS coding (TTFSFormer, seed 003): the one place that defines what its spiking ops compute.

A TTFS layer n receives spikes during its receiving window and emits at most one spike per neuron in
its emitting window [T_emit, T_emit + delta). Tensors between layers hold spike times relative to the
emitting window of their layer, ``u = t - T_emit`` in [0, delta]; a value x in the layer's range [a, b]
is the spike time ``x * tau = T_ref - t`` with ``tau = delta / (b - a)`` and ``T_ref = T_emit + b * tau``
(appendix A.1), so ``u = tau * (b - x)``. ``u = delta`` means no spike: the value a.

A neuron is two stages, each a family of ops:

* **receiving** (``TTFSReceive<F>``): an input spike at u starts the kernel eta(s) = f'(s/tau + a) in the
  potential's slope (Theorem 4.1); integrated to the end of the window, plus the constant C = w f(a)/d,
  each synapse contributes w * f(x). The op gives f(x) per input; the weighted sum is the ordinary
  linear op that follows it (MatMul, Add, ReduceSum...), so C never appears separately.
* **emitting** (``TTFSEmit<H>``): from T_emit the potential V rises with slope psi(s) =
  1 / (tau h'(h^-1(b - s/tau))) towards theta = h^-1(b) (Theorem 4.3); the crossing time is
  u = tau * (b - clip(h(V), a, b)): a value above b fires at once, one below a never fires.

The simulation is analytic, as the paper's: spike times pass between layers as floats. ``TTFSTick``
models a clocked simulator of time precision p = delta / tick: a spike is registered at the first tick
at or after its crossing, so its time errs by less than one tick (the robustness study of Fig. 4).

Every transform is given twice, by design: ``value`` (the ONNX closed form the op computes) and
``kernel`` / ``slope_at_inverse`` (the dynamics, in numpy, that ``simulate`` integrates). Their agreement
is the theorem, and tests/test_ttfs.py checks it for every transform over its whole input range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper
from spikec.runtime.ops import DOMAIN, NodeBuilder


class Builder(Protocol):
    """What a transform builds its nodes with: runtime.ops.NodeBuilder for function bodies (tensors are
    names), the passes' GraphBuilder for graphsurgeon graphs (tensors are gs tensors)."""

    def op(self, op_type: str, *inputs: Any, **attrs: Any) -> Any: ...

    def const(self, value: Any, dtype: Any = ...) -> Any: ...


# (builder, x, params) -> f(x) as ONNX nodes
ValueFn = Callable[[Builder, Any, list], Any]


@dataclass(frozen=True)
class ReceiveTransform:
    """An input transform: the synapse contributes w * f(x)."""

    name: str
    summary: str
    value: ValueFn  # f(x) as ONNX nodes; params are extra scalar inputs
    kernel: Callable[[np.ndarray, list[float]], np.ndarray]  # eta as a function of s/tau + a, i.e. f'
    params: tuple[str, ...] = ()

    @property
    def op_type(self) -> str:
        return f"TTFSReceive{self.name}"


@dataclass(frozen=True)
class EmitTransform:
    """An output transform: the spike represents clip(h(V), a, b)."""

    name: str
    summary: str
    value: ValueFn  # h(V) as ONNX nodes
    inverse: Callable[[np.ndarray], np.ndarray]  # h^-1 (theta = h^-1(b))
    slope_at_inverse: Callable[[np.ndarray], np.ndarray]  # y -> h'(h^-1(y)); psi(s) = 1/(tau * this(b - s/tau))

    @property
    def op_type(self) -> str:
        return f"TTFSEmit{self.name}"


def _gelu(b, x, params):
    # x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))
    erf = b.op("Erf", b.op("Mul", x, b.const(1.0 / np.sqrt(2.0))))
    return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", erf, b.const(1.0)))


_TANH_C = np.sqrt(2.0 / np.pi)


def _gelu_tanh(b, x, params):
    cube = b.op("Mul", b.op("Mul", x, x), x)
    inner = b.op("Mul", b.op("Add", x, b.op("Mul", cube, b.const(0.044715))), b.const(_TANH_C))
    return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", b.op("Tanh", inner), b.const(1.0)))


def _gelu_tanh_kernel(u, params):
    inner = _TANH_C * (u + 0.044715 * u**3)
    tanh = np.tanh(inner)
    return 0.5 * (1 + tanh) + 0.5 * u * (1 - tanh**2) * _TANH_C * (1 + 3 * 0.044715 * u**2)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


RECEIVE = {
    t.name: t
    for t in (
        ReceiveTransform(
            "Identity",
            "x (Corollary 4.2: a Heaviside kernel)",
            lambda b, x, p: b.op("Identity", x),
            lambda u, p: np.ones_like(u),
        ),
        ReceiveTransform("Relu", "max(x, 0)", lambda b, x, p: b.op("Relu", x), lambda u, p: (u > 0).astype(u.dtype)),
        ReceiveTransform(
            "Gelu",
            "x Phi(x), the erf form (Corollary 4.5)",
            _gelu,
            lambda u, p: 0.5 * (1 + _erf(u / np.sqrt(2))) + u * np.exp(-(u**2) / 2) / np.sqrt(2 * np.pi),
        ),
        ReceiveTransform("GeluTanh", "the tanh approximation of GELU", _gelu_tanh, _gelu_tanh_kernel),
        ReceiveTransform(
            "Silu",
            "x sigmoid(x) (Corollary 4.5, Eq. 16)",
            lambda b, x, p: b.op("Mul", x, b.op("Sigmoid", x)),
            lambda u, p: _sigmoid(u) * (u + 1 - u * _sigmoid(u)),
        ),
        ReceiveTransform(
            "Tanh", "tanh(x) (a pooler's activation)", lambda b, x, p: b.op("Tanh", x), lambda u, p: 1 - np.tanh(u) ** 2
        ),
        ReceiveTransform(
            "Sigmoid", "sigmoid(x)", lambda b, x, p: b.op("Sigmoid", x), lambda u, p: _sigmoid(u) * (1 - _sigmoid(u))
        ),
        ReceiveTransform(
            "Exp", "e^x (Theorem 4.6; product layer II, Eq. 26)", lambda b, x, p: b.op("Exp", x), lambda u, p: np.exp(u)
        ),
        ReceiveTransform(
            "Square", "x^2 (the variance neuron, Eq. 22)", lambda b, x, p: b.op("Mul", x, x), lambda u, p: 2 * u
        ),
        # Eq. 23 prints eta = +1/2 (s/tau + a)^(-3/2): the derivative of (x + eps)^(-1/2) is negative and
        # eps belongs inside, as C = 1/(d sqrt(a + eps)) already has it. Re-derived from Theorem 4.1:
        ReceiveTransform(
            "Rsqrt",
            "(x + epsilon)^(-1/2) (the LayerNorm rsqrt neuron, Eq. 23 corrected)",
            lambda b, x, p: b.op("Reciprocal", b.op("Sqrt", b.op("Add", x, p[0]))),
            lambda u, p: -0.5 * (u + p[0]) ** -1.5,
            ("epsilon",),
        ),
        ReceiveTransform(
            "Log",
            "log(x + c) (product layer I, Eq. 24)",
            lambda b, x, p: b.op("Log", b.op("Add", x, p[0])),
            lambda u, p: 1.0 / (u + p[0]),
            ("offset",),
        ),
    )
}

EMIT = {
    t.name: t
    for t in (
        EmitTransform(
            "Identity",
            "clip(V, a, b) (Corollary 4.4: psi = 1/tau, theta = b)",
            lambda b, v, p: b.op("Identity", v),
            lambda y: y,
            lambda y: np.ones_like(y),
        ),
        EmitTransform(
            "Log",
            "clip(log V, a, b) (the log-sum-exp neuron, Theorem 4.6)",
            lambda b, v, p: b.op("Log", v),
            np.exp,
            lambda y: np.exp(-y),
        ),
        EmitTransform(
            "Exp",
            "clip(e^V, a, b) (the softmax output layer, Eq. 36)",
            lambda b, v, p: b.op("Exp", v),
            np.log,
            lambda y: y,
        ),
    )
}

# Scalar inputs every TTFS neuron op takes after its data input: the layer's range and window length.
RANGE_INPUTS = ("lower", "upper", "delta")


def _tau(b: NodeBuilder) -> str:
    return b.op("Div", "delta", b.op("Sub", "upper", "lower"))


def receive_function(transform: ReceiveTransform, opset: int) -> onnx.FunctionProto:
    """u -> f(b - u/tau)."""
    b = NodeBuilder()
    value = b.op("Sub", "upper", b.op("Div", "u", _tau(b)))
    b.nodes.append(helper.make_node("Identity", [transform.value(b, value, list(transform.params))], ["y"]))
    return helper.make_function(
        DOMAIN,
        transform.op_type,
        ["u", *RANGE_INPUTS, *transform.params],
        ["y"],
        b.nodes,
        [helper.make_opsetid("", opset)],
    )


def emit_function(transform: EmitTransform, opset: int) -> onnx.FunctionProto:
    """V -> u = tau (b - clip(h(V), a, b)): the exact crossing time."""
    b = NodeBuilder()
    represented = b.op("Max", b.op("Min", transform.value(b, "v", []), "upper"), "lower")
    b.nodes.append(helper.make_node("Mul", [_tau(b), b.op("Sub", "upper", represented)], ["u"]))
    return helper.make_function(
        DOMAIN, transform.op_type, ["v", *RANGE_INPUTS], ["u"], b.nodes, [helper.make_opsetid("", opset)]
    )


TICK_OP = "TTFSTick"


def tick_function(opset: int) -> onnx.FunctionProto:
    """u -> the first clock tick at or after u, ticks of ``tick`` = delta / p: a clocked neuron registers its
    crossing there, so the spike time errs by less than one tick (time precision p, Fig. 4)."""
    b = NodeBuilder()
    ticked = b.op("Mul", b.op("Ceil", b.op("Div", "u", "tick")), "tick")
    b.nodes.append(helper.make_node("Min", [ticked, "delta"], ["y"]))
    return helper.make_function(
        DOMAIN, TICK_OP, ["u", "delta", "tick"], ["y"], b.nodes, [helper.make_opsetid("", opset)]
    )


def functions_for(op_types: set[str], opset: int) -> list[onnx.FunctionProto]:
    result = [receive_function(t, opset) for t in RECEIVE.values() if t.op_type in op_types]
    result += [emit_function(t, opset) for t in EMIT.values() if t.op_type in op_types]
    return result + ([tick_function(opset)] if TICK_OP in op_types else [])


# ---------------------------------------------------------------- reference dynamics


@dataclass(frozen=True)
class Window:
    """A layer's range and window: value x <-> relative spike time u = tau (b - x)."""

    lower: float
    upper: float
    delta: float = 1.0

    @property
    def tau(self) -> float:
        return self.delta / (self.upper - self.lower)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.tau * (self.upper - np.clip(x, self.lower, self.upper))

    def decode(self, u: np.ndarray) -> np.ndarray:
        return self.upper - u / self.tau


def simulate(
    spike_times: np.ndarray,
    weights: np.ndarray,
    inputs: Window,
    receive: str | ReceiveTransform,
    emit: str,
    output: Window,
    constant: float,
    params: tuple[float, ...] = (),
    steps: int = 20000,
) -> np.ndarray:
    """Integrate Eq. 6 by the midpoint rule: one neuron per row of ``spike_times`` [neurons, synapses]
    (relative to the inputs' emitting window, which is this layer's receiving window), with ``weights``
    [synapses]. Receiving: dV/dt = (1/tau_in) (sum_j w_j eta(t - t_j) + C); ``constant`` is what C
    integrates to over the window, d_in * C = sum_j w_j f(a_in). Emitting: dV/dt = psi(t - T_emit) until
    V >= theta. Returns the relative output spike times (delta when the neuron never fires). For tests and
    documentation: the ops compute the same in closed form."""
    transform, out = RECEIVE[receive] if isinstance(receive, str) else receive, EMIT[emit]
    values = list(params)
    dt = inputs.delta / steps
    potential = np.full(spike_times.shape[0], float(constant))
    for k in range(steps):
        elapsed = (k + 0.5) * dt - spike_times
        eta = np.where(elapsed >= 0, transform.kernel(np.maximum(elapsed, 0) / inputs.tau + inputs.lower, values), 0.0)
        potential += dt / inputs.tau * (eta @ weights)
    theta = out.inverse(np.asarray(output.upper, np.float64))
    fired = np.where(potential >= theta, 0.0, np.nan)
    dt = output.delta / steps
    for k in range(steps):
        psi = 1.0 / (output.tau * out.slope_at_inverse(np.asarray(output.upper - (k + 0.5) * dt / output.tau)))
        potential = potential + dt * psi
        fired = np.where(np.isnan(fired) & (potential >= theta), (k + 1) * dt, fired)
    return np.where(np.isnan(fired), output.delta, fired)
