"""SpikeZIP-TF integer-exact mode (issue 21 §3-4): integer ST-BIF+ neurons with bursts, every op between
neurons on their totals; once quiet the SNN equals the integer QANN (spikec.methods.spikezip.integer_qann)
bit for bit, on every sample."""

import math
import warnings

import graphs
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from op_models import one_node_model
from spikec.runtime import InferenceSession, equilibrium_steps, run_stateful
from spikec.runtime.metadata import SpikecMetadata

import spikec
from examples import fixtures
from spikec import compiler
from spikec.errors import SpikecError
from spikec.evaluate import run_dataset
from spikec.memory import estimate as estimate_memory
from spikec.methods.spikezip import integer_qann

RNG = np.random.default_rng(21)


def _attention_model(qkv_bias: bool = False) -> onnx.ModelProto:
    """LayerNorm -> q, k, v [+ biases] -> softmax(q k^T / 2) v -> projection + bias, with a residual."""
    return graphs.attention_block(RNG, projection_bias=True, qkv_bias=qkv_bias)


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


def _ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


@pytest.mark.parametrize(
    "mode,per_tensor,zero_points",
    [("unrolled", False, False), ("stateful", False, False), ("stateful", True, False), ("stateful", False, True)],
)
def test_tiny_attention_equals_integer_qann_bit_for_bit(mode, per_tensor, zero_points):
    """SESA's products, Softmax, LayerNorm, bias and residual all on totals: once quiet the output is the
    integer QANN's, every bit, for every sample; bursts of 3 reach it in about a third of the steps. With
    per-tensor scales Q K^T and P V (both operands levels) accumulate in int32, in the reference and the
    SNN alike; per-channel scales of a left operand do not factor out of the sum, and stay float32. Zero
    points (x - c quantized, c W in the biases) keep it exact: -c reaches the neuron at the first step."""
    model = _attention_model(qkv_bias=zero_points)  # biases for the LayerNorm output's zero point to go into
    calib = {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)}
    feeds = {"x": RNG.standard_normal((32, 5, 8)).astype(np.float32) * 1.5}
    qann = spikec.quantize(model, calib, levels=32, per_tensor=per_tensor, zero_points=zero_points, progress=False)
    assert any(t.name.endswith(".quant_offset") for t in qann.graph.initializer) == zero_points
    reference = integer_qann(qann)
    want = InferenceSession(reference).run(["y"], feeds)[0]
    assert _ops(reference, "MatMulInteger") == (2 if per_tensor else 0)
    t_eq = {}
    for burst in (1, 3):
        snn = spikec.compile(qann, calib, method="spikezip", timesteps=48, mode=mode, burst=burst, progress=False)
        assert _ops(snn, "MatMulInteger") == _ops(reference, "MatMulInteger")
        got = run_dataset(snn, feeds)
        t_eq[burst] = max(equilibrium_steps(got["spikec.spikes.steps"]))
        np.testing.assert_array_equal(got["y"], want)
        assert np.abs(got["y.steps"][0] - want).max() > 0.1  # not there at the first step
    assert t_eq[1] >= 20 and t_eq[3] <= t_eq[1] / 2.5


