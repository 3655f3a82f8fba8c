"""The spikec ops against independent numpy references written from the paper's equations."""
import numpy as np
import onnx
import pytest

from op_models import one_node_model
from spikec.runtime import InferenceSession
from spikec.runtime import ops

T, B, C = 6, 3, 5


def _session(op_type: str, params: dict[str, np.ndarray], **attrs) -> InferenceSession:
    model = one_node_model(op_type, params, C, **attrs)
    onnx.checker.check_model(model, full_check=True)
    return InferenceSession(model)


def mt_reference(x_steps, theta_pos, theta_neg, levels):
    """Eq. 19-25: levels lambda = +theta_pos*2^k, -theta_neg*2^k; the level fired is the one whose
    [lambda_k - lambda_1/2, lambda_(k+1) - lambda_1/2) interval holds the membrane; soft reset."""
    v = np.zeros(x_steps.shape[1:], np.float64)
    codes = []
    for x in x_steps:
        m = v + x
        fired = np.zeros_like(m)
        for k in range(levels):
            lo = theta_pos * (2 ** k) - theta_pos / 2
            hi = theta_pos * (2 ** (k + 1)) - theta_pos / 2 if k < levels - 1 else np.inf
            fired = np.where((m >= lo) & (m < hi), theta_pos * 2 ** k, fired)
            nlo = -theta_neg * (2 ** k) + theta_neg / 2
            nhi = -theta_neg * (2 ** (k + 1)) + theta_neg / 2 if k < levels - 1 else -np.inf
            fired = np.where((m < nlo) & (m >= nhi), -theta_neg * 2 ** k, fired)
        v = m - fired
        codes.append(fired / theta_pos)
    return np.stack(codes)


@pytest.mark.parametrize("per_channel", [False, True])
def test_mt_neuron_matches_equations(per_channel):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((T, B, C)) * 4).astype(np.float32)
    x[0, 0, 0] = 1000.0  # beyond the top level: clipped at 2^(n-1), the rest stays in v
    theta_pos = (rng.uniform(0.2, 1.0, C) if per_channel else np.array(0.5)).astype(np.float32)
    theta_neg = (rng.uniform(0.2, 1.0, C) if per_channel else np.array(0.3)).astype(np.float32)
    session = _session("MTNeuron", {"theta_pos": theta_pos, "theta_neg": theta_neg},
                       levels=4, timesteps=T)
    got = session.run(None, {"x": x.reshape(T * B, C)})[0].reshape(T, B, C)
    want = mt_reference(x.astype(np.float64), theta_pos, theta_neg, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0, 0, 0] == 8.0
    # at most one spike per step: every code is 0 or one level
    levels = np.concatenate([[0], 2.0 ** np.arange(4)])
    pos = got >= 0
    assert np.all(np.isin(got[pos], levels))


def test_mt_neuron_rate_approaches_input():
    """A constant input is reproduced by the mean spike value; the error |v_T|/T shrinks with T."""
    x = np.linspace(-3, 3, B * C, dtype=np.float32).reshape(B, C)
    theta = np.array(0.25, np.float32)
    errors = []
    for steps in (2, 16):
        session = _session("MTNeuron", {"theta_pos": theta, "theta_neg": theta},
                           levels=8, timesteps=steps)
        codes = session.run(None, {"x": np.tile(x, (steps, 1))})[0].reshape(steps, B, C)
        errors.append(np.max(np.abs(codes.mean(0) * theta - x)))
    assert errors[1] <= theta / 2
    assert errors[1] < errors[0] / 4


def test_expectation_compensation_recovers_function_of_mean():
    """ECAccumulate -> F -> ECCompensate: the running mean of the output is F(running mean of the input)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, C)).astype(np.float32)
    acc = _session("ECAccumulate", {}, timesteps=T)
    comp = _session("ECCompensate", {}, timesteps=T)
    means = acc.run(None, {"x": x.reshape(T * B, C)})[0].reshape(T, B, C)
    np.testing.assert_allclose(means, np.cumsum(x, 0) / np.arange(1, T + 1)[:, None, None], rtol=1e-6, atol=1e-6)
    f = np.tanh(means)
    out = comp.run(None, {"y": f.reshape(T * B, C)})[0].reshape(T, B, C)
    t = np.arange(1, T + 1)[:, None, None]
    np.testing.assert_allclose(np.cumsum(out, 0) / t, f, atol=1e-5)


@pytest.mark.parametrize("name", list(ops.OPS))
def test_step_form_equals_unrolled(name):
    op = ops.OPS[name]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, B, C)).astype(np.float32) * 2
    params = {p: np.float32(0.4 + 0.1 * i) * np.ones((), np.float32) for i, p in enumerate(op.params)}
    attrs = {a: 8 for a in op.attributes}
    data = op.inputs[0]
    unrolled = _session(op.name, params, timesteps=T, **attrs)
    want = unrolled.run(None, {data: x.reshape(T * B, C)})[0].reshape(T, B, C)
    step = _session(op.step_name, params, **attrs)
    states = {s: np.zeros((1, 1), np.float32) for s in op.states}
    for t in range(T):
        values = step.run(None, {data: x[t], "t": np.array(t + 1, np.float32), **states})
        np.testing.assert_array_equal(values[0], want[t])
        states = dict(zip(op.states, values[1:]))


def test_mt_neuron_level_boundaries_follow_eq25():
    """At lambda_k - lambda_1/2 exactly the positive side fires level k; the negative side's bounds are strict."""
    theta = 0.5
    bounds = theta * (2.0 ** np.arange(4) - 0.5)
    x = np.concatenate([bounds, -bounds, bounds - 1e-3, [0.0]]).astype(np.float32)
    x = np.pad(x, (0, (-len(x)) % C)).reshape(-1, C)
    session = _session("MTNeuron", {"theta_pos": np.array(theta, np.float32),
                                                       "theta_neg": np.array(theta, np.float32)},
                       levels=4, timesteps=1)
    got = session.run(None, {"x": x})[0].ravel()[:13]
    np.testing.assert_array_equal(got[:4], [1, 2, 4, 8])
    np.testing.assert_array_equal(got[4:8], [0, -1, -2, -4])
    np.testing.assert_array_equal(got[8:12], [0, 1, 2, 4])
    assert got[12] == 0
    np.testing.assert_array_equal(got, mt_reference(x[None].astype(np.float64), theta, theta, 4).ravel()[:13])
