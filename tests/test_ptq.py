"""Built-in post-training quantization (passes/quantize.py): bias correction, and the QANN's fidelity on a
pretrained model."""

import graphs
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from spikec.passes.canonicalize import canonicalize
from spikec.runtime import InferenceSession, run_stateful

import spikec
from examples import fixtures
from spikec.evaluate import cosine

RNG = np.random.default_rng(5)


# Gemm's own scalars: the product is alpha x op(B) + beta C with op(B) = W / alpha, C = b / beta
GEMM_ALPHA, GEMM_BETA = 0.5, 2.0


def _affine_model(
    weight: np.ndarray, bias: np.ndarray, then: str | None = None, gemm: str | None = None
) -> onnx.ModelProto:
    """y = x w + b, as MatMul and Add on x [batch, 5, 8] or, with ``gemm`` ("B" or "transB": B stored as W or
    as W^T), as one Gemm on x [batch, 8]; with ``then`` an activation of it (the product's quantizer then goes
    after its bias)."""
    if gemm is not None:
        transposed = gemm == "transB"
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=GEMM_ALPHA, beta=GEMM_BETA, transB=transposed)]
        initializers = [(weight.T if transposed else weight) / GEMM_ALPHA, bias / GEMM_BETA]
        rows = ["batch"]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
        initializers = [weight, bias]
        rows = ["batch", 5]
    if then is not None:
        nodes[-1].output[0] = "xwb"
        nodes.append(helper.make_node(then, ["xwb"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, 6])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(initializers, "wb", strict=True)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rows(x: np.ndarray, gemm: str | None) -> np.ndarray:
    """Samples [n, 5, 8] as _affine_model's input: Gemm's is 2-D."""
    return x if gemm is None else x.reshape(-1, 8)


def _product_of(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the model's product as it computes x W + b (Gemm's alpha, beta and layout applied)."""
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gemm = next((n for n in model.graph.node if n.op_type == "Gemm"), None)
    if gemm is not None:
        stored = values[gemm.input[1]]
        transposed = any(a.name == "transB" and a.i for a in gemm.attribute)
        return GEMM_ALPHA * (stored.T if transposed else stored), GEMM_BETA * values[gemm.input[2]]
    product = next(n for n in model.graph.node if n.op_type == "MatMul")
    add = next(n for n in model.graph.node if n.op_type == "Add" and product.output[0] in n.input)
    return values[product.input[1]], next(values[name] for name in add.input if name in values)


FORMS = pytest.mark.parametrize("gemm", [None, "B", "transB"], ids=["matmul-add", "gemm", "gemm-transB"])


@FORMS
def test_bias_absorbs_the_operand_quantizers_mean_shift_and_zero_point(gemm):
    """A skewed operand (a long positive tail that the clip search cuts) quantized to 4 levels gets a zero
    point per channel (the levels count x - offset) and shifts its mean; the product reads the levels alone
    and its bias becomes b + (offset - E[q(x) - x]) W over the calibration data, and the SNN of that QANN
    still equals it."""
    weight = RNG.standard_normal((8, 6)).astype(np.float32)
    bias = RNG.standard_normal(6).astype(np.float32)
    model = _affine_model(weight, bias, gemm=gemm)
    calib = {"x": _rows(np.exp(RNG.standard_normal((64, 5, 8))).astype(np.float32), gemm)}
    qann = spikec.quantize(model, calib, levels=4, progress=False, zero_points=True, refit=False)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in qann.graph.initializer}
    scale, low, high, offset = (values[f"x.quant_{k}"] for k in ("scale", "low", "high", "offset"))
    x = calib["x"].reshape(-1, 8)
    levels = np.clip(np.floor((x - offset) / scale + np.float32(0.5)), low, high) * scale
    shift = (levels + offset - x).mean(axis=0, dtype=np.float64)
    assert np.abs(shift @ weight).max() > 0.05  # a shift worth correcting
    corrected_weight, corrected_bias = _product_of(qann)
    np.testing.assert_allclose(corrected_weight, weight, rtol=1e-6, atol=0)
    np.testing.assert_allclose(corrected_bias, bias + (offset - shift) @ weight, rtol=0, atol=1e-5)
    assert "y.quant_offset" not in values  # the output's readers are no products whose bias could absorb it
    feeds = {"x": _rows(np.exp(RNG.standard_normal((8, 5, 8))).astype(np.float32), gemm)}
    want = InferenceSession(qann).run(["y"], feeds)[0]
    snn = spikec.compile(qann, calib, method="spikezip", timesteps=16, progress=False)
    np.testing.assert_allclose(InferenceSession(snn).run(["y"], feeds)[0], want, atol=1e-4 * np.abs(want).max())


def _mixed_channels(samples: int, seed: int) -> np.ndarray:
    """8 channels that sit differently around zero, as a product's or a LayerNorm's outputs do: four never
    negative, two symmetric, two with a small negative tail (GELU-like)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, 5, 8))
    gelu_like = z * (1 + np.tanh(0.8 * z)) / 2
    return np.concatenate([np.exp(z[..., :4]), z[..., 4:6], 3 * gelu_like[..., 6:]], axis=-1).astype(np.float32)


