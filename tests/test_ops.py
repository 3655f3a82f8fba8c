"""The spikec ops against independent numpy references written from the paper's equations."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from op_models import example_attributes, example_params, initial_states, one_node_model
from spikec.runtime import InferenceSession, ops

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
            lo = theta_pos * (2**k) - theta_pos / 2
            hi = theta_pos * (2 ** (k + 1)) - theta_pos / 2 if k < levels - 1 else np.inf
            fired = np.where((m >= lo) & (m < hi), theta_pos * 2**k, fired)
            nlo = -theta_neg * (2**k) + theta_neg / 2
            nhi = -theta_neg * (2 ** (k + 1)) + theta_neg / 2 if k < levels - 1 else -np.inf
            fired = np.where((m < nlo) & (m >= nhi), -theta_neg * 2**k, fired)
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
    session = _session("MTNeuron", {"theta_pos": theta_pos, "theta_neg": theta_neg}, levels=4, timesteps=T)
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
        session = _session("MTNeuron", {"theta_pos": theta, "theta_neg": theta}, levels=8, timesteps=steps)
        codes = session.run(None, {"x": np.tile(x, (steps, 1))})[0].reshape(steps, B, C)
        errors.append(np.max(np.abs(codes.mean(0) * theta - x)))
    assert errors[1] <= theta / 2
    assert errors[1] < errors[0] / 4


def test_expectation_compensation_recovers_function_of_mean():
    """ECAccumulate -> F -> ECCompensate: the running mean of the output is F(running mean of the input)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, C)).astype(np.float32)
    acc = _session("ECAccumulate", {}, timesteps=T, average=1)
    comp = _session("ECCompensate", {}, timesteps=T, average=1)
    means = acc.run(None, {"x": x.reshape(T * B, C)})[0].reshape(T, B, C)
    np.testing.assert_allclose(means, np.cumsum(x, 0) / np.arange(1, T + 1)[:, None, None], rtol=1e-6, atol=1e-6)
    f = np.tanh(means)
    out = comp.run(None, {"y": f.reshape(T * B, C)})[0].reshape(T, B, C)
    t = np.arange(1, T + 1)[:, None, None]
    np.testing.assert_allclose(np.cumsum(out, 0) / t, f, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "flip"), [(n, False) for n in ops.OPS] + [(n, True) for n, op in ops.OPS.items() if op.specialized]
)
def test_step_form_equals_unrolled(name, flip):
    """The unrolled function (a Scan of the step, or the op's over_time form) against the Step form run
    step by step; ``flip``: the other value of the attribute the op is specialized on."""
    op = ops.OPS[name]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, B, C)).astype(np.float32) * 2
    x[:, 0, 0] = -0.0  # a running sum of only -0: -0 unrolled (CumSum), +0 stepped from a zero state
    params = example_params(op, rng, C, per_channel=False)
    attrs = example_attributes(op)
    if flip:
        attrs[op.specialized] = 1 - attrs[op.specialized]
    data = op.inputs[0]
    unrolled = _session(op.name, params, timesteps=T, **attrs)
    want = unrolled.run(None, {data: x.reshape(T * B, C)})[0].reshape(T, B, C)
    step = _session(op.step_name, params, **attrs)
    states = initial_states(op)
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
    session = _session(
        "MTNeuron",
        {"theta_pos": np.array(theta, np.float32), "theta_neg": np.array(theta, np.float32)},
        levels=4,
        timesteps=1,
    )
    got = session.run(None, {"x": x})[0].ravel()[:13]
    np.testing.assert_array_equal(got[:4], [1, 2, 4, 8])
    np.testing.assert_array_equal(got[4:8], [0, -1, -2, -4])
    np.testing.assert_array_equal(got[8:12], [0, 1, 2, 4])
    assert got[12] == 0
    np.testing.assert_array_equal(got, mt_reference(x[None].astype(np.float64), theta, theta, 4).ravel()[:13])


def stbif_reference(x_steps, theta, s_min, s_max):
    """Eq. 1 as printed, with V_0 = theta/2: V_t = V_(t-1) + x_t - theta*spike, S_t = S_(t-1) + spike,
    spike = 1 if V >= theta and S < S_max, -1 if V < 0 and S > S_min."""
    v = np.full(x_steps.shape[1:], theta / 2, np.float64)
    tracer = np.zeros_like(v)
    spikes = []
    for x in x_steps:
        m = v + x
        spike = np.where((m >= theta) & (tracer < s_max), 1.0, np.where((m < 0) & (tracer > s_min), -1.0, 0.0))
        v, tracer = m - spike * theta, tracer + spike
        spikes.append(spike)
    return np.stack(spikes)


