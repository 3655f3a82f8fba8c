"""Adding a method is one module and one registry line (docs/architecture.md): a test method, registered
here, compiles through the template, runs, and gets its own CLI flags from its Options."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from graphs import FEATURES, mlp
from spikec.passes.options import Options, option
from spikec.runtime import InferenceSession, run
from spikec.runtime.metadata import SpikecMetadata

import spikec
from spikec import methods
from spikec.cli import main
from spikec.evaluate import run_dataset
from spikec.methods import METHODS, Calibration, Job, Method
from spikec.methods.base import MEAN


@dataclass(frozen=True)
class EchoOptions(Options):
    label: str | None = option(None, "a label the model records")
    gain: float = option(1.0, "a number the options validate", bounds=(0, 10))


class Echo(Method):
    """The ANN at every step: no neurons, so every tensor is time-invariant and the rate readout is the ANN's."""

    name = "echo"
    paper = "none (a test of the method registry)"
    Options = EchoOptions
    semantics = MEAN

    def calibration(self, job: Job) -> Calibration:
        return Calibration(taps=[], neuron_sites=[])

    def rewrite(self, job: Job, stats: dict) -> dict:
        return {"label": job.options.label}


@pytest.fixture
def echo():
    methods.register(Echo())
    yield
    del METHODS["echo"]


def test_a_registered_method_compiles_and_runs(echo):
    x = np.random.default_rng(1).standard_normal((5, FEATURES)).astype(np.float32)
    snn = spikec.compile(mlp(), {"x": x}, method="echo", timesteps=3, label="probe", progress=False)
    record = SpikecMetadata.read(snn)
    assert (record.method, record.mode, record.timesteps) == ("echo", "unrolled", 3)
    assert record.options == {"label": "probe", "gain": 1.0} and record.report.extra["label"] == "probe"
    got = run(InferenceSession(snn), {"x": x}, 3)["y"]
    np.testing.assert_allclose(got, run_dataset(mlp(), {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_its_options_validate_and_belong_to_it(echo):
    x = np.zeros((2, FEATURES), np.float32)
    with pytest.raises(spikec.SpikecError, match=r"gain=11: expected a number in \[0, 10\] for method echo"):
        spikec.compile(mlp(), {"x": x}, method="echo", gain=11, progress=False)
    with pytest.raises(
        spikec.SpikecError,
        match=r"unknown compile option\(s\) for method echo: percentile "
        r"\(an option of method ecmt\)",
    ):
        spikec.compile(mlp(), {"x": x}, method="echo", percentile=90, progress=False)


def test_the_cli_generates_its_flags(echo, tmp_path, capfd):
    model, calib, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "snn.onnx"
    onnx.save(mlp(), model)
    np.savez(calib, x=np.ones((4, FEATURES), np.float32))
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(out),
                "--calib",
                str(calib),
                "--method",
                "echo",
                "--label",
                "cli",
                "--gain",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert SpikecMetadata.read(onnx.load(out)).options == {"label": "cli", "gain": 2.0}
    capfd.readouterr()
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--label", "x"]) == 2
    assert capfd.readouterr().err == "spikec: error: argument --label: an option of method echo, not of ecmt\n"


def test_time_steps_default_to_the_methods_own(echo):
    """Without --timesteps each method gets its own T: ECMT's 8 would leave STA's IF rate code and SpikeZIP-TF's
    sum code far from their references."""
    x = np.random.default_rng(2).standard_normal((8, FEATURES)).astype(np.float32)
    Echo.default_timesteps = 5
    try:
        record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="echo", progress=False))
        assert record.timesteps == 5
    finally:
        del Echo.default_timesteps
    assert METHODS["sta"].default_timesteps == 64
    record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="sta", verify=False, progress=False))
    assert record.timesteps == 64 and record.report.equilibrium is None and record.report.timesteps_search is None
    # ECMT's is measured, the fewest steps from 8 meeting its bound (below); with --unbias, whose gains
    # are measured at T, it is 8
    record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="ecmt", verify=False, progress=False))
    assert record.timesteps == 8 and record.report.timesteps_search["tried"][0][0] == 8
    record = SpikecMetadata.read(
        spikec.compile(mlp(), {"x": x}, method="ecmt", unbias=True, verify=False, progress=False)
    )
    assert record.timesteps == 8 and record.report.timesteps_search is None
    # SpikeZIP-TF's is measured (tests/test_integer.py): without verification, on calibration samples
    assert METHODS["spikezip"].default_timesteps is None
    record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="spikezip", verify=False, progress=False))
    measured = record.report.equilibrium
    assert measured["samples"] == 1 and not measured["held_out"] and None not in measured["steps_to_quiet"]
    assert record.timesteps == 8 * math.ceil(measured["steps_to_quiet"][0] * 1.25 / 8)
    explicit = spikec.compile(mlp(), {"x": x}, method="sta", timesteps=3, verify=False, progress=False)
    assert SpikecMetadata.read(explicit).timesteps == 3


