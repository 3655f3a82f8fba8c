"""STA's universal group operators: the shipped weights, their fit over each domain, their IF form."""

import json

import numpy as np
import pytest

from spikec import ugo
from spikec.cli import main

# mean |error| / max |f| over the domain, float UGO and IF form at T=128 (measured: see docs/methods/sta.md)
BOUNDS = {
    ("exp", 32): (1e-4, 2e-4),
    ("gelu", 32): (1e-5, 2e-3),
    ("gelu", 64): (1e-5, 2e-3),
    ("inverse", 16): (2e-3, 2e-3),
    ("inverse", 64): (1e-4, 3e-4),
    ("rsqrt", 8): (5e-3, 5e-3),
}


@pytest.mark.parametrize("name,hidden", sorted(BOUNDS))
def test_shipped_operators_fit_their_function(name, hidden):
    operator = ugo.load(name, hidden)
    assert operator.hidden == hidden
    fit_bound, spiking_bound = BOUNDS[name, hidden]
    assert ugo.fit_error(operator)["mean_relative"] < fit_bound
    errors = [ugo.spiking_error(operator, t) for t in (8, 32, 128)]
    assert errors[2] < spiking_bound
    assert errors[2] <= errors[1] <= errors[0]  # the IF form converges as T grows
    # the shipped weights are what the code fits today: the same function, to a tolerance that a least-squares
    # solve through another BLAS or LAPACK build (different in the last bits of each weight) cannot break
    _assert_same_function(operator, ugo.fit(name, hidden))


def _assert_same_function(got: ugo.UGO, want: ugo.UGO) -> None:
    low, high = ugo.SPECS[want.name].domain
    x = np.linspace(low, high, 20001)
    scale = np.abs(want(x)).max()
    assert np.abs(got(x) - want(x)).max() <= 1e-6 * scale
    assert ugo.fit_error(got)["mean_relative"] == pytest.approx(ugo.fit_error(want)["mean_relative"], rel=1e-3)


def test_reference_code_sizes_fit_better_than_the_papers():
    """The reference code ships N=64 for GELU and inverse where the paper says 32 and 16: measured,
    the larger N fits better in both forms (at 2x and 4x the neurons)."""
    for name in ("gelu", "inverse"):
        paper, reference = (ugo.load(name, n) for n in ugo.shipped_sizes(name))
        assert ugo.fit_error(reference)["mean_relative"] < ugo.fit_error(paper)["mean_relative"]
        assert ugo.spiking_error(reference, 128) < ugo.spiking_error(paper, 128)


def test_gelu_fit_has_a_slope_at_zero():
    """Between the innermost hinges opening left and right no hinge is active; without the knot opening both
    ways the fit was flat there and GELU (slope 1/2 at 0) erred by 0.025 near +-0.05. Small-init models keep
    their GELU inputs within a few tenths of 0, where that error was as large as the function."""
    x = np.linspace(-0.5, 0.5, 1001)
    for hidden in ugo.shipped_sizes("gelu"):
        operator = ugo.load("gelu", hidden)
        assert np.abs(operator(x) - ugo.SPECS["gelu"].function(x)).max() < 1e-3  # measured 7.2e-4, 2.3e-4
        assert np.gradient(operator(x), x)[500] == pytest.approx(0.5, abs=0.01)


def test_scaling_operators_fit_for_relative_error():
    """rsqrt scales LayerNorm's rows and inverse the softmax's: their fits weigh relative error (an absolute
    fit of rsqrt erred by 5.5 % of 1/sqrt(x) near x = 0.1, 2.5 % at x = 1)."""
    for name, bound in (("rsqrt", 0.035), ("inverse", 0.015)):  # measured 3.1 %, 1.3 %
        operator, (low, high) = ugo.load(name), ugo.SPECS[name].domain
        x = np.linspace(low, high, 20001)
        want = ugo.SPECS[name].function(x)
        assert np.max(np.abs(operator(x) - want) / want) < bound


def test_if_neurons_emit_the_hidden_relu():
    """Each hidden IF neuron's rate x threshold is relu(pre-activation) within threshold/T."""
    operator = ugo.load("gelu")
    x = np.linspace(-25, 25, 101)
    exact = ugo.UGO("gelu", operator.w1, operator.b1, operator.w2, operator.b2)(x)
    bound = np.abs(operator.w2) @ operator.thresholds() / 64
    assert np.abs(operator.spiking(x, 64) - exact).max() <= bound


@pytest.mark.slow
def test_paper_recipe_runs_and_fits_worse():
    paper = ugo.train_paper("exp", epochs=20)
    assert paper.hidden == 32 and np.isfinite(paper.w2).all()
    assert ugo.fit_error(paper)["mean_relative"] > ugo.fit_error(ugo.load("exp"))["mean_relative"]


def test_ugo_train_cli(tmp_path, capfd):
    assert main(["ugo", "train", "--only", "rsqrt", "--output-dir", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "rsqrt" in out and err == ""
    with np.load(tmp_path / "ugo-rsqrt.npz") as trained:
        retrained = ugo.UGO("rsqrt", trained["w1"], trained["b1"], trained["w2"], float(trained["b2"]))
    _assert_same_function(retrained, ugo.load("rsqrt"))
    assert main(["ugo", "train", "--only", "tanh", "--output-dir", str(tmp_path)]) == 2
    assert "tanh" in capfd.readouterr().err


@pytest.mark.parametrize("scale", [1e-5, 1.0])
def test_an_activation_its_ugo_does_not_fit_stays_exact(scale):
    """A UGO's fit error is absolute (~1e-3 of SiLU's on [-25, 25]): on a site of inputs ~1e-5 (MobileViT's
    BatchNorm-shrunk stages) it is 100 times the outputs' span, and STA's SNN lost all fidelity (MobileViT
    cosine 0.03). Such an activation stays exact with expectation compensation; a unit-scale one keeps its
    UGO."""
    import graphs

    import spikec
    from spikec.evaluate import cosine, run_dataset

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 16)) / 3, rng.standard_normal((16, 4)) / 4
    model = graphs.silu_mlp(w1, w2)
    calib = {"x": (rng.standard_normal((64, 8)) * scale).astype(np.float32)}
    feeds = {"x": (rng.standard_normal((16, 8)) * scale).astype(np.float32)}
    snn = spikec.compile(model, calib, method="sta", timesteps=32, progress=False)
    report = json.loads({p.key: p.value for p in snn.metadata_props}["spikec.report"])
    kept = report.get("activations_kept_exact", [])
    assert len(kept) == (1 if scale < 1 else 0) and len(report["ugos"]) == (0 if scale < 1 else 1)
    assert cosine(run_dataset(model, feeds)["y"], run_dataset(snn, feeds)["y"]) > 0.97