@pytest.mark.parametrize("per_channel", [False, True])
def test_stbif_neuron_matches_eq1_and_ends_at_the_quantizer(per_channel):
    """Input charge spread over the first steps, then silence: every step follows Eq. 1, at most one spike
    of +-1 fires per step, and once quiet the spike count equals clamp(round(sum x / theta), s_min, s_max)."""
    rng = np.random.default_rng(7)
    steps, levels = 40, 8
    theta = (rng.uniform(0.2, 1.0, C) if per_channel else np.array(0.37)).astype(np.float32)
    s_min, s_max = np.float32(-levels), np.float32(levels - 1)
    x = np.zeros((steps, B, C), np.float32)
    x[:4] = rng.standard_normal((4, B, C)).astype(np.float32) * 2.5  # beyond the clamp range in places
    session = _session("STBIFNeuron", {"theta": theta, "s_min": s_min, "s_max": s_max}, timesteps=steps)
    got = session.run(None, {"x": x.reshape(steps * B, C)})[0].reshape(steps, B, C)
    np.testing.assert_array_equal(got, stbif_reference(x.astype(np.float64), theta.astype(np.float64), s_min, s_max))
    assert np.isin(got, [-1.0, 0.0, 1.0]).all()
    quantized = np.clip(np.floor(x.sum(0, dtype=np.float64) / theta + 0.5), s_min, s_max)
    np.testing.assert_array_equal(got.sum(0), quantized)
    assert not got[4 + 2 * levels :].any()  # quiet well before the end: the count is final
    assert (got.sum(0) == s_max).any() and (got.sum(0) == s_min).any()  # both clamps were exercised