def test_ecmt_takes_the_fewest_steps_that_meet_its_bound(tmp_path, capfd):
    """An ECMT SNN nears its ANN as T grows, as fast as the model lets it: without --timesteps the compile
    runs a stateful copy on the held-out samples and takes the first multiple of 8 at which every output
    meets the bound, the T the SNN is then verified at."""
    x = np.random.default_rng(2).standard_normal((64, FEATURES)).astype(np.float32)
    # one threshold pair per neuron (--levels 1): too coarse for the bound at 8 steps, enough at 16
    record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="ecmt", levels=1, progress=False))
    search, verified = record.report.timesteps_search, record.report.verification
    assert [t for t, _ in search["tried"]] == [8, 16] and search["met"] and record.timesteps == 16
    assert search["tried"][0][1] < 0.99 <= search["tried"][1][1]
    assert search["samples"] == verified["samples"] == 8 and search["held_out"]
    assert verified["timesteps"] == 16
    # the stateful copy's output after 16 steps is the unrolled model's
    assert verified["outputs"]["y"]["cosine"] == pytest.approx(search["tried"][1][1], abs=1e-5)
    # the command line says how it chose T
    model, calib, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "snn.onnx"
    onnx.save(mlp(), model)
    np.savez(calib, x=x)
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--levels", "1", "--quiet"]) == 0
    said = capfd.readouterr().out.splitlines()[0]
    assert said == (
        f"T=16: the fewest steps (a multiple of 8) at which the SNN meets cosine >= 0.99 against the ANN on 8 "
        f"held-out calibration samples (cosine {search['tried'][1][1]:.4g}; {search['tried'][0][1]:.4g} at T=8)"
    )
    # and so does the report
    np.savez(tmp_path / "inputs.npz", x=x[:8])
    assert (
        main(
            [
                "report",
                str(model),
                str(out),
                "--inputs",
                str(tmp_path / "inputs.npz"),
                "-o",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )
    section = json.loads((tmp_path / "r" / "report.json").read_text())["section"]
    assert section["compile_timesteps_search"]["timesteps"] == 16
    assert "The compile chose T=16: the fewest steps (a multiple of 8)" in (tmp_path / "r" / "index.html").read_text()
    # the same network at a T given is what the search measured at that T
    with pytest.warns(spikec.compiler.FidelityWarning, match="against the ANN at T=8, short of"):
        given = spikec.compile(mlp(), {"x": x}, method="ecmt", levels=1, timesteps=8, progress=False)
    given = SpikecMetadata.read(given)
    assert given.report.timesteps_search is None
    assert given.report.verification["outputs"]["y"]["cosine"] == pytest.approx(search["tried"][0][1], abs=1e-5)


def test_ecmt_short_of_its_bound_at_every_t_takes_the_closest(monkeypatch):
    """Where no T up to 64 meets the bound the search runs rounds of 8, 16, 32 and 64 steps, takes the T
    that came closest, and the compile warns as at a T given."""
    monkeypatch.setattr(METHODS["ecmt"], "bound", methods.base.Bound("cosine", 0.999999))
    x = np.random.default_rng(2).standard_normal((64, FEATURES)).astype(np.float32)
    with pytest.warns(spikec.compiler.FidelityWarning, match="short of ecmt's bound"):
        record = SpikecMetadata.read(spikec.compile(mlp(), {"x": x}, method="ecmt", levels=1, progress=False))
    search = record.report.timesteps_search
    assert [t for t, _ in search["tried"]] == list(range(8, 65, 8)) and not search["met"]
    best = max(search["tried"], key=lambda tried: tried[1])
    assert record.timesteps == best[0] and search["timesteps"] == best[0]
