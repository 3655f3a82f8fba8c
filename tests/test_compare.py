"""spikec compare: every method on one model and data, measured side by side, and the recommendation rule."""

import json

import numpy as np
import pytest

from examples import fixtures
from spikec.cli import main
from spikec.compare import recommend


def _row(method, cosine, energy, timesteps=8, **more):
    return {"method": method, "cosine": cosine, "energy_ratio": energy, "timesteps": timesteps, **more}


def test_recommendation_rule():
    rows = [
        _row("ecmt", 0.995, 0.9),
        _row("sta", 0.999, 3.0, 64),
        _row("ttfs", 0.98, 0.2, None),
        {"method": "spikezip", "error": "node 'x': unsupported"},
    ]
    # the lowest energy among the faithful: ttfs's lower energy does not count below the bound
    assert recommend(rows)["method"] == "ecmt"
    assert recommend([_row("ecmt", 0.9, 0.9), _row("sta", 0.95, 3.0)])["method"] == "sta"  # none faithful: the best
    # with labels, accuracy decides: half a point below the ANN is faithful, whatever the cosine
    labelled = [
        _row("ecmt", 0.95, 0.9, accuracy=0.99, ann_accuracy=0.993),
        _row("sta", 0.999, 3.0, accuracy=0.97, ann_accuracy=0.993),
    ]
    assert recommend(labelled)["method"] == "ecmt"
    assert recommend([{"method": "ecmt", "error": "x"}])["method"] is None


@pytest.mark.slow
def test_compare_digits_vit_every_method(digits, tmp_path, capfd):
    np.savez(tmp_path / "calib.npz", pixels=digits["x_test"][:48])
    np.savez(tmp_path / "labels.npz", labels=digits["y_test"][:48])
    assert (
        main(
            [
                "compare",
                str(fixtures.digits_vit()),
                "--calib",
                str(tmp_path / "calib.npz"),
                "--labels",
                str(tmp_path / "labels.npz"),
                "--timesteps",
                "ecmt=4,spikezip=48,sta=8",
                "--json",
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    result = json.loads(out)  # progress goes to stderr: stdout is the JSON alone
    assert "compare 1/4: ecmt" in err
    assert (result["fit_samples"], result["validation_samples"]) == (36, 12)
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == ["ecmt", "spikezip", "sta", "ttfs"] and not any("error" in r for r in rows.values())
    assert [rows[m]["timesteps"] for m in rows] == [4, 48, 8, None]
    assert [len(rows[m]["per_t"]) for m in rows] == [4, 48, 8, 1]
    assert rows["ecmt"]["cosine"] >= 0.99
    assert rows["spikezip"]["qann_relative_max_error"] <= 1e-4  # equal to its QANN once quiet
    assert rows["ttfs"]["relative_max_error"] <= 1e-3
    for r in rows.values():
        assert 0.9 <= r["ann_accuracy"] <= 1.0 and 0.9 <= r["accuracy"] <= 1.0
        assert r["energy_ratio"] > 0 and r["seconds_per_sample"] > 0 and r["time_ratio"] > 0
    assert 0 < rows["ecmt"]["spikes_per_neuron_per_step"] <= 1
    assert rows["ttfs"]["spikes_per_neuron_per_step"] == pytest.approx(1.0, abs=1e-3)  # one spike per neuron
    # energy vs T: every T of ECMT and SpikeZIP-TF from one run, rising with T; STA's thresholds depend on
    # its T, so only that one
    assert [len(rows[m]["energy_per_t"]) for m in rows] == [4, 48, 1, 1]
    for m in ("ecmt", "spikezip"):
        energy = [e["energy"] for e in rows[m]["energy_per_t"]]
        assert all(a < b for a, b in zip(energy, energy[1:])) and energy[-1] == pytest.approx(rows[m]["energy_ratio"])
    # TTFS's one spike per neuron costs the least on this model, and it is faithful
    assert result["recommendation"]["method"] == "ttfs"


def test_compare_cli_errors(tmp_path, capfd):
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=np.zeros((8, 1, 8, 8), np.float32))
    model = str(fixtures.digits_vit())
    for argv, culprit in [
        (["--methods", "ecmt,bogus"], "'bogus'"),
        (["--timesteps", "ttfs=4"], "ttfs"),
        (["--timesteps", "ecmt=0"], "'ecmt=0'"),
    ]:
        assert main(["compare", model, "--calib", str(calib), "--quiet", *argv]) == 2
        out, err = capfd.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and culprit in err, err
    np.savez(calib, pixels=np.zeros((3, 1, 8, 8), np.float32))
    assert main(["compare", model, "--calib", str(calib), "--quiet", "--json"]) == 2
    assert "at least 4" in capfd.readouterr().err
    # an SNN given as the ANN: no method converts it, an error (one line), not a table of failures
    np.savez(calib, pixels=np.zeros((8, 1, 8, 8), np.float32))
    snn = tmp_path / "snn.onnx"
    assert main(["compile", model, "--calib", str(calib), "-o", str(snn), "-T", "2", "--no-verify", "--quiet"]) == 0
    capfd.readouterr()
    assert main(["compare", str(snn), "--calib", str(calib), "--quiet", "--json"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "already a spikec model" in err, err