def test_sum_compensation_recovers_function_of_sum():
    """average=0 (sum semantics, SpikeZIP-TF Eq. 5): ECAccumulate gives running sums, ECCompensate the
    differences F(S(t)) - F(S(t-1)), whose sum over steps is F of the summed input."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((T, B, C)).astype(np.float32)
    totals = _session("ECAccumulate", {}, timesteps=T, average=0).run(None, {"x": x.reshape(T * B, C)})[0]
    np.testing.assert_allclose(totals.reshape(T, B, C), np.cumsum(x, 0), rtol=1e-6, atol=1e-6)
    f = np.tanh(totals)
    out = _session("ECCompensate", {}, timesteps=T, average=0).run(None, {"y": f})[0].reshape(T, B, C)
    np.testing.assert_allclose(np.cumsum(out, 0), f.reshape(T, B, C), atol=1e-6)


def test_tcsa_is_the_expectation_compensated_product():
    """STA's temporal-corrective product (Def. 3, Eq. 9) is ECMT's matrix-product EC: ECAccumulate
    (average=1) on both operands, the product, ECCompensate (average=1). Its running mean is the estimate
    Psi(t) = A_hat(t) B_hat(t) at every t, so the mean over T is the product of the rate-coded matrices,
    and each step equals Eq. 9's closed form in spike counts. The naive split (Def. 2) is the same
    with sums (average=0) and a 1/T weight: the same mean, but outputs growing with t (Sec. 5.2)."""
    rng = np.random.default_rng(9)
    steps, m, k, n = 16, 3, 4, 5
    va, vb = np.float32(0.7), np.float32(1.3)
    a_spikes = (rng.random((steps, m, k)) < rng.random((m, k))).astype(np.float32)
    b_spikes = (rng.random((steps, k, n)) < rng.random((k, n))).astype(np.float32)

    def scan(op, x, average):
        session = InferenceSession(one_node_model(op, {}, x.shape[2], timesteps=steps, average=average))
        feeds = {ops.op_for(op).inputs[0]: x.reshape(steps * x.shape[1], x.shape[2])}
        return session.run(None, feeds)[0].reshape(x.shape)

    a_hat, b_hat = scan("ECAccumulate", va * a_spikes, 1), scan("ECAccumulate", vb * b_spikes, 1)
    psi = a_hat @ b_hat
    q = scan("ECCompensate", psi, 1)
    t = np.arange(1, steps + 1)[:, None, None]
    np.testing.assert_allclose(np.cumsum(q, 0) / t, psi, rtol=1e-5, atol=1e-5)
    rate_product = (va * a_spikes.mean(0)) @ (vb * b_spikes.mean(0))
    np.testing.assert_allclose(q.mean(0), rate_product, rtol=1e-5, atol=1e-5)
    # Eq. 9 in spike counts: Q(t) = va vb / t [Phi(t-1)/(1-t) + phi(t)], Phi(t) = sum_i A_s(i) sum_j B_s(j)
    counts_a, counts_b = np.cumsum(a_spikes, 0), np.cumsum(b_spikes, 0)
    phi_total = counts_a @ counts_b
    previous = np.concatenate([np.zeros_like(phi_total[:1]), phi_total[:-1]])
    increment = phi_total - previous
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = va * vb / t * (np.where(t > 1, previous / (1 - t), 0.0) + increment)
    np.testing.assert_allclose(q, closed, rtol=1e-4, atol=1e-5)

    sums_a, sums_b = scan("ECAccumulate", va * a_spikes, 0), scan("ECAccumulate", vb * b_spikes, 0)
    naive = scan("ECCompensate", sums_a @ sums_b, 0) / steps
    np.testing.assert_allclose(naive.mean(0), rate_product, rtol=1e-5, atol=1e-5)
    assert np.abs(naive[-4:]).mean() > 2 * np.abs(naive[:4]).mean()  # uneven: grows like 2t-1 terms
    assert np.abs(q[-4:]).mean() < 2 * np.abs(q[:4]).mean()


def if_reference(x_steps, theta, signed, burst):
    """STA's reference-code neuron (SpikeLinear_ReLU): v0 = 0; mem += x; r = max(mem, -emitted) when
    signed else max(mem, 0); n = clamp(floor(|r| / (rho*theta)) * sign(r), +-burst), rho = 1/burst;
    emit n*rho*theta; soft reset."""
    v = np.zeros(x_steps.shape[1:])
    emitted = np.zeros_like(v)
    out = []
    for x in x_steps:
        m = v + x
        r = np.maximum(m, -emitted if signed else 0.0)
        n = np.clip(np.floor(np.abs(r) / (theta / burst)) * np.sign(r), -burst, burst)
        spike = n * theta / burst
        v, emitted = m - spike, emitted + spike
        out.append(spike)
    return np.stack(out)


@pytest.mark.parametrize("signed,burst", [(0, 1), (1, 1), (1, 2), (0, 2)])
def test_if_neuron_matches_the_reference_rules(signed, burst):
    rng = np.random.default_rng(10)
    steps = 24
    theta = rng.uniform(0.3, 1.0, C).astype(np.float32)
    x = (rng.standard_normal((steps, B, C)) * 0.6 + 0.2).astype(np.float32)
    session = _session("IFNeuron", {"theta": theta}, timesteps=steps, signed=signed, burst=burst)
    got = session.run(None, {"x": x.reshape(steps * B, C)})[0].reshape(steps, B, C)
    np.testing.assert_allclose(
        got, if_reference(x.astype(np.float64), theta.astype(np.float64), signed, burst), atol=1e-6
    )
    assert (np.abs(got) <= theta + 1e-6).all()  # at most theta per step, burst or not
    totals = np.cumsum(got, 0)
    assert (totals >= -1e-6).all()  # memory: never below zero in total
    if not signed:
        assert (got >= 0).all()
    else:
        assert (got < 0).any()  # negative spikes do fire, to take back earlier positive ones
    # the rate follows relu of the mean input (clamped at theta per step) up to the residual membrane
    error = np.abs(got.mean(0) - np.clip(x.mean(0), 0, theta))
    assert (error <= 3 * theta / steps).all()


def test_x2x_encoder_is_if_neurons_on_x_and_minus_x():
    """X2X = IF(x) - IF(-x) (if_reference on each side, thresholds of their own); its rate follows x,
    negative means included."""
    rng = np.random.default_rng(12)
    steps = 32
    theta_pos, theta_neg = (rng.uniform(0.5, 1.0, C).astype(np.float32) for _ in range(2))
    x = (rng.standard_normal((steps, B, C)) * 0.3 + rng.uniform(-0.4, 0.4, (1, B, C))).astype(np.float32)
    session = _session(
        "X2XEncoder", {"theta_pos": theta_pos, "theta_neg": theta_neg}, timesteps=steps, signed=1, burst=2
    )
    got = session.run(None, {"x": x.reshape(steps * B, C)})[0].reshape(steps, B, C)
    want = if_reference(x.astype(np.float64), theta_pos.astype(np.float64), 1, 2) - if_reference(
        -x.astype(np.float64), theta_neg.astype(np.float64), 1, 2
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got < 0).any() and (got > 0).any()
    error = np.abs(got.mean(0) - x.mean(0))
    assert (error <= 3 * np.maximum(theta_pos, theta_neg) / steps).all()


def test_ugo_is_if_neurons_on_the_hidden_layer():
    """UGO = w2 . IF(w1 x + b1) + b2 per element (if_reference on the hidden currents), and with the
    GELU operator's weights its rate approaches the operator's ReLU network on a constant input."""
    from spikec import ugo as ugos

    operator = ugos.load("gelu")
    steps = 64
    theta = np.maximum(operator.thresholds(), 1e-3).astype(np.float32)
    params = {
        "w1": operator.w1.astype(np.float32),
        "b1": operator.b1.astype(np.float32),
        "theta": theta,
        "w2": operator.w2.astype(np.float32),
        "b2": np.array(operator.b2, np.float32),
    }
    x = np.linspace(-2.5, 2.5, B * C, dtype=np.float32).reshape(B, C)
    session = _session("UGO", params, timesteps=steps, signed=1, burst=2)
    got = session.run(None, {"x": np.tile(x, (steps, 1))})[0].reshape(steps, B, C)
    current = x.astype(np.float64)[..., None] * params["w1"] + params["b1"]
    spikes = if_reference(np.broadcast_to(current, (steps, *current.shape)), theta.astype(np.float64), 1, 2)
    np.testing.assert_allclose(got, spikes @ params["w2"] + params["b2"], atol=1e-5)
    # the rate is the ReLU network's output up to each hidden neuron's residual membrane (< theta) / T
    bound = np.abs(params["w2"]) @ theta / steps
    error = np.abs(got.mean(0) - operator(x))
    assert error.max() <= bound and error.max() > bound / 100


@pytest.mark.parametrize("native", [False, True], ids=["portable", "native"])
@pytest.mark.parametrize("name", [n for n, op in ops.OPS.items() if op.spike_count and not op.chain])
def test_spike_count_sums_spikes_per_leading_row(name, native):
    """The optional count output is |spikes| summed per row of the leading axis, in both forms; a node
    that does not ask for it gets the same spikes."""
    op = ops.OPS[name]
    rng = np.random.default_rng(7)
    params = example_params(op, rng, C, per_channel=True)
    attrs = example_attributes(op)
    x = (rng.standard_normal((T, B, C)) * 3).astype(np.float32)
    unrolled = one_node_model(op.name, params, C, timesteps=T, **attrs)
    spikes, count = InferenceSession(unrolled, native=native).run(None, {op.inputs[0]: x.reshape(T * B, C)})
    assert count.shape == (T * B,) and np.abs(spikes).sum() > T * B  # enough spikes to count
    np.testing.assert_array_equal(count, np.abs(spikes).sum(axis=1))
    unrolled.graph.node[0].output[-1] = ""  # not wanted (an ONNX function's node keeps all its outputs)
    unrolled.graph.output.pop()
    np.testing.assert_array_equal(
        InferenceSession(unrolled, native=native).run(None, {op.inputs[0]: x.reshape(T * B, C)})[0], spikes
    )
    step = InferenceSession(one_node_model(op.step_name, params, C, **attrs), native=native)
    states = initial_states(op)
    for t in range(T):
        values = step.run(None, {op.inputs[0]: x[t], "t": np.array(t + 1, np.float32), **states})
        np.testing.assert_array_equal(values[0], spikes[t * B : (t + 1) * B])
        np.testing.assert_array_equal(values[-1], count[t * B : (t + 1) * B])
        states = dict(zip(op.states, values[1:]))


@pytest.mark.parametrize("name", [n for n, op in ops.OPS.items() if op.hidden])
def test_blocks_of_rows_give_the_bits_of_one_block(name, monkeypatch):
    """An op with a hidden axis runs its elements in blocks (ops.BLOCK_ELEMENTS), the last zero-padded: the
    same bits as all rows at once, NaN and infinities included."""
    op = ops.OPS[name]
    rng = np.random.default_rng(11)
    params = example_params(op, rng, C, per_channel=True)
    rows = 7
    x = (rng.standard_normal((T, rows, C)) * 3).astype(np.float32)
    x[1, 2, :3] = [np.nan, np.inf, -np.inf]
    hidden = len(next(params[p] for p in op.hidden))
    results = []
    for block_elements in (2 * hidden * C, 2**40):  # 2 rows of elements per block: 4 blocks, 1 row padded; 1 block
        monkeypatch.setattr(ops, "BLOCK_ELEMENTS", block_elements)
        model = one_node_model(op.name, params, C, timesteps=T, **example_attributes(op))
        results.append(InferenceSession(model, native=False).run(None, {op.inputs[0]: x.reshape(T * rows, C)}))
    blocked, whole = results
    assert blocked[0].shape == (T * rows, C) and np.isnan(blocked[0]).any() and np.isfinite(blocked[0]).sum() > C
    for got, want in zip(blocked, whole):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", [n for n, op in ops.OPS.items() if not op.hidden and op.params])
def test_expanded_parameters_give_the_bits_of_broadcast_ones(name, monkeypatch):
    """Per-channel parameters of few channels are expanded to the step's shape before the time Scan
    (ops.EXPAND_BELOW_CHANNELS), what the step derives from them hoisted with them: the same bits as
    broadcasting them at every step, NaN and infinities included."""
    op = ops.OPS[name]
    rng = np.random.default_rng(13)
    params = example_params(op, rng, C, per_channel=True)
    x = (rng.standard_normal((T, B, C)) * 3).astype(np.float32)
    x[1, 2, :3] = [np.nan, np.inf, -np.inf]
    results = []
    for below in (C + 1, 0):  # expanded; broadcast
        monkeypatch.setattr(ops, "EXPAND_BELOW_CHANNELS", below)
        model = one_node_model(op.name, params, C, timesteps=T, **example_attributes(op))
        results.append(InferenceSession(model, native=False, fuse=False).run(None, {op.inputs[0]: x.reshape(T * B, C)}))
    expanded, broadcast = results
    assert np.count_nonzero(np.nan_to_num(expanded[0])) > C  # the op fires: the comparison is not of zeros
    for got, want in zip(expanded, broadcast):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("form", ["unrolled", "step"])
@pytest.mark.parametrize(
    ("op_type", "attribute", "value", "untaken"),
    [
        ("STBIFIntegerNeuron", "half_even", 1, {"Floor"}),
        ("STBIFIntegerNeuron", "half_even", 0, {"Round"}),
        ("ECAccumulate", "average", 0, {"Div"}),
        ("ECCompensate", "average", 0, {"Mul"}),
    ],
)
def test_a_specialized_attribute_leaves_one_branch_to_run(tmp_path, form, op_type, attribute, value, untaken):
    """A function holds a body per value of its op's specialized attribute; onnxruntime keeps only the one
    taken, so what the other value needs never runs."""
    op = ops.OPS[op_type]
    assert op.specialized == attribute
    rng = np.random.default_rng(9)
    params = example_params(op, rng, C, per_channel=True)
    step = form == "step"
    attrs = {**example_attributes(op), attribute: value, **({} if step else {"timesteps": T})}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.fspath(tmp_path / "specialized")
    session = InferenceSession(
        one_node_model(op.step_name if step else op.name, params, C, **attrs), options, native=False
    )
    x = rng.standard_normal((B if step else T * B, C)).astype(np.float32)
    feeds = {op.inputs[0]: x, **({**initial_states(op), "t": np.array(1, np.float32)} if step else {})}
    session.run(None, feeds)
    with open(session.end_profiling()) as f:
        executed = {e["args"]["op_name"] for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e["args"]}
    assert "If" not in executed and not executed & untaken, executed


def test_ops_specialized_on_different_attributes_do_not_compose():
    with pytest.raises(ValueError, match="specialized on half_even and average"):
        ops.compose(ops.ST_BIF_INTEGER_NEURON, ops.EC_ACCUMULATE)