def _qdq_model() -> tuple[onnx.ModelProto, dict]:
    """uint8 activations with zero points; a uint8 weight with a scale and a zero point per column, then an
    int8 weight per tensor; a bias between. Returns the model and its constants."""
    c = {
        "sx": np.float32(0.02),
        "zx": np.uint8(131),
        "q1": RNG.integers(0, 256, (16, 12), dtype=np.uint8),
        "s1": (RNG.random(12) * 0.01 + 0.002).astype(np.float32),
        "z1": RNG.integers(100, 156, 12, dtype=np.uint8),
        "b1": RNG.standard_normal(12).astype(np.float32),
        "sh": np.float32(0.05),
        "zh": np.uint8(97),
        "q2": RNG.integers(-127, 128, (12, 8), dtype=np.int8),
        "s2": np.float32(0.004),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=1),
        helper.make_node("MatMul", ["xd", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "sh", "zh"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "sh", "zh"], ["hd"]),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"]),
        helper.make_node("MatMul", ["hd", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), c


def test_qdq_products_accumulate_in_int32():
    """Both products of levels by int8/uint8 weights are MatMulInteger in the reference and the SNN: the
    reference is the integer arithmetic written out in numpy (int64 sums, one float32 scale per column),
    bit for bit, and the SNN equals it once quiet."""
    model, c = _qdq_model()
    x = RNG.standard_normal((16, 3, 16)).astype(np.float32) * 1.5
    reference = integer_qann(model)
    assert _ops(reference, "MatMulInteger") == 2 and _ops(reference, "MatMul") == 0

    def levels(v, scale, zero):
        return np.clip(np.rint(v / scale), -int(zero), 255 - int(zero)).astype(np.int64)

    def product(lv, scale, q, zero, s):
        acc = lv @ (q.astype(np.int64) - np.asarray(zero, np.int64))
        assert np.abs(acc).max() < 2**24  # exact in float32: the Cast below rounds nothing
        return acc.astype(np.float32) * (scale * s)

    h = product(levels(x, c["sx"], c["zx"]), c["sx"], c["q1"], c["z1"], c["s1"]) + c["b1"]
    want = product(levels(h, c["sh"], c["zh"]), c["sh"], c["q2"], 0, c["s2"])
    np.testing.assert_array_equal(InferenceSession(reference).run(["y"], {"x": x})[0], want)
    snn = spikec.compile(
        model, {"x": x[:8]}, method="spikezip", timesteps=100, mode="stateful", burst=8, progress=False
    )
    assert _ops(snn, "MatMulInteger") == 2 and _ops(snn, "MatMul") == 0
    got = run_stateful(InferenceSession(snn), {"x": x}, 100, until_quiet=True)
    assert None not in equilibrium_steps(got["spikec.spikes.steps"])
    np.testing.assert_array_equal(got["y"], want)


def test_without_timesteps_the_compile_measures_the_steps_to_quiet(monkeypatch):
    """256 levels at one spike a step take more steps than any fixed default gives: without --timesteps the
    compile runs the SNN on its held-out samples until no neuron fires and unrolls that many steps plus a
    margin, and the SNN equals the integer QANN bit for bit on samples it has never seen. Under a memory
    budget the measurement stops at the most steps an unrolled model fits: T is cut to that, or, where
    samples still fire there, the compile is refused in one line saying so and what needs fewer steps."""
    estimates = []
    monkeypatch.setattr(
        compiler, "estimate_memory", lambda *a, **k: estimates.append(estimate_memory(*a, **k)) or estimates[-1]
    )
    model, _ = _qdq_model()
    x = np.random.default_rng(7).standard_normal((64, 3, 16)).astype(np.float32) * 1.5
    snn = spikec.compile(model, {"x": x[:32]}, method="spikezip", progress=False)
    record = SpikecMetadata.read(snn)
    measured, verification = record.report.equilibrium, record.report.verification
    steps = measured["steps_to_quiet"]
    assert measured["samples"] == 4 and measured["held_out"] and None not in steps
    assert record.timesteps == 8 * math.ceil(max(steps) * 1.25 / 8) > 64
    assert verification["timesteps"] == record.timesteps and verification["quiet_samples"] == 4
    unseen = {"x": x[32:]}
    got = InferenceSession(snn).run(["y"], unseen)[0]
    np.testing.assert_array_equal(got, InferenceSession(integer_qann(model)).run(["y"], unseen)[0])

    fits = max(steps) + 3
    cut = SpikecMetadata.read(
        spikec.compile(
            model, {"x": x[:32]}, method="spikezip", memory_budget=estimates[0].unrolled(fits), progress=False
        )
    )
    assert cut.timesteps == fits and cut.report.verification["quiet_samples"] == 4
    fits = min(steps) - 1
    with pytest.raises(SpikecError) as refused:
        spikec.compile(
            model, {"x": x[:32]}, method="spikezip", memory_budget=estimates[0].unrolled(fits), progress=False
        )
    message = str(refused.value)
    assert message.startswith(
        f"argument timesteps: 4 of 4 held-out calibration samples still fire at step {fits}, the most an "
        f"unrolled model fits in the memory budget of "
    )
    assert "\n" not in message and "--mode stateful" in message and "--burst k" in message


def test_a_model_with_external_weights_gets_its_steps_measured_too(tmp_path):
    """The measurement runs a stateful copy of the network, which for a model whose weights lie beside it is
    emitted with them in a temporary file, as the compile writes the model itself: the same T, the same SNN."""
    model, _ = _qdq_model()
    x = np.random.default_rng(7).standard_normal((64, 3, 16)).astype(np.float32) * 1.5
    want = InferenceSession(integer_qann(model)).run(["y"], {"x": x[32:]})[0]
    in_memory = SpikecMetadata.read(spikec.compile(model, {"x": x[:32]}, method="spikezip", progress=False))
    path, out = tmp_path / "qdq.onnx", tmp_path / "snn.onnx"
    onnx.save(model, path, save_as_external_data=True, location="qdq.data", size_threshold=0)
    spikec.compile(path, {"x": x[:32]}, out, method="spikezip", progress=False)
    beside = SpikecMetadata.read(onnx.load(out, load_external_data=False))
    assert beside.report.equilibrium == in_memory.report.equilibrium and beside.timesteps == in_memory.timesteps
    np.testing.assert_array_equal(InferenceSession(out).run(["y"], {"x": x[32:]})[0], want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.data", "qdq.onnx", "snn.onnx", "snn.onnx.data"]


def test_a_quantizer_of_infinite_scale_is_refused():
    """onnxruntime's quantize_static gives an additive attention mask of -inf the scale inf: the levels are NaN
    there, in the QANN and in its SNN alike, whose neurons then never go quiet. Refused in one line naming
    the quantizer, before anything is converted."""
    model, _ = _qdq_model()
    scale = next(t for t in model.graph.initializer if t.name == "sx")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.float32(np.inf), "sx"))
    model.graph.node[0].name = "mask_quantizer"
    x = np.random.default_rng(8).standard_normal((16, 3, 16)).astype(np.float32)
    with pytest.raises(SpikecError) as refused:
        spikec.compile(model, {"x": x}, method="spikezip", progress=False)
    assert str(refused.value).startswith("quantizer 'mask_quantizer' has the scale inf: its levels are not numbers")


