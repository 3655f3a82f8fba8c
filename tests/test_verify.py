"""Compile verifies what it emits on calibration samples it held out (issue 18): an SNN that fails or
answers inf/NaN is refused, one below its method's bound is written with a warning, the fidelity is
recorded in the model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import FEATURES, mlp
from spikec.passes.options import Options
from spikec.runtime.metadata import CompileReport, SpikecMetadata

import spikec
from spikec import methods
from spikec.cli import main
from spikec.compiler import FidelityWarning, split_held_out
from spikec.methods import METHODS, Calibration, Job, Method
from spikec.methods.base import MEAN


def _samples(count: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, FEATURES)).astype(np.float32)


@dataclass(frozen=True)
class NoOptions(Options):
    pass


class Sqrt(Method):
    """Takes the square root of the output: finite on the calibration data it saw (made non-negative
    below), NaN on anything negative."""

    name = "sqrt"
    paper = "none (a broken conversion)"
    Options = NoOptions
    semantics = MEAN

    def calibration(self, job: Job) -> Calibration:
        return Calibration(taps=[], neuron_sites=[])

    def rewrite(self, job: Job, stats: dict) -> dict:
        (output,) = job.graph.outputs
        inner = gs.Variable("y.inner", dtype=np.float32)
        for node in job.graph.nodes:
            node.outputs = [inner if t is output else t for t in node.outputs]
        job.graph.nodes.append(gs.Node("Sqrt", "broken", inputs=[inner], outputs=[output]))
        return {}


@pytest.fixture
def broken():
    methods.register(Sqrt())
    yield
    del METHODS["sqrt"]


def test_an_snn_answering_nan_is_refused_and_not_written(broken, tmp_path):
    out = tmp_path / "snn.onnx"
    with pytest.raises(
        spikec.SpikecError,
        match=r"outputs \d+ inf/NaN value\(s\) in 'y' on 2 held-out calibration "
        r"sample\(s\) where the ANN is finite; nothing was written",
    ):
        spikec.compile(mlp(), {"x": _samples(16)}, out, method="sqrt", progress=False)
    assert not out.exists()
    # --no-verify skips the run: the model is valid, and written
    spikec.compile(mlp(), {"x": _samples(16)}, out, method="sqrt", verify=False, progress=False)
    assert out.exists() and SpikecMetadata.read(onnx.load(out)).report.verification is None


def test_fidelity_is_measured_recorded_and_shown(tmp_path, capfd):
    model, calib, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "snn.onnx"
    onnx.save(mlp(), model)
    np.savez(calib, x=_samples(24))
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "-T", "16", "--quiet"]) == 0
    stdout, stderr = capfd.readouterr()
    verification = SpikecMetadata.read(onnx.load(out)).report.verification
    assert (
        verification["samples"],
        verification["held_out"],
        verification["reference"],
        verification["timesteps"],
    ) == (3, True, "ANN", 16)
    cosine = verification["outputs"]["y"]["cosine"]
    assert 0.99 <= cosine <= 1.0 and stderr == ""
    assert stdout.splitlines()[0] == (
        f"verified on 3 held-out calibration samples against the ANN at T=16: y cosine "
        f"{cosine:.4f}, relative max error "
        f"{verification['outputs']['y']['relative_max_error']:.2e}"
    )
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["verification"] == verification


def test_below_the_methods_bound_it_warns_and_writes(tmp_path):
    out = tmp_path / "snn.onnx"
    with pytest.warns(
        FidelityWarning,
        match=r"output 'y' on 2 held-out calibration samples: cosine 0\.\d+ against "
        r"the ANN at T=1, short of ecmt's bound \(cosine >= 0\.99\): raise "
        r"--timesteps",
    ):
        spikec.compile(mlp(), {"x": _samples(16)}, out, timesteps=1, progress=False)
    assert out.exists()


def test_held_out_samples_are_spread_and_never_calibrated_on():
    feeds = {"x": np.arange(40, dtype=np.float32)[:, None]}
    kept, (held, apart) = split_held_out(feeds)
    assert apart and held["x"].ravel().tolist() == [0, 10, 20, 29, 39]  # one in eight, first to last
    assert sorted([*kept["x"].ravel(), *held["x"].ravel()]) == list(range(40))
    kept, (held, apart) = split_held_out({"x": feeds["x"][:16]}, batch=4)  # 2 would leave 14: 4 leave 12
    assert apart and len(held["x"]) == 4 and len(kept["x"]) == 12
    kept, (held, apart) = split_held_out({"x": feeds["x"][:1]})  # nothing to spare: verified on what it saw
    assert not apart and kept["x"].tolist() == held["x"].tolist() == [[0.0]]
    assert len(split_held_out({"x": np.zeros((1000, 1))})[1][0]["x"]) == 32


def test_given_verification_samples_are_verified_on_and_all_calibration_calibrates():
    calibration, verification = {"x": _samples(24)}, {"x": _samples(5) + 3.0}
    snn = spikec.compile(mlp(), calibration, timesteps=16, verification=verification, progress=False)
    record = SpikecMetadata.read(snn).report.verification
    assert (record["samples"], record["held_out"]) == (5, True)
    # the same thresholds as a compile that verifies nothing: every calibration sample calibrated
    unverified = spikec.compile(mlp(), calibration, timesteps=16, verify=False, progress=False)
    assert [t.raw_data for t in snn.graph.initializer] == [t.raw_data for t in unverified.graph.initializer]
    with pytest.raises(spikec.SpikecError, match="^argument verification: .* but verify=False"):
        spikec.compile(mlp(), calibration, verification=verification, verify=False, progress=False)


def test_the_compile_report_round_trips_its_json():
    """The typed report writes back the JSON it was read from: typed keys and a method's own keys alike."""
    written = {
        "semantics": "sum",
        "neurons": [{"tensor": "a", "node": "a/STBIFNeuron"}],
        "ppn_folded_products": 3,
        "verification": {"samples": 2},
    }
    report = CompileReport.from_json(written)
    assert report.neurons == written["neurons"] and report.extra == {"ppn_folded_products": 3}
    assert report.to_json() == written and report.encoders is None
    with pytest.raises(ValueError, match="ugos"):
        CompileReport.from_json({"ugos": {"region": "x"}})