def test_each_channel_splits_its_levels_between_the_signs():
    """Per channel, the levels are split between the signs by each channel's own range: the channels that
    never go negative get all L levels on their positive side (a split by the whole tensor's range would
    give them about half), which lowers each such channel's error, and the bounds reach the ST-BIF+
    neurons per channel: the SNN (float and integer mode) still equals its QANN."""
    from spikec.passes.quantize import Quantizer

    from spikec.methods.spikezip import integer_qann

    weight = RNG.standard_normal((8, 6)).astype(np.float32)
    model = _affine_model(weight, RNG.standard_normal(6).astype(np.float32), then="Tanh")
    calib = {"x": _mixed_channels(64, 1)}
    qann = spikec.quantize(model, calib, levels=8, progress=False, refit=False)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in qann.graph.initializer}
    scale, low, high = (values[f"x.quant_{k}"] for k in ("scale", "low", "high"))
    np.testing.assert_array_equal(high - low, np.full(8, 7))
    np.testing.assert_array_equal(low[:4], np.zeros(4))
    assert set(low[4:6].tolist()) <= {-4.0, -3.0}  # the halves, or a near-even split by the sample's range
    assert (low[6:] < 0).all() and (low[6:] > -4).all()
    assert [n.op_type for n in qann.graph.node if n.name.startswith("x/Quantize")] == [
        "Div", "Add", "Floor", "Max", "Min", "Mul"
    ]  # fmt: skip
    x = calib["x"].reshape(-1, 8)
    error = np.square(Quantizer(scale, low, high)(x) - x).mean(axis=0)
    # the same channels' scales with the halves every signed channel got before (their clip threshold kept)
    halves = np.square(Quantizer(scale * high / 4, np.int64(-4), np.int64(3))(x) - x).mean(axis=0)
    assert (error[:4] < 0.5 * halves[:4]).all()
    feeds = {"x": _mixed_channels(8, 2)}
    want = InferenceSession(qann).run(["y"], feeds)[0]
    snn = spikec.compile(qann, calib, method="spikezip", timesteps=24, progress=False)
    np.testing.assert_allclose(InferenceSession(snn).run(["y"], feeds)[0], want, atol=1e-4 * np.abs(want).max())
    exact = spikec.compile(qann, calib, method="spikezip", timesteps=24, mode="stateful", burst=4, progress=False)
    got = run_stateful(InferenceSession(exact), feeds, 24, until_quiet=True)
    np.testing.assert_array_equal(got["y"], InferenceSession(integer_qann(qann)).run(["y"], feeds)[0])
    # a graph output (logits) keeps one split for all its channels: one that calibration saw negative only
    # still gets levels above zero
    bias = np.zeros(6, np.float32)
    bias[0] = -100.0
    head = spikec.quantize(_affine_model(weight, bias), calib, levels=8, progress=False, refit=False)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in head.graph.initializer}
    assert values["x.quant_low"].shape == (8,) and values["y.quant_low"].shape == ()
    assert values["y.quant_high"] > 0


def test_per_tensor_quantizers_keep_the_bias_and_no_zero_point():
    """Per tensor, the clip cuts a skewed operand deep and its mean shift is no constant worth adding to every
    row (MiniLM: far worse with it): the product keeps its bias, and zero points are per channel only."""
    weight = RNG.standard_normal((8, 6)).astype(np.float32)
    bias = RNG.standard_normal(6).astype(np.float32)
    calib = {"x": np.exp(RNG.standard_normal((64, 5, 8))).astype(np.float32)}
    qann = spikec.quantize(
        _affine_model(weight, bias), calib, levels=4, progress=False, per_tensor=True, zero_points=True, refit=False
    )
    names = {t.name for t in qann.graph.initializer}
    assert "x.quant_scale" in names and "x.quant_offset" not in names
    np.testing.assert_array_equal(_product_of(qann)[1], bias)