@pytest.mark.parametrize("model_of", ["attention", "qdq"])
def test_report_counts_integer_spikes_as_float_mode_does(tmp_path, model_of):
    """The report of an integer-exact SNN: its neurons are the float-mode SNN's sites, a burst counts each
    of its spikes, and a weight product of a neuron's tracer (MatMul of tracer x theta, or MatMulInteger of
    the tracer shifted to uint8) costs the spikes' accumulates, as the float-mode product of the spikes
    does, not a MAC per weight and step."""
    from spikec.graphinfo import summarize
    from spikec.report import build_report

    if model_of == "attention":  # per tensor: Q K^T and P V of levels are MatMulInteger too
        model = spikec.quantize(
            _attention_model(),
            {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)},
            levels=16,
            per_tensor=True,
            progress=False,
        )
        feeds = {"x": RNG.standard_normal((8, 5, 8)).astype(np.float32)}
    else:
        model = _qdq_model()[0]
        feeds = {"x": RNG.standard_normal((8, 3, 16)).astype(np.float32) * 1.5}
    onnx.save(model, tmp_path / "qann.onnx")
    reports, products = {}, {}
    for name, options in {"float": {"integer": False}, "integer": {}, "burst": {"burst": 4}}.items():
        timesteps = 40 if model_of == "attention" else 400
        snn = spikec.compile(model, feeds, method="spikezip", timesteps=timesteps, progress=False, **options)
        onnx.save(snn, tmp_path / f"{name}.onnx")
        reports[name] = build_report(tmp_path / "qann.onnx", tmp_path / f"{name}.onnx", feeds)
        products[name] = {p["node"]: p for p in reports[name]["energy"]["snn"]["products"]}
    assert _ops(snn, "MatMulInteger") == 2
    sites = {name: {s["site"]: s for s in r["sites"]} for name, r in reports.items()}
    assert sites["integer"].keys() == sites["float"].keys() == sites["burst"].keys() and sites["float"]
    for name in ("integer", "burst"):
        for product in (p for p in products[name].values() if p["counted_as"] == "spike_products"):
            neuron = sites[name][product["source"].removesuffix(".spikes")]
            assert product["acs"] == neuron["spikes_per_sample"] * product["fan_out"] > 0
        weight_products = [p for p in products["float"].values() if p["counted_as"] == "spike_products"]
        counted = [p for p in products[name].values() if p["counted_as"] == "spike_products"]
        assert len(counted) == len(weight_products) >= 2
    # the same spikes up to flips and the equilibrium path; bursts fire each of their spikes
    spikes = {name: sum(s["spikes_per_sample"] for s in r["sites"]) for name, r in reports.items()}
    assert spikes["integer"] == pytest.approx(spikes["float"], rel=0.05)
    assert spikes["burst"] >= 0.5 * spikes["float"]
    ratios = {name: r["energy"]["ratio_paper_convention"] for name, r in reports.items()}
    assert ratios["integer"] == pytest.approx(ratios["float"], rel=0.05)
    # `spikec inspect` says what each mode made of the quantizers and the weight products
    labels = {}
    for name in ("float", "burst"):
        rows = summarize(onnx.load(tmp_path / f"{name}.onnx"))["rewrites"]
        labels[name] = {
            kind: [op for r in rows if r["kind"] == kind for op in r["spikec_ops"]]
            for kind in ("quantizer", "weight_matmul")
        }
    assert all(op.startswith("STBIFNeuron(") for op in labels["float"]["quantizer"])
    assert all(op.startswith("STBIFIntegerNeuron(") and "burst 4" in op for op in labels["burst"]["quantizer"])
    assert labels["float"]["weight_matmul"] and all("PPN" in op for op in labels["float"]["weight_matmul"])
    assert labels["burst"]["weight_matmul"] and all("tracers" in op for op in labels["burst"]["weight_matmul"])


