"""The spikec command line end to end on the digits ViT, and its contract for bad input.

Contract: bad input is rejected with exactly one stderr line ``spikec: error: ...`` naming the culprit
and exit code 2, never a traceback; outputs are written atomically, the input model is never modified
and no partial file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from spikec.runtime.metadata import SpikecMetadata

import spikec
import spikec.modelio
from examples import fixtures
from spikec.cli import inspect_model, main
from spikec.compiler import split_held_out
from spikec.evaluate import cosine, run_dataset
from spikec.methods.spikezip import integer_qann

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`

REPO_ROOT = Path(__file__).resolve().parents[1]
T = 4


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m spikec.cli`` in a fresh process: what a user's shell sees, C-level logging included."""
    return subprocess.run(
        [sys.executable, "-m", "spikec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        timeout=120,
    )


def _assert_one_error_line(err: str, *culprits: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spikec: error: "), err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def _fails(capfd, argv, *culprits) -> str:
    """Run main in-process (capfd also sees onnxruntime's C++ logging on fd 2) and expect a clean error."""
    assert main([str(a) for a in argv]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    return _assert_one_error_line(err, *culprits)


def _listing(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit() -> Path:
    return fixtures.digits_vit()


@pytest.fixture(scope="module")
def data():
    return {
        "calib": fixtures.fixture_npz("digits-calib"),
        "eval": fixtures.fixture_npz("digits-eval"),
        "labels": fixtures.fixture_npz("digits-eval-labels"),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def unrolled(vit, data, work) -> Path:
    """Unrolled T=4 SNN compiled by a real `spikec compile` process."""
    out = work / "unrolled.onnx"
    proc = _cli("compile", vit, "-o", out, "-T", T, "--calib", data["calib"], "--quiet")
    assert proc.returncode == 0, proc.stderr
    verified, wrote = proc.stdout.splitlines()
    assert verified.startswith("verified on 32 held-out calibration samples against the ANN at T=4: logits cosine ")
    assert wrote == f"wrote {out}"
    # no onnxruntime optimizer chatter, no progress bar, and with the default thresholds (p=90 per channel)
    # T=4 already meets ECMT's bound: no warning
    assert proc.stderr == ""
    return out


@pytest.fixture(scope="module")
def run_output(unrolled, data, work) -> dict[str, np.ndarray]:
    out = work / "run.npz"
    proc = _cli("run", unrolled, "--inputs", data["eval"], "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "logits [540, 10]" in proc.stdout and "logits.steps [4, 540, 10]" in proc.stdout
    with np.load(out) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def ann_logits(vit, data) -> np.ndarray:
    """The ANN's logits from plain onnxruntime, independent of spikec."""
    with np.load(data["eval"]) as arrays:
        pixels = arrays["pixels"]
    session = ort.InferenceSession(str(vit), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0]


@pytest.fixture
def small(tmp_path):
    """Scratch dir with a copy of the ViT and a 16-sample calibration set."""
    pixels = fixtures.digits_data()["x_train"][:16]
    model = tmp_path / "vit.onnx"
    model.write_bytes(fixtures.digits_vit().read_bytes())
    np.savez(tmp_path / "calib.npz", pixels=pixels)
    return tmp_path, model, tmp_path / "calib.npz", pixels


# --------------------------------------------------------------------------
# compile -> run -> eval -> inspect
# --------------------------------------------------------------------------


def test_run_writes_final_and_per_step_logits(run_output):
    assert set(run_output) == {"logits", "logits.steps"}
    assert run_output["logits"].shape == (540, 10)
    assert run_output["logits.steps"].shape == (T, 540, 10)
    np.testing.assert_array_equal(run_output["logits.steps"][-1], run_output["logits"])


def test_eval_json_matches_independent_recomputation(vit, unrolled, data, run_output, ann_logits):
    proc = _cli("eval", vit, unrolled, "--inputs", data["eval"], "--labels", data["labels"], "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result = json.loads(proc.stdout)
    assert list(result) == ["logits"]
    rows = result["logits"]["per_t"]
    assert [r["t"] for r in rows] == [1, 2, 3, 4]
    with np.load(data["labels"]) as arrays:
        labels = arrays["labels"]
    ann_accuracy = float(np.mean(ann_logits.argmax(1) == labels))
    assert result["logits"]["ann_accuracy"] == pytest.approx(ann_accuracy, abs=1e-12)
    assert ann_accuracy >= 0.965
    assert rows[-1]["accuracy"] >= ann_accuracy - 0.02
    # cosine at T=4 from the `run` output, with the formula written out here
    snn = run_output["logits"].astype(np.float64)
    ann = ann_logits.astype(np.float64)
    cosines = (snn * ann).sum(1) / (np.linalg.norm(snn, axis=1) * np.linalg.norm(ann, axis=1))
    assert rows[-1]["cosine"] == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert rows[-1]["cosine"] > 0.95
    assert rows[-1]["accuracy"] == pytest.approx(float(np.mean(snn.argmax(1) == labels)), abs=1e-12)
    assert rows[-1]["top1_agreement"] == pytest.approx(float(np.mean(snn.argmax(1) == ann.argmax(1))), abs=1e-12)
    assert rows[-1]["max_abs_error"] == pytest.approx(float(np.abs(snn - ann).max()), rel=1e-4)
    # rate coding converges with T
    assert rows[0]["cosine"] < rows[1]["cosine"] < rows[-1]["cosine"]


def test_inspect_json(unrolled, capfd):
    assert main(["inspect", str(unrolled), "--json"]) == 0
    info = json.loads(capfd.readouterr().out)
    assert (info["method"], info["mode"], info["timesteps"]) == ("ecmt", "unrolled", T)
    assert info["options"]["levels"] == 8
    counts = {(r["domain"], r["op"]): r["count"] for r in info["ops"]}
    spiking = {op: c for (domain, op), c in counts.items() if domain == "spikec"}
    assert set(spiking) == {"MTNeuron", "ECAccumulate", "ECCompensate"}
    assert spiking["MTNeuron"] == len(info["neurons"]) == 4 * 8 + 1
    # the histogram counts exactly the nodes in the file
    model = onnx.load(unrolled, load_external_data=False)
    assert sum(counts.values()) == len(model.graph.node)
    assert sum(1 for n in model.graph.node if n.domain == "spikec" and n.op_type == "MTNeuron") == spiking["MTNeuron"]
    assert info["inputs"] == ["pixels"]
    assert "logits" in info["outputs"] and "logits.steps" in info["outputs"]


def test_inspect_table(unrolled, capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(unrolled)]) == 0
    out = capfd.readouterr().out
    assert "method=ecmt" in out and "mode=unrolled" in out and f"T={T}" in out
    assert "MTNeuron" in out and "ECCompensate" in out and "ECAccumulate" in out


def test_inspect_into_a_pipe_cuts_no_name(unrolled, tmp_path):
    """Into a file or a pipe (no terminal, no COLUMNS) every node and tensor name is whole, for grep."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [sys.executable, "-m", "spikec.cli", "inspect", str(unrolled)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    names = [site["tensor"] for site in inspect_model(unrolled)["neurons"]]
    assert names and all(name in proc.stdout for name in names)


def test_stateful_run_matches_unrolled(vit, data, run_output, tmp_path, capfd):
    stateful = tmp_path / "stateful.onnx"
    assert (
        main(
            [
                "compile",
                str(vit),
                "-o",
                str(stateful),
                "-T",
                str(T),
                "--mode",
                "stateful",
                "--calib",
                str(data["calib"]),
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "stateful.npz"
    assert (
        main(["run", str(stateful), "--inputs", str(data["eval"]), "-o", str(out), "--timesteps", str(T), "--quiet"])
        == 0
    )
    _, err = capfd.readouterr()
    assert err == ""  # the default thresholds meet the bound at T=4
    with np.load(out) as got:
        assert got["logits.steps"].shape == (T, 540, 10)
        np.testing.assert_allclose(got["logits.steps"], run_output["logits.steps"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["logits"], run_output["logits"], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# determinism and atomic output
# --------------------------------------------------------------------------


def test_compile_is_deterministic_across_processes(vit, data, unrolled, tmp_path, capfd):
    """The same compile in this process gives the bytes the `unrolled` subprocess wrote."""
    again = tmp_path / "again.onnx"
    assert main(["compile", str(vit), "-o", str(again), "-T", str(T), "--calib", str(data["calib"]), "--quiet"]) == 0
    assert again.read_bytes() == unrolled.read_bytes()


def test_compile_twice_in_process_is_byte_identical(small):
    tmp, model, calib, _ = small
    spikec.compile(model, calib, tmp / "a.onnx", timesteps=2, progress=False)
    spikec.compile(model, calib, tmp / "b.onnx", timesteps=2, progress=False)
    assert (tmp / "a.onnx").read_bytes() == (tmp / "b.onnx").read_bytes()


def test_interrupted_compile_leaves_no_partial_file(small, monkeypatch, capfd):
    tmp, model, calib, pixels = small
    outdir = tmp / "out"
    outdir.mkdir()
    out = outdir / "snn.onnx"
    real_save = onnx.save_model
    seen = []

    def interrupted_save(proto, path, *args, **kwargs):
        real_save(proto, path, *args, **kwargs)
        seen.append(Path(path))
        assert Path(path).parent == outdir and Path(path) != out and Path(path).exists()
        with open(path, "r+b") as handle:  # a half-written file
            handle.truncate(Path(path).stat().st_size // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(spikec.modelio.onnx, "save_model", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        spikec.compile(model, {"pixels": pixels}, out, timesteps=2, progress=False)
    assert seen and not out.exists()
    assert list(outdir.iterdir()) == []

    # the CLI reports the interrupt on one line, exits 130, leaves nothing behind
    assert main(["compile", str(model), "-o", str(out), "-T", "2", "--calib", str(calib), "--quiet"]) == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == "spikec: interrupted (SIGINT)"
    assert len(seen) == 2 and list(outdir.iterdir()) == []


# --------------------------------------------------------------------------
# bad input: one line, exit 2, culprit named, nothing written
# --------------------------------------------------------------------------


def test_missing_model_file_subprocess(small):
    tmp, _, calib, _ = small
    proc = _cli("compile", tmp / "nope.onnx", "-o", tmp / "out.onnx", "--calib", calib)
    assert proc.returncode == 2 and proc.stdout == ""
    _assert_one_error_line(proc.stderr, "nope.onnx", "no such file")
    assert not (tmp / "out.onnx").exists()


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_corrupt_model_file_subprocess(small, kind):
    tmp, model, calib, _ = small
    bad = tmp / f"{kind}.onnx"
    raw = model.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else np.random.default_rng(0).bytes(4096))
    for argv in (
        ["compile", bad, "-o", tmp / "out.onnx", "--calib", calib],
        ["run", bad, "--inputs", calib, "-o", tmp / "out.npz"],
        ["inspect", bad],
    ):
        proc = _cli(*argv)
        assert proc.returncode == 2 and proc.stdout == "", argv
        _assert_one_error_line(proc.stderr, bad.name)
    assert not (tmp / "out.onnx").exists() and not (tmp / "out.npz").exists()


def test_eval_with_missing_snn_subprocess(small):
    tmp, model, calib, _ = small
    proc = _cli("eval", model, tmp / "missing-snn.onnx", "--inputs", calib)
    assert proc.returncode == 2 and proc.stdout == ""
    _assert_one_error_line(proc.stderr, "missing-snn.onnx", "no such file")


@pytest.mark.parametrize(
    "arrays, culprits",
    [
        ({}, ["'pixels'", "missing"]),
        ({"pixels": "ok", "bogus": "ok"}, ["'bogus'"]),
        ({"pixels": "nan"}, ["'pixels'", "NaN"]),
        ({"pixels": "empty"}, ["'pixels'", "zero samples"]),
        ({"pixels": "rank3"}, ["'pixels'", "rank 4"]),
    ],
    ids=["missing-input", "extra-key", "nan", "zero-samples", "wrong-rank"],
)
def test_bad_calibration_npz(small, capfd, arrays, culprits):
    tmp, model, _, pixels = small
    variants = {
        "ok": pixels,
        "nan": np.where(np.arange(pixels.size).reshape(pixels.shape) == 5, np.nan, pixels),
        "empty": pixels[:0],
        "rank3": pixels[:, 0],
    }
    bad = tmp / "bad-calib.npz"
    np.savez(bad, **{k: variants[v] for k, v in arrays.items()})
    before = _listing(tmp)
    _fails(capfd, ["compile", model, "-o", tmp / "out.onnx", "--calib", bad], "bad-calib.npz", *culprits)
    assert _listing(tmp) == before


@pytest.mark.parametrize(
    "extra, culprits",
    [
        (["--timesteps", "0"], ["timesteps=0"]),
        (["--timesteps", "100000"], ["timesteps=100000"]),
        (["--levels", "0"], ["levels=0"]),
        (["--percentile", "10"], ["percentile"]),
        (["--batch-size", "0"], ["argument --batch-size=0"]),
        (["--input-shape", "pixels"], ["--input-shape", "'pixels'"]),
        (["--input-shape", "=1,2"], ["--input-shape"]),
        (["--input-shape", "pixels=batch,1,8"], ["'pixels'", "rank"]),
        (["--input-shape", "pixels=batch,1,8,0"], ["'pixels'", "dim 0"]),
        (["--input-shape", "nope=1,1,8,8"], ["'nope'"]),
        (["--input-shape", "pixels=1x1x8x8"], ["dim '1x1x8x8' is neither an integer nor a name", "commas"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_bad_compile_arguments(small, capfd, extra, culprits):
    tmp, model, calib, _ = small
    before = _listing(tmp)
    _fails(capfd, ["compile", model, "-o", tmp / "out.onnx", "--calib", calib, *extra], *culprits)
    assert _listing(tmp) == before


def test_output_equal_to_input_is_rejected_and_input_untouched(small, capfd):
    tmp, model, calib, _ = small
    before = _listing(tmp)
    _fails(capfd, ["compile", model, "-o", model, "--calib", calib], "vit.onnx", "is the input model")
    # also when spelled differently
    _fails(capfd, ["compile", model, "-o", tmp / "." / "vit.onnx", "--calib", calib], "is the input model")
    assert _listing(tmp) == before


def test_output_in_missing_directory(small, capfd):
    tmp, model, calib, _ = small
    before = _listing(tmp)
    _fails(capfd, ["compile", model, "-o", tmp / "no-such-dir" / "out.onnx", "--calib", calib], "no-such-dir")
    assert not (tmp / "no-such-dir").exists() and _listing(tmp) == before


def test_run_errors(unrolled, small, capfd):
    tmp, model, calib, pixels = small
    out = tmp / "out.npz"
    np.savez(tmp / "no-pixels.npz")
    before = _listing(tmp)
    _fails(
        capfd, ["run", unrolled, "--inputs", tmp / "no-pixels.npz", "-o", out], "no-pixels.npz", "'pixels'", "missing"
    )
    _fails(capfd, ["run", unrolled, "--inputs", tmp / "absent.npz", "-o", out], "absent.npz")
    _fails(capfd, ["run", tmp / "absent.onnx", "--inputs", calib, "-o", out], "absent.onnx")
    _fails(capfd, ["run", unrolled, "--inputs", calib, "-o", out, "--batch-size", "0"], "--batch-size=0")
    _fails(capfd, ["run", unrolled, "--inputs", calib, "-o", out, "--timesteps", "0"], "timesteps=0")
    # an unrolled model's T is fixed: a different --timesteps must not be silently ignored
    _fails(
        capfd,
        ["run", unrolled, "--inputs", calib, "-o", out, "--timesteps", "8"],
        "timesteps=8",
        f"{unrolled} is unrolled",
    )
    _fails(capfd, ["run", unrolled, "--inputs", calib, "-o", tmp / "nodir" / "o.npz"], "nodir")
    _fails(capfd, ["run", unrolled, "--inputs", calib, "-o", calib], "calib.npz", "is the --inputs file")
    _fails(capfd, ["run", unrolled, "--inputs", calib, "-o", unrolled], "unrolled.onnx", "is the input model")
    assert _listing(tmp) == before


def test_eval_errors(unrolled, small, capfd):
    tmp, model, calib, pixels = small
    _fails(capfd, ["eval", model, tmp / "absent-snn.onnx", "--inputs", calib], "absent-snn.onnx")
    # an ANN where the SNN should be: named, before anything runs
    _fails(capfd, ["eval", model, model, "--inputs", calib], "vit.onnx", "not a spikec model")
    np.savez(tmp / "bad-labels.npz", labels=np.zeros((len(pixels), 1), np.int64))
    _fails(
        capfd,
        ["eval", model, unrolled, "--inputs", calib, "--labels", tmp / "bad-labels.npz"],
        "bad-labels.npz",
        f"shape [{len(pixels)}]",
    )
    np.savez(tmp / "empty-labels.npz")
    _fails(
        capfd, ["eval", model, unrolled, "--inputs", calib, "--labels", tmp / "empty-labels.npz"], "empty-labels.npz"
    )
    _fails(
        capfd, ["eval", model, unrolled, "--inputs", calib, "--labels", tmp / "absent-labels.npz"], "absent-labels.npz"
    )
    # a class the output does not have would read as accuracy 0: refused
    np.savez(tmp / "class-12.npz", labels=np.full(len(pixels), 12, np.int64))
    _fails(
        capfd,
        ["eval", model, unrolled, "--inputs", calib, "--labels", tmp / "class-12.npz"],
        "class index 12 is not one of the output's 10 classes",
    )


def test_levels_zero_rejected_by_the_api():
    with pytest.raises(spikec.SpikecError, match=r"levels=0"):
        spikec.compile(fixtures.digits_vit(), {"pixels": np.zeros((2, 1, 8, 8), np.float32)}, levels=0)


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        (
            "compile",
            (None, "calibration"),
            r"^input model: expected an ONNX file's path or an onnx.ModelProto, got NoneType$",
        ),
        ("quantize", (3, "calibration"), r"^input model: .* got int$"),
        ("finetune", (None, "calibration"), r"^input model: .* got NoneType$"),
        ("compile", ("model", None), r"^calibration data: expected an .npz file's path or a mapping .* got NoneType$"),
        ("quantize", ("model", 3), r"^calibration data: .* got int$"),
        ("compile", ("model", "calibration", 7.0), r"^output: expected a file path \(or None\), got float$"),
    ],
)
def test_api_arguments_of_a_wrong_type_are_refused_by_name(function, arguments, message):
    sources = {"model": fixtures.digits_vit(), "calibration": {"pixels": np.zeros((2, 1, 8, 8), np.float32)}}
    arguments = [sources.get(a, a) if isinstance(a, str) else a for a in arguments]
    with pytest.raises(spikec.SpikecError, match=message):
        getattr(spikec, function)(*arguments, progress=False)


def test_inspect_into_a_closed_pipe(unrolled):
    """`spikec inspect --json | head -1`: the reader goes away early; no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spikec.cli", "inspect", str(unrolled), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()  # more than a pipe buffer (64 KiB) is still to come: the next write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert err == "", err


# --------------------------------------------------------------------------
# SpikeZIP-TF: quantize -> compile -> run until quiet -> eval against the QANN
# --------------------------------------------------------------------------


def test_spikezip_cli_flow(small, data, capfd):
    tmp, model, calib, _ = small
    qann, snn = tmp / "qann.onnx", tmp / "zip.onnx"
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(snn),
                "--method",
                "spikezip",
                "--levels",
                "8",
                "--mode",
                "stateful",
                "-T",
                "64",
                "--calib",
                str(calib),
                "--save-qann",
                str(qann),
                "--quiet",
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    verified, *wrote = out.splitlines()
    assert wrote == [f"wrote {qann} (the quantized ANN)", f"wrote {snn}"]
    # integer-exact by default: held to the integer QANN, bit for bit; and what quantizing cost, said
    match = re.fullmatch(
        r"verified on (\d+) held-out calibration samples against the integer QANN at T=64: logits cosine "
        r"1\.0000, relative max error 0\.00e\+00; the integer QANN against the input model: logits cosine "
        r"([\d.]+), relative max error [\d.e+-]+",
        verified,
    )
    assert match, verified
    held = split_held_out(dict(np.load(calib)))[1][0]
    assert len(next(iter(held.values()))) == int(match[1])
    quantizing = cosine(run_dataset(model, held)["logits"], run_dataset(integer_qann(onnx.load(qann)), held)["logits"])
    assert float(match[2]) == pytest.approx(quantizing, abs=1e-4) and quantizing < 0.9999
    assert err == ""
    # `spikec quantize` writes the QANN compile makes from all the calibration data (verification holds
    # some samples out of the quantization too)
    assert (
        main(["quantize", str(model), "-o", str(tmp / "q2.onnx"), "--levels", "8", "--calib", str(calib), "--quiet"])
        == 0
    )
    # one line says what was quantized and refit, counted as the model written has them
    written = onnx.load(tmp / "q2.onnx")
    scales = [onnx.numpy_helper.to_array(t) for t in written.graph.initializer if t.name.endswith(".quant_scale")]
    summary = capfd.readouterr().out.strip()
    match = re.fullmatch(
        r"(\d+) quantizers \((\d+) per channel\); refit (\d+) of (\d+) weight products \(held-back error, "
        r"median: ([\d.e-]+) -> ([\d.e-]+) of the target's\); wrote (.+)",
        summary,
    )
    assert match, summary
    assert int(match[1]) == len(scales) > 0 and int(match[2]) == sum(s.size > 1 for s in scales)
    assert 0 < int(match[3]) <= int(match[4]) and float(match[6]) < float(match[5])
    assert match[7] == str(tmp / "q2.onnx")
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(tmp / "zip2.onnx"),
                "--method",
                "spikezip",
                "--levels",
                "8",
                "--calib",
                str(calib),
                "--save-qann",
                str(tmp / "q3.onnx"),
                "--no-verify",
                "--quiet",
            ]
        )
        == 0
    )
    # without --timesteps, SpikeZIP-TF's T is measured (spikec/equilibrium.py), and the first line says so
    said = capfd.readouterr().out.splitlines()[0]
    match = re.fullmatch(
        r"T=(\d+): the steps until no neuron fires on (\d+) calibration samples, at most (\d+), plus 25 %", said
    )
    assert match, said
    held = split_held_out(dict(np.load(calib)))[1][0]
    assert int(match[2]) == len(next(iter(held.values()))) and int(match[1]) == 8 * math.ceil(int(match[3]) * 1.25 / 8)
    assert SpikecMetadata.read(onnx.load(tmp / "zip2.onnx")).timesteps == int(match[1])
    assert onnx.load(tmp / "q2.onnx").graph == onnx.load(tmp / "q3.onnx").graph

    result = tmp / "run.npz"
    assert (
        main(
            [
                "run",
                str(snn),
                "--inputs",
                str(data["eval"]),
                "-o",
                str(result),
                "--until-quiet",
                "--batch-size",
                "128",
                "--quiet",
            ]
        )
        == 0
    )
    out, _ = capfd.readouterr()
    assert "T_eq (steps until no neuron fires): 540 of 540 samples quiet, max " in out
    with np.load(result) as arrays:
        steps, logits = arrays["logits.steps"], arrays["logits"]
        assert not arrays["spikec.spikes.steps"][-1].any()
        # the unrolled model's layout: spikes per step only (a last step's count is no result)
        assert sorted(arrays) == ["logits", "logits.steps", "spikec.spikes.steps"]
    assert len(steps) < 64 and steps.shape[1:] == (540, 10)
    np.testing.assert_array_equal(steps[-1], logits)

    assert (
        main(["eval", str(qann), str(snn), "--inputs", str(data["eval"]), "--json", "--quiet", "--batch-size", "540"])
        == 0
    )
    per_t = json.loads(capfd.readouterr().out)["logits"]["per_t"]
    assert per_t[-1]["top1_agreement"] >= 0.99 and per_t[0]["top1_agreement"] < 0.9

    assert main(["inspect", str(snn), "--json"]) == 0
    info = json.loads(capfd.readouterr().out)
    spiking = {row["op"]: row["count"] for row in info["ops"] if row["domain"] == "spikec"}
    assert spiking["STBIFIntegerNeuronStep"] == len(info["neurons"]) == info["neuron_counts"]["neuron_nodes"] == 42
    labels = {op for row in info["rewrites"] for op in row["spikec_ops"]}
    assert any(op.startswith("STBIFIntegerNeuron(theta=") and "tracer [0, 7]" in op for op in labels)  # softmax
    # per-channel splits of the 8 levels: each channel's bounds are 7 levels apart
    splits = [re.search(r"tracer \[(-?\d+) \.\. (-?\d+), (-?\d+) \.\. (-?\d+)\] per channel", op) for op in labels]
    bounds = [[int(v) for v in m.groups()] for m in splits if m]
    assert bounds and all(
        low_min + 7 == high_min and low_max + 7 == high_max for low_min, low_max, high_min, high_max in bounds
    )
    # integer-exact: softmax, LayerNorm, GELU and Q K^T run on the neurons' totals, as the QANN on its levels
    totals = {row["kind"] for row in info["rewrites"] if any("running totals" in op for op in row["spikec_ops"])}
    assert {"softmax", "layernorm", "gelu", "act_matmul"} <= totals
    assert not any("per-step values" in op for op in labels)


def test_spikezip_cli_errors(small, capfd):
    tmp, model, calib, _ = small
    _fails(
        capfd,
        ["compile", model, "-o", tmp / "o.onnx", "--calib", calib, "--method", "spikezip", "--levels", "1"],
        "levels=1",
        "spikezip",
    )
    _fails(
        capfd,
        ["compile", model, "-o", tmp / "o.onnx", "--calib", calib, "--save-qann", tmp / "q.onnx"],
        "--save-qann",
        "spikezip",
        "not of ecmt",
    )
    # a SpikeZIP-TF model is reported against its QANN: a float ANN alone gets a pointer to --qann
    snn = tmp / "zip.onnx"
    assert (
        main(
            ["compile", str(model), "-o", str(snn), "--method", "spikezip", "-T", "4", "--calib", str(calib), "--quiet"]
        )
        == 0
    )
    capfd.readouterr()
    _fails(capfd, ["report", model, snn, "--inputs", calib, "-o", tmp / "r"], "--qann", "spikec quantize")
    _fails(
        capfd,
        ["run", snn, "--inputs", calib, "-o", tmp / "r.npz", "--until-quiet"],
        "argument --until-quiet",
        "stateful",
    )


def test_sta_switches_reach_the_compiler(small, capfd):
    tmp, model, calib, _ = small
    out = tmp / "sta.onnx"
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(out),
                "--method",
                "sta",
                "-T",
                "8",
                "--calib",
                str(calib),
                "--no-ugo",
                "--no-tcsa",
                "--no-signed",
                "--burst",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    capfd.readouterr()
    snn = onnx.load(out)
    report = json.loads({p.key: p.value for p in snn.metadata_props}["spikec.report"])
    assert report["options"] == {
        "ugo": False,
        "tcsa": False,
        "signed": False,
        "burst": 1,
        "gelu_hidden": None,
        "softmax_ugo": False,
    }
    assert json.loads({p.key: p.value for p in snn.metadata_props}["spikec.options"]) == report["options"]
    neurons = [n for n in snn.graph.node if n.op_type == "X2XEncoder"]
    assert neurons and all({a.name: a.i for a in n.attribute}["signed"] == 0 for n in neurons)
    assert any("naive split" in c.get("rewrite", "") for c in report["compensated"])
    _fails(
        capfd, ["compile", model, "-o", tmp / "o.onnx", "--calib", calib, "--method", "sta", "--burst", "0"], "burst=0"
    )
    # UGO sizes are options; one without shipped weights says how to train it
    _fails(
        capfd,
        ["compile", model, "-o", tmp / "o.onnx", "--calib", calib, "--method", "sta", "--gelu-hidden", "48"],
        "N=48",
        "spikec ugo train",
    )
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(out),
                "--method",
                "sta",
                "-T",
                "8",
                "--calib",
                str(calib),
                "--gelu-hidden",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    capfd.readouterr()
    report = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["spikec.report"])
    assert {u["hidden"] for u in report["ugos"] if u["operator"] == "gelu"} == {64}
