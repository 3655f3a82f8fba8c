"""SpikeZIP-TF integer-exact mode (issue 21 §3-4): integer ST-BIF+ neurons with bursts, every op between
neurons on their totals; once quiet the SNN equals the integer QANN (spikec.methods.spikezip.integer_qann)
bit for bit, on every sample."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from op_models import one_node_model
from spikec.runtime import InferenceSession, equilibrium_steps, run_stateful

import spikec
from examples import fixtures
from spikec.errors import SpikecError
from spikec.evaluate import run_dataset
from spikec.methods.spikezip import integer_qann

RNG = np.random.default_rng(21)


def _init(name, *shape, scale=0.5):
    return onnx.numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _attention_model() -> onnx.ModelProto:
    """LayerNorm -> q, k, v -> softmax(q k^T / 2) v -> projection + bias, with a residual."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        *[helper.make_node("MatMul", ["h", f"w{n}"], [n]) for n in "qkv"],
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "half"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["proj"]),
        helper.make_node("Add", ["proj", "bo"], ["pb"]),
        helper.make_node("Add", ["pb", "x"], ["y"]),
    ]
    inits = [
        _init("gamma", 8, scale=1.0),
        _init("beta", 8),
        *[_init(f"w{n}", 8, 8) for n in "qkvo"],
        _init("bo", 8),
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_neuron_ends_at_the_level_rounded_as_the_quantizer():
    """A running total that settles after a few steps: the tracer ends at clamp(round(y/theta)), halves to
    even (QuantizeLinear) or up (spikec's quantizer), with at most ``burst`` spikes per step."""
    theta = np.float32(0.25)
    params = {"theta": theta, "s_min": np.float32(-6), "s_max": np.float32(5)}
    rows, steps = 8, 12
    final = np.array([0.375, 0.625, -0.375, -0.125, 0.124, 9.0, -9.0, 1.1], np.float32)  # halves, clamps, plain
    y = np.stack([final * min(t, 3) / 3 for t in range(1, steps + 1)]).astype(np.float32)[:, :, None]
    for half_even, burst in ((1, 1), (0, 1), (1, 3)):
        model = one_node_model("STBIFIntegerNeuron", params, 1, timesteps=steps, burst=burst, half_even=half_even)
        spikes, count = InferenceSession(model).run(None, {"y": y.reshape(steps * rows, 1)})
        spikes = spikes.reshape(steps, rows)
        scaled = final / theta
        want = np.clip(np.rint(scaled) if half_even else np.floor(scaled + 0.5), -6, 5)
        np.testing.assert_array_equal(spikes.sum(0), want)
        assert np.abs(spikes).max() == burst and (spikes == np.rint(spikes)).all()
        np.testing.assert_array_equal(count, np.abs(spikes).reshape(-1))
    assert want[0] == 2 and want[2] == -2  # 1.5 and -1.5 went to even, where half up gives 2 and -1


@pytest.mark.parametrize("mode", ["unrolled", "stateful"])
def test_tiny_attention_equals_integer_qann_bit_for_bit(mode):
    """SESA's products, Softmax, LayerNorm, bias and residual all on totals: once quiet the output is the
    integer QANN's, every bit, for every sample; bursts of 3 reach it in about a third of the steps."""
    model = _attention_model()
    calib = {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)}
    feeds = {"x": RNG.standard_normal((32, 5, 8)).astype(np.float32) * 1.5}
    qann = spikec.quantize(model, calib, levels=32, progress=False)
    want = InferenceSession(integer_qann(qann)).run(["y"], feeds)[0]
    t_eq = {}
    for burst in (1, 3):
        snn = spikec.compile(
            qann, calib, method="spikezip", timesteps=48, mode=mode, integer=True, burst=burst, progress=False
        )
        got = run_dataset(snn, feeds)
        t_eq[burst] = max(equilibrium_steps(got["spikec.spikes.steps"]))
        np.testing.assert_array_equal(got["y"], want)
        assert np.abs(got["y.steps"][0] - want).max() > 0.1  # not there at the first step
    assert t_eq[1] >= 20 and t_eq[3] <= t_eq[1] / 2.5


def test_burst_needs_integer_mode():
    model = _attention_model()
    calib = {"x": RNG.standard_normal((8, 5, 8)).astype(np.float32)}
    with pytest.raises(SpikecError, match="argument burst"):
        spikec.compile(model, calib, method="spikezip", burst=2, progress=False)


@pytest.mark.slow
def test_digits_vit_integer_mode_equals_integer_qann():
    """The digits ViT quantized by spikec (16 levels), 64 test images: bit for bit at every burst, T_eq
    (measured 25 / 12 / 6) about divided by the burst."""
    data = fixtures.digits_data()
    calib = {"pixels": data["x_train"][:256]}
    qann = spikec.quantize(fixtures.digits_vit(), calib, levels=16, progress=False)
    feeds = {"pixels": data["x_test"][:64]}
    want = InferenceSession(integer_qann(qann)).run(["logits"], feeds)[0]
    t_eq = {}
    for burst in (1, 2, 4):
        snn = spikec.compile(
            qann, calib, method="spikezip", timesteps=40, mode="stateful", integer=True, burst=burst, progress=False
        )
        got = run_stateful(InferenceSession(snn), feeds, 40, until_quiet=True)
        steps = equilibrium_steps(got["spikec.spikes.steps"])
        assert None not in steps
        t_eq[burst] = max(steps)
        np.testing.assert_array_equal(got["logits"], want)
    assert 16 <= t_eq[1] < 40 and t_eq[2] <= t_eq[1] / 1.8 and t_eq[4] <= t_eq[1] / 3


@pytest.mark.slow
def test_onnxruntime_qdq_digits_vit_integer_mode(digits_qdq):
    """onnxruntime's uint8 QDQ model (zero points, int8 weights, halves rounded to even): bit for bit."""
    data = fixtures.digits_data()
    qdq = digits_qdq
    feeds = {"pixels": data["x_test"][:16]}
    want = InferenceSession(integer_qann(onnx.load(qdq))).run(["logits"], feeds)[0]
    snn = spikec.compile(
        qdq,
        {"pixels": data["x_train"][:8]},
        method="spikezip",
        timesteps=200,
        mode="stateful",
        integer=True,
        burst=8,
        progress=False,
    )
    got = run_stateful(InferenceSession(snn), feeds, 200, until_quiet=True)
    assert None not in equilibrium_steps(got["spikec.spikes.steps"])
    assert max(equilibrium_steps(got["spikec.spikes.steps"])) < 60  # 256 levels: ~300 steps one spike at a time
    np.testing.assert_array_equal(got["logits"], want)
