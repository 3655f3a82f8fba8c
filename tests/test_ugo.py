"""STA's universal group operators: the shipped weights, their fit over each domain, their IF form."""
import numpy as np
import pytest

from spikec import ugo
from spikec.cli import main

# mean |error| / max |f| over the domain, float UGO and IF form at T=128 (measured: see docs/methods/sta.md)
BOUNDS = {("exp", 32): (1e-4, 2e-4), ("gelu", 32): (1e-4, 2e-3), ("gelu", 64): (1e-4, 2e-3),
          ("inverse", 16): (1e-2, 1e-2), ("inverse", 64): (1e-3, 1e-3), ("rsqrt", 8): (2e-2, 2e-2)}


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