def test_refit_opens_one_session_at_a_time_where_the_operand_is_smaller_than_the_weights(monkeypatch):
    """Where the QANN's operand over all calibration rows is smaller than the weights its cut reads, the refit
    fetches it first and closes that session before the float model's opens (each holds a copy of the
    weights): the same QANN, bit for bit, as with both open together."""
    from spikec import refit
    from spikec.methods.spikezip import quantize_model

    weight, bias = RNG.standard_normal((8, 6)).astype(np.float32), RNG.standard_normal(6).astype(np.float32)
    model = canonicalize(_affine_model(weight, bias, then="Tanh"))
    calib = _correlated_operand(200, 1)
    opened, most = [], []
    original = refit.run_batches

    def counted(*args, **kwargs):
        batches = original(*args, **kwargs)  # the session opens here, before the first batch
        opened.append(batches)
        most.append(len(opened))

        def closing():
            try:
                yield from batches
            finally:
                opened.remove(batches)

        return closing()

    monkeypatch.setattr(refit, "run_batches", counted)
    results = {}
    for stored in (True, False):
        monkeypatch.setattr(refit, "_store_operand", lambda operand_bytes, weight_bytes, stored=stored: stored)
        most.clear()
        results[stored] = quantize_model(model, calib, 4, batch_size=32, progress=False)
        assert max(most) == (1 if stored else 2)
    assert results[True][2][0]["alpha"] is not None  # the product was refit
    for got, want in zip(_product_of(results[True][0]), _product_of(results[False][0])):
        np.testing.assert_array_equal(got, want)


