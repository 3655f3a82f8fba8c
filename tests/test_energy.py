"""ECMT's energy objective (spikec/methods/ecmt.py): per site, the thresholds that fire least within an error
bound, searched on the MT neuron op itself; in a compiled model, fewer spikes and less energy for bounded
fidelity."""

import numpy as np
import onnx
import pytest
from graphs import mlp
from spikec.passes import ecmt
from spikec.runtime.metadata import SpikecMetadata

from spikec.compare import measure, points
from spikec.methods.ecmt import SCALES, mt_codes, sparsest


def _sample() -> tuple[np.ndarray, ecmt.Thresholds]:
    """Half the channels GELU-like (small negative values, large positive ones), half Gaussian."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((96, 12)).astype(np.float32)
    x[:, :6] = np.maximum(x[:, :6], -0.1 * np.abs(x[:, :6]))
    return x, ecmt.Thresholds.from_percentiles(np.percentile(x, 90, axis=0), np.percentile(x, 10, axis=0))


def _measured(x: np.ndarray, thresholds: ecmt.Thresholds, timesteps: int = 8) -> tuple[float, float]:
    """Spikes per value and step and the relative RMS error of the T-step means, each pair run on its own."""
    codes = mt_codes(x, thresholds, 8, timesteps)
    means = codes.mean(axis=0, dtype=np.float64) * thresholds.positive
    return np.count_nonzero(codes) / codes.size, float(np.sqrt(np.square(means - x).sum() / np.square(x).sum()))


def test_objective_fires_least_within_the_bound():
    x, base = _sample()
    # every pair of scales measured on its own: the search (all pairs in one run) must pick the optimum
    grid = {
        (a, b): _measured(x, ecmt.Thresholds(base.positive * np.float32(a), base.negative * np.float32(b)))
        for a in SCALES
        for b in SCALES
    }
    default_spikes, default_error = grid[1.0, 1.0]
    assert 0.3 < default_spikes < 0.9 and default_error < 0.1
    spikes = []
    for slack in (0.0, 1.0, 3.0):
        chosen, found = sparsest(x, base, 8, 8, slack)
        pair = (found["scale_pos"], found["scale_neg"])
        allowed = (1 + slack) * default_error
        assert grid[pair][1] <= allowed + 1e-9
        assert grid[pair][0] == min(s for s, e in grid.values() if e <= allowed + 1e-9)
        assert found["spikes_per_value_step"] == pytest.approx([default_spikes, grid[pair][0]])
        assert found["relative_error"] == pytest.approx([default_error, grid[pair][1]])
        np.testing.assert_array_equal(chosen.positive, base.positive * np.float32(pair[0]))
        np.testing.assert_array_equal(chosen.negative, base.negative * np.float32(pair[1]))
        spikes.append(grid[pair][0])
    # no slack keeps the percentile thresholds; more fires less: half or fewer spikes at four times the error
    assert sparsest(x, base, 8, 8, 0.0)[1]["scale_pos"] == 1.0
    assert spikes[0] > spikes[1] > spikes[2] and spikes[2] < spikes[0] / 2


def test_compiled_model_spends_less_energy_within_the_bound(tmp_path):
    """The MLP (x -> fc1 -> ReLU -> fc2): both neuron sites feed weight products; the objective raises their
    thresholds by the scales it reports, and the SNN's energy estimate and spikes fall, its cosine with them
    by an amount the slack decides."""
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    results = {}
    for slack in (0.0, 1.0, 3.0):
        snn, report = measure(
            tmp_path / "mlp.onnx", {"x": x[:48]}, {"x": x[48:]}, "ecmt", tmp_path, timesteps=8, energy_slack=slack
        )
        compiled = SpikecMetadata.read(onnx.load(snn)).report
        spikes = sum(s["spikes_per_sample"] for s in report["sites"])
        results[slack] = (points(report)[-1], spikes, compiled)
    base, base_spikes, base_compiled = results[0.0]
    assert "energy_objective" not in base_compiled.extra and base["cosine"] > 0.99
    thetas = {n["tensor"]: np.array(n["theta_pos"]) for n in base_compiled.neurons}
    for slack in (1.0, 3.0):
        point, spikes, compiled = results[slack]
        objective = compiled.extra["energy_objective"]
        assert sorted(objective) == ["h", "x"]
        for n in compiled.neurons:
            np.testing.assert_allclose(n["theta_pos"], thetas[n["tensor"]] * objective[n["tensor"]]["scale_pos"])
        assert spikes < 0.75 * base_spikes and point["energy"] < base["energy"]
        # cosine ~ 1 - error^2/2 per layer (two layers), the error up to (1 + slack) times the default's
        assert 1 - point["cosine"] < 4 * (1 + slack) ** 2 * (1 - base["cosine"])
    assert results[3.0][0]["energy"] < results[1.0][0]["energy"]