def test_verification_tells_flips_from_missing_steps():
    """Compile's verification records the held-out samples quiet at the last step; where a float-mode SNN
    misses the bound with every sample quiet, more steps cannot help and the warning says to drop
    --no-integer."""
    from spikec.runtime.metadata import SpikecMetadata

    from spikec.methods import get
    from spikec.methods.spikezip import SpikeZIPOptions

    model = _attention_model()
    calib = {"x": RNG.standard_normal((64, 5, 8)).astype(np.float32)}
    qann = spikec.quantize(model, calib, levels=16, progress=False)
    quiet = {}
    for timesteps in (2, 40):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # T=2 is short of the bound
            snn = spikec.compile(qann, calib, method="spikezip", timesteps=timesteps, progress=False)
        verification = SpikecMetadata.read(snn).report.verification
        quiet[timesteps] = verification["quiet_samples"] / verification["samples"]
    assert quiet == {2: 0.0, 40: 1.0}
    method = get("spikezip")
    flips = {"samples": 8, "quiet_samples": 8}
    assert "--no-integer" in method.advise(flips, SpikeZIPOptions(integer=False))
    assert method.advise(flips, SpikeZIPOptions()).startswith(method.advice)
    assert "--burst" in method.advise(flips, SpikeZIPOptions())
    assert method.advise({"samples": 8, "quiet_samples": 7}, SpikeZIPOptions(integer=False)) == method.advice


def test_burst_needs_integer_mode():
    model = _attention_model()
    calib = {"x": RNG.standard_normal((8, 5, 8)).astype(np.float32)}
    with pytest.raises(SpikecError, match="argument burst"):
        spikec.compile(model, calib, method="spikezip", integer=False, burst=2, progress=False)


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
        snn = spikec.compile(qann, calib, method="spikezip", timesteps=40, mode="stateful", burst=burst, progress=False)
        got = run_stateful(InferenceSession(snn), feeds, 40, until_quiet=True)
        steps = equilibrium_steps(got["spikec.spikes.steps"])
        assert None not in steps
        t_eq[burst] = max(steps)
        np.testing.assert_array_equal(got["logits"], want)
    assert 16 <= t_eq[1] < 40 and t_eq[2] <= t_eq[1] / 1.8 and t_eq[4] <= t_eq[1] / 3


@pytest.mark.slow
def test_onnxruntime_qdq_digits_vit_integer_mode(digits_qdq):
    """onnxruntime's uint8 QDQ model (zero points, int8 weights, halves rounded to even): bit for bit, every
    product (the linear layers' and attention's) accumulated in int32."""
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
        burst=8,
        progress=False,
    )
    assert _ops(snn, "MatMul") == 0 and _ops(snn, "MatMulInteger") == 32
    got = run_stateful(InferenceSession(snn), feeds, 200, until_quiet=True)
    assert None not in equilibrium_steps(got["spikec.spikes.steps"])
    assert max(equilibrium_steps(got["spikec.spikes.steps"])) < 60  # 256 levels: ~300 steps one spike at a time
    np.testing.assert_array_equal(got["logits"], want)


@pytest.mark.slow
def test_report_holds_an_integer_snn_of_a_qdq_model_to_the_integer_qann(digits_qdq, tmp_path):
    """`spikec report` on onnxruntime's QDQ model: the integer QANN, a reference of its own beside onnxruntime's
    session of the QDQ model (which fuses the model its own way), is met bit for bit once quiet."""
    from spikec.report import build_report

    data = fixtures.digits_data()
    snn = tmp_path / "snn.onnx"
    spikec.compile(
        digits_qdq, {"pixels": data["x_train"][:8]}, snn, method="spikezip", timesteps=48, burst=16, progress=False
    )
    report = build_report(digits_qdq, snn, {"pixels": data["x_test"][:32]})
    assert report["references"] == ["QANN", "integer QANN"] and report["layers_reference"] == "QANN"
    assert report["section"]["not_quiet"] == 0
    exact = report["fidelity"]["integer QANN"]["outputs"]["logits"]["per_t"][-1]
    assert exact["max_abs_error"] == 0 and exact["top1_agreement"] == 1
    assert report["fidelity"]["QANN"]["outputs"]["logits"]["per_t"][-1]["cosine"] > 0.9999