def _correlated_operand(samples: int, seed: int) -> dict[str, np.ndarray]:
    """8 channels that span 3 directions plus a little noise (as a LayerNorm's output spans fewer directions
    than it has channels): a refit of the weights can filter part of each channel's rounding error."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).standard_normal((3, 8))
    x = rng.standard_normal((samples, 5, 3)) @ basis + 0.05 * rng.standard_normal((samples, 5, 8))
    return {"x": x.astype(np.float32)}


@FORMS
def test_refit_is_the_ridge_solution_and_lowers_the_products_error(gemm, monkeypatch):
    """The product's W and b become the ridge solution of the float output on the quantized operand, with
    the penalty held-back samples chose; its output errs less on other data, and the SNN equals the QANN."""
    from spikec import refit
    from spikec.methods.spikezip import quantize_model
    from spikec.refit import VALIDATION_STRIDE

    weight = RNG.standard_normal((8, 6)).astype(np.float32)
    bias = RNG.standard_normal(6).astype(np.float32)
    model = canonicalize(_affine_model(weight, bias, then="Tanh", gemm=gemm))
    calib, held = ({"x": _rows(d["x"], gemm)} for d in (_correlated_operand(200, 1), _correlated_operand(100, 2)))
    kept, _, none = quantize_model(model, calib, 4, batch_size=32, progress=False, refit=False)
    qann, _, refitted = quantize_model(model, calib, 4, batch_size=32, progress=False)
    assert none == [] and len(refitted) == 1 and refitted[0]["target"] == "xwb"
    alpha = refitted[0]["alpha"]
    assert alpha is not None and refitted[0]["error_after"] < 0.8 * refitted[0]["error_before"]
    # the closed form, on every calibration sample, pulled toward the bias-corrected weights
    values = {t.name: onnx.numpy_helper.to_array(t) for t in kept.graph.initializer}
    scale, low, high = (values[f"x.quant_{k}"] for k in ("scale", "low", "high"))
    q = (np.clip(np.floor(calib["x"] / scale + np.float32(0.5)), low, high) * scale).reshape(-1, 8)
    rows = np.hstack([q, np.ones((len(q), 1))]).astype(np.float64)
    y = calib["x"].reshape(-1, 8).astype(np.float64) @ weight + bias
    kept_weight, kept_bias = _product_of(kept)
    start = np.vstack([kept_weight, kept_bias[None]])
    gram = rows.T @ rows
    penalty = alpha * np.trace(gram) / len(gram)
    solution = np.linalg.solve(gram + penalty * np.eye(9), rows.T @ y + penalty * start)
    refit_weight, refit_bias = _product_of(qann)
    np.testing.assert_allclose(refit_weight, solution[:-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(refit_bias, solution[-1], rtol=0, atol=1e-5)
    # refit in blocks of two columns (as a vocabulary-wide head's are, through the inverted system): the same
    monkeypatch.setattr(refit, "_COLUMN_BLOCK_BYTES", 8 * len(start) * 2)
    blocked, _, blocked_report = quantize_model(model, calib, 4, batch_size=32, progress=False)
    assert blocked_report[0]["alpha"] == alpha
    assert blocked_report[0]["error_after"] == pytest.approx(refitted[0]["error_after"], rel=1e-9)
    for got, want in zip(_product_of(blocked), (solution[:-1], solution[-1])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # on data neither the fit nor the choice of penalty saw, the product's output errs less
    float_y = held["x"].astype(np.float64) @ weight + bias

    def product_error(m):
        copy = onnx.ModelProto.FromString(m.SerializeToString())
        copy.graph.output.append(helper.make_tensor_value_info("xwb", TensorProto.FLOAT, None))
        return float(np.square(InferenceSession(copy).run(["xwb"], held)[0] - float_y).mean())

    assert product_error(qann) < 0.8 * product_error(kept)
    want = InferenceSession(qann).run(["y"], held)[0]
    snn = spikec.compile(qann, calib, method="spikezip", timesteps=16, progress=False)
    np.testing.assert_allclose(InferenceSession(snn).run(["y"], held)[0], want, atol=1e-4 * np.abs(want).max())
    # too few samples to hold any back: nothing is refit
    few = {"x": calib["x"][: VALIDATION_STRIDE - 1]}
    assert quantize_model(model, few, 4, batch_size=32, progress=False)[2] == []


def test_refit_keeps_weights_that_held_back_samples_do_not_improve():
    """An operand on the quantizer's own grid: quantizing loses nothing, no penalty does better than the
    bias-corrected weights on the held-back samples, and they stay bit for bit."""
    weight = RNG.standard_normal((8, 6)).astype(np.float32)
    bias = RNG.standard_normal(6).astype(np.float32)
    rng = np.random.default_rng(3)
    calib = {"x": rng.integers(-2, 2, (10, 5, 8)).astype(np.float32)}
    from spikec.methods.spikezip import quantize_model

    model = canonicalize(_affine_model(weight, bias, then="Tanh"))
    kept, _, _ = quantize_model(model, calib, 4, batch_size=32, progress=False, refit=False)
    qann, _, refitted = quantize_model(model, calib, 4, batch_size=32, progress=False)
    assert [r["alpha"] for r in refitted] == [None]
    for a, b in zip(kept.graph.initializer, qann.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("levels", "zero_points", "bound"),
    # measured 0.9827, 0.9838, 0.9556; with one split of the levels for all of a tensor's channels (before
    # stop 35) 0.9766, 0.9838, 0.9374
    [(32, False, 0.978), (32, True, 0.98), (16, False, 0.95)],
)
def test_minilm_qann_stays_close_to_the_float_model(levels, zero_points, bound):
    """Pretrained MiniLM quantized on calibration sentences, measured on held-out ones (docs/methods/spikezip.md
    has the table, benchmarks/bench_ptq.py regenerates it)."""
    model = fixtures.minilm()
    held = fixtures.minilm_inputs(fixtures.heldout_sentences())
    calib = fixtures.minilm_inputs(fixtures.calibration_sentences())
    qann = spikec.quantize(model, calib, levels=levels, progress=False, zero_points=zero_points)
    reference = InferenceSession(onnx.load(str(model))).run(["sentence_embedding"], held)[0]
    assert cosine(InferenceSession(qann).run(["sentence_embedding"], held)[0], reference) > bound


@pytest.mark.parametrize("activation", ["relu", "silu", "relu-reshaped-gemm"])
def test_one_quantizer_between_an_mlps_products(activation):
    """The first product's output, read only by the activation, is not quantized: the activation's output
    is (the second product's operand), so one neuron layer sits between the products, as the reference
    code's one quantizer in front of its ReLU (after a ReLU its levels are unsigned). The SNN still equals
    the QANN."""
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((16, 32)) * 0.3, rng.standard_normal((32, 16)) * 0.3
    shape = (16,)
    if activation == "relu":
        model, hidden_in, hidden_out, operand = graphs.mlp(), "h1", "h", "x"
    elif activation == "silu":
        model, hidden_in, hidden_out, operand = graphs.silu_mlp(w1, w2), "h", "a", "x"
    else:  # GPT-2's layout: the product's output reaches the activation, and the activation's output the
        # next product, through Reshapes; the quantizers sit on the products' operands, the views
        model, hidden_in, hidden_out, operand = graphs.reshaped_gemm_mlp(w1, w2), "h_rows", "a_rows", "x_rows"
        shape = (4, 16)
    calib = {"x": rng.standard_normal((64, *shape)).astype(np.float32)}
    qann = spikec.quantize(model, calib, levels=8, progress=False)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in qann.graph.initializer}
    assert sorted(n[: -len(".quant_scale")] for n in values if n.endswith(".quant_scale")) == sorted(
        [operand, hidden_out, "y"]
    )
    assert f"{hidden_in}.quant_scale" not in values
    if activation != "silu":
        assert values[f"{hidden_out}.quant_low"].min() == 0  # unsigned: the quantizer is the ReLU
    feeds = {"x": rng.standard_normal((16, *shape)).astype(np.float32)}
    want = InferenceSession(qann).run(["y"], feeds)[0]
    snn = spikec.compile(qann, calib, method="spikezip", timesteps=32, progress=False)
    np.testing.assert_allclose(InferenceSession(snn).run(["y"], feeds)[0], want, atol=1e-4 * np.abs(want).max())
