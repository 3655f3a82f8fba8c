"""ECMT's thresholds beyond the percentile rule (spikec/methods/ecmt.py): the error search and the mean-gain
correction, measured on the MT neuron op itself and on a deep residual stack, where a shortfall of every
neuron's T-step mean compounds block by block (LeViT; Swin-v2's post-norm residuals)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from spikec.passes import ecmt

import spikec
from spikec.evaluate import cosine, run_dataset
from spikec.methods.ecmt import SEARCH_SCALES, least_error, mt_codes, unbiased


def _sample() -> np.ndarray:
    """Four Gaussian channels and four GELU-like ones (small negative values, large positive ones)."""
    x = np.random.default_rng(3).standard_normal((512, 8)).astype(np.float32)
    x[:, 4:] = np.maximum(x[:, 4:], -0.17)
    return x


def _percentile_thresholds(x: np.ndarray) -> ecmt.Thresholds:
    return ecmt.Thresholds.from_percentiles(np.percentile(x, 90, axis=0), np.percentile(x, 10, axis=0))


def _means(x: np.ndarray, thresholds: ecmt.Thresholds, timesteps: int = 8) -> np.ndarray:
    return mt_codes(x, thresholds, 8, timesteps).mean(axis=0, dtype=np.float64) * thresholds.positive


def _slopes(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    return (means * x).sum(axis=0) / np.square(x, dtype=np.float64).sum(axis=0)


def test_the_mean_falls_short_and_its_gain_is_divided_out():
    x = _sample()
    base = _percentile_thresholds(x)
    low = ecmt.Thresholds(base.positive * np.float32(0.5), base.negative * np.float32(0.5))
    # Eq. 25 rounds the membrane down to a power of two: the 8-step mean falls short of the input, more so
    # as theta falls below it (measured: about 0.3 % at the 90th percentile, 1.5 % at half of it)
    assert np.all(_slopes(x, _means(x, low)) < 0.995)
    assert np.mean(_slopes(x, _means(x, low))) < np.mean(_slopes(x, _means(x, base)))
    corrected = unbiased(x, low, 8, 8)
    np.testing.assert_array_equal(corrected.positive, low.positive)
    np.testing.assert_allclose(corrected.gain, _slopes(x, _means(x, low)), rtol=1e-5)
    np.testing.assert_allclose(_slopes(x, _means(x, low) / corrected.gain), 1.0, atol=1e-5)


def test_a_channel_the_neurons_do_not_resolve_keeps_gain_one():
    """Values far below theta fire nothing in 8 steps: their 'gain' is no rounding bias, and dividing by
    it would blow up what they fire at a longer T."""
    x = _sample()
    thresholds = _percentile_thresholds(x)
    x[:, 0] *= 1e-3
    gain = unbiased(x, thresholds, 8, 8).gain
    assert gain[0] == 1.0 and np.all(gain[1:] != 1.0) and np.all(np.abs(gain[1:] - 1) < 0.01)


@pytest.mark.parametrize("per_channel", [True, False])
def test_search_picks_the_factor_of_least_error(per_channel):
    x = _sample()
    base = _percentile_thresholds(x)
    if not per_channel:
        base = ecmt.Thresholds(base.positive.max(), base.negative.max())

    def cover(t):
        return t

    chosen, found = least_error(x, base, cover, 8, 8, per_channel, unbias=False)
    # every factor measured on its own: the search (all at once) must pick each channel's (or the tensor's)
    errors = np.stack(
        [
            np.square(_means(x, ecmt.Thresholds(base.positive * np.float32(f), base.negative * np.float32(f))) - x).sum(
                axis=0
            )
            for f in SEARCH_SCALES
        ]
    )
    if not per_channel:
        errors = errors.sum(axis=1, keepdims=True)
    best = np.asarray(SEARCH_SCALES, np.float32)[errors.argmin(axis=0)]
    np.testing.assert_allclose(chosen.positive, base.positive * best, rtol=1e-6)
    np.testing.assert_allclose(chosen.negative, base.negative * best, rtol=1e-6)
    # the percentile threshold is not the one that codes these samples best (measured: 0.5 or 0.7 of it,
    # a quarter less error)
    assert np.all(best < 1.0)
    unscaled, searched = found["relative_error"]
    assert searched < 0.85 * unscaled


def _residual_stack(blocks: int = 8, width: int = 16, hidden: int = 32) -> onnx.ModelProto:
    """x -> blocks x (x + Relu(x W1) W2) -> y: residual blocks without normalization."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        for name, shape in ((f"w1_{i}", (width, hidden)), (f"w2_{i}", (hidden, width))):
            inits.append(
                onnx.numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
            )
        nodes += [
            helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"o{i}"]),
            helper.make_node("Add", [x, f"o{i}"], [f"x{i}"]),
        ]
        x = f"x{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "residual_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_deep_residual_stack_keeps_its_scale():
    model = _residual_stack()
    rng = np.random.default_rng(1)
    calibration = {"x": rng.standard_normal((256, 16)).astype(np.float32)}
    held = {"x": rng.standard_normal((256, 16)).astype(np.float32)}
    ann = run_dataset(model, held)["y"]

    def measured(**options) -> tuple[float, float]:
        snn = spikec.compile(model, calibration, timesteps=16, progress=False, verify=False, **options)
        y = run_dataset(snn, held)["y"]
        return cosine(ann, y), float((y * ann).sum() / (ann * ann).sum())

    paper = measured()
    searched = measured(threshold_search=True)
    default = measured(threshold_search=True, unbias=True)
    # the searched thresholds err less per site, but their shortfall compounds over 8 blocks (measured:
    # the output's scale 0.95 of the ANN's); divided out, the scale is back within 2 %
    assert searched[1] < 0.97
    assert abs(default[1] - 1) < 0.03
    # measured 1 - cosine 5.5e-4 against the percentile rule's 1.3e-3
    assert 1 - default[0] < 0.6 * (1 - paper[0])
