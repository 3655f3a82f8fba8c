"""Fault injection: the command line as a careless script, a full disk or a signal meets it.

Every case runs spikec in a fresh process (``python -m spikec.cli``; where a signal must land at a chosen
point, the same ``main`` in a fresh interpreter that pauses there and announces it with a marker file)
and asserts the contract: the exit status, exactly one line on stderr, nothing left in the directory but
what was there before (old outputs byte-identical), and every input byte-identical.

The models are a two-layer MLP (a few KB) and the SNN compiled from it, so that each process costs
about a second, most of it imports.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import FEATURES, mlp
from onnx import TensorProto, helper
from spikec.runtime import InferenceSession, run_stateful

import spikec
from spikec.verify import verify

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 16


# ------------------------------------------------------------------ models and data


def _embedding() -> onnx.ModelProto:
    """ids [batch, 4] int64 -> Gather from 10 embeddings -> MatMul -> y: token ids out of range fail in
    onnxruntime, which logs the failure before raising it."""
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "table"),
            onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(count: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((count, FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Files every test copies from: the MLP (also with external data), calibration data and its ECMT SNN."""
    root = tmp_path_factory.mktemp("faults-made")
    onnx.save(mlp(), root / "mlp.onnx")
    onnx.save(mlp(), root / "ext.onnx", save_as_external_data=True, location="ext.weights", size_threshold=0)
    np.savez(root / "calib.npz", x=_samples())
    proc = _cli("compile", "mlp.onnx", "-o", "snn.onnx", "--calib", "calib.npz", "-T", "16", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def work(tmp_path, made) -> Path:
    for path in made.values():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


# ------------------------------------------------------------------ running and checking


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def _cli(*args, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    quiet = [] if args[0] == "inspect" else ["--quiet"]  # no progress bars on stderr
    return subprocess.run(
        [sys.executable, "-m", "spikec.cli", *map(str, args), *quiet],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or _env(),
        timeout=120,
        **kwargs,
    )


def _snapshot(directory: Path) -> dict[str, str]:
    """Every entry, hidden ones included: regular files by content hash, others by kind."""
    result = {}
    for path in sorted(directory.rglob("*")):
        mode = path.lstat().st_mode
        name = str(path.relative_to(directory))
        if stat.S_ISREG(mode):
            result[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            result[name] = ("symlink -> " + os.readlink(path)) if stat.S_ISLNK(mode) else stat.filemode(mode)[0]
    return result


def _one_error_line(proc: subprocess.CompletedProcess, status: int, *culprits: str) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def _refused(work: Path, *args, culprits=(), status: int = 2) -> str:
    """The command fails in one line and leaves the directory exactly as it was."""
    before = _snapshot(work)
    proc = _cli(*args, cwd=work)
    line = _one_error_line(proc, status, *culprits)
    assert line.startswith("spikec: error: "), line
    assert _snapshot(work) == before
    return line


# ------------------------------------------------------------------ 2. outputs are never inputs, nor special files


def _link(work: Path, name: str, kind: str, target: str) -> str:
    if kind == "symlink":
        os.symlink(target, work / name)  # relative, as a user makes one
    else:
        os.link(work / target, work / name)
    return name


ALIASES = {
    # -o / --save-qann equal to something the command reads, spelled as it is or through a link
    "compile -o calib": (["compile", "mlp.onnx", "-o", "calib.npz", "--calib", "calib.npz"], "calibration data"),
    "compile -o ./model": (["compile", "mlp.onnx", "-o", "./mlp.onnx", "--calib", "calib.npz"], "input model"),
    "compile -o symlink to calib": (
        ["compile", "mlp.onnx", "-o", ("symlink", "calib.npz"), "--calib", "calib.npz"],
        "calibration data",
    ),
    "compile -o hard link to calib": (
        ["compile", "mlp.onnx", "-o", ("hardlink", "calib.npz"), "--calib", "calib.npz"],
        "calibration data",
    ),
    "compile -o external data": (
        ["compile", "ext.onnx", "-o", "ext.weights", "--calib", "calib.npz"],
        "input model's external data",
    ),
    "compile -o hard link to external data": (
        ["compile", "ext.onnx", "-o", ("hardlink", "ext.weights"), "--calib", "calib.npz"],
        "input model's external data",
    ),
    "--save-qann calib": (
        [
            "compile",
            "mlp.onnx",
            "-o",
            "zip.onnx",
            "--method",
            "spikezip",
            "--calib",
            "calib.npz",
            "--save-qann",
            "calib.npz",
        ],
        "--save-qann",
    ),
    "--save-qann equal to -o": (
        [
            "compile",
            "mlp.onnx",
            "-o",
            "zip.onnx",
            "--method",
            "spikezip",
            "--calib",
            "calib.npz",
            "--save-qann",
            "zip.onnx",
        ],
        "give each output its own path",
    ),
    "quantize -o symlink to model": (
        ["quantize", "mlp.onnx", "-o", ("symlink", "mlp.onnx"), "--calib", "calib.npz"],
        "input model",
    ),
    "run -o inputs": (["run", "snn.onnx", "--inputs", "calib.npz", "-o", ("hardlink", "calib.npz")], "--inputs file"),
    "run -o model": (["run", "snn.onnx", "--inputs", "calib.npz", "-o", "snn.onnx"], "input model"),
}


@pytest.mark.parametrize("case", list(ALIASES))
def test_an_output_that_is_an_input_is_refused(work, case):
    args, culprit = ALIASES[case]
    args = [_link(work, f"link-{i}", *a) if isinstance(a, tuple) else a for i, a in enumerate(args)]
    _refused(work, *args, culprits=(culprit,))


def test_a_report_file_that_is_an_input_is_refused(work):
    (work / "report").mkdir()
    os.link(work / "calib.npz", work / "report" / "report.json")
    _refused(
        work,
        "report",
        "mlp.onnx",
        "snn.onnx",
        "--inputs",
        "calib.npz",
        "-o",
        "report",
        "--force",
        culprits=("report.json", "--inputs file"),
    )


def _special(work: Path, kind: str) -> str:
    path = work / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(os.fspath(path))
        server.close()
    else:
        try:  # a character device: /dev/null's numbers
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device file needs CAP_MKNOD (run as root)")
    return kind


@pytest.mark.parametrize("kind, what", [("fifo", "a FIFO"), ("socket", "a socket"), ("device", "a character device")])
@pytest.mark.parametrize("command", ["compile", "run", "quantize"])
def test_a_special_file_is_not_replaced(work, kind, what, command):
    target = _special(work, kind)
    args = {
        "compile": ["compile", "mlp.onnx", "--calib", "calib.npz"],
        "run": ["run", "snn.onnx", "--inputs", "calib.npz"],
        "quantize": ["quantize", "mlp.onnx", "--calib", "calib.npz"],
    }[command]
    _refused(work, *args, "-o", target, culprits=(target, what))


@pytest.mark.parametrize(
    "args",
    [
        ["compile", "fifo", "-o", "out.onnx", "--calib", "calib.npz"],
        ["compile", "mlp.onnx", "-o", "out.onnx", "--calib", "fifo"],
        ["run", "snn.onnx", "--inputs", "fifo", "-o", "out.npz"],
        ["report", "mlp.onnx", "fifo", "--inputs", "calib.npz", "-o", "report"],
    ],
    ids=lambda a: f"{a[0]} {a[a.index('fifo') - 1] if a.index('fifo') > 1 else 'model'}",
)
def test_a_special_file_as_input_is_refused_not_read(work, args):
    """Reading a FIFO nobody writes would block for ever."""
    _special(work, "fifo")
    _refused(work, *args, culprits=("fifo", "not a file"))


def test_a_directory_is_not_an_output_file(work):
    _refused(work, "compile", "mlp.onnx", "-o", "newdir/", "--calib", "calib.npz", culprits=("newdir/", "name a file"))
    (work / "existing").mkdir()
    _refused(work, "run", "snn.onnx", "--inputs", "calib.npz", "-o", "existing", culprits=("is a directory",))


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_outputs_are_created_as_the_umask_says(work, umask):
    proc = _cli(
        "compile",
        "mlp.onnx",
        "-o",
        "out.onnx",
        "--calib",
        "calib.npz",
        "-T",
        "16",
        cwd=work,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((work / "out.onnx").stat().st_mode) == 0o666 & ~umask


def test_a_model_past_the_protobuf_limit_goes_with_its_weights_beside_it(work, monkeypatch):
    """Over 2 GiB a model keeps its weights in NAME.data: staged in a private directory, moved into place
    data first, checked against the inputs like any output, and verified from the file."""
    from spikec import modelio
    from spikec import verify as verification

    monkeypatch.setattr(modelio, "_PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(verification, "_PROTOBUF_LIMIT", 1000)
    model = mlp()
    verify(model, "mlp.onnx (ecmt)")
    modelio.write([("output", work / "big.onnx", model)], modelio.reads(models=[("input model", work / "ext.onnx")]))
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(("big", "."))) == ["big.onnx", "big.onnx.data"]
    written = onnx.load(work / "big.onnx")
    for tensor in written.graph.initializer:
        tensor.ClearField("data_location")  # onnx.load marks the tensors it read from the data file
    assert written.graph == model.graph
    for kept, original in zip(model.graph.initializer, mlp().graph.initializer, strict=True):  # the caller's
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept), onnx.numpy_helper.to_array(original))
    os.rename(work / "ext.weights", work / "other.onnx.data")  # the input's weights where the output's go
    inputs = mlp()
    onnx.save(inputs, work / "in.onnx", save_as_external_data=True, location="other.onnx.data", size_threshold=0)
    with pytest.raises(spikec.SpikecError, match="other.onnx.data: is the input model's external data"):
        modelio.write(
            [("output", work / "other.onnx", model)], modelio.reads(models=[("input model", work / "in.onnx")])
        )
    assert not (work / "other.onnx").exists() and not any(".spikec-tmp-" in p.name for p in work.iterdir())


def test_an_existing_report_is_replaced_only_with_force(work):
    (work / "report").mkdir()
    for name in ("index.html", "notes.txt"):
        (work / "report" / name).write_text("the user's")
    args = ["report", "mlp.onnx", "snn.onnx", "--inputs", "calib.npz", "-o", "report"]
    _refused(work, *args, culprits=("already holds a report (index.html)", "--force"))
    proc = _cli(*args, "--force", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "report" / "index.html").read_text().startswith("<!DOCTYPE html>")
    assert (work / "report" / "notes.txt").read_text() == "the user's"  # not the report's: left alone
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["samples"] == SAMPLES and report["timesteps"] == 16


# ------------------------------------------------------------------ 3. signals and full disks

# main() in a fresh interpreter that, when MODULE.ATTR is first called, lets it run (AFTER=1) or not (0)
# yet, creates MARKER and sleeps: the test sends its signal while spikec is at that point.
# The dispositions of a command started from a terminal: a test run started with nohup or in a non-interactive
# shell's background passes SIGHUP/SIGINT on ignored, and spikec rightly leaves an ignored signal ignored.
_PAUSED = textwrap.dedent("""
    import importlib, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    module, attr, after, marker, *argv = sys.argv[1:]
    target = importlib.import_module(module)
    original = getattr(target, attr)

    def pause():
        open(marker, "w").close()
        time.sleep(60)

    def paused(*args, **kwargs):
        if after == "1":
            result = original(*args, **kwargs)
            pause()
            return result
        pause()
        return original(*args, **kwargs)

    setattr(target, attr, paused)
    from spikec.cli import main
    sys.exit(main(argv))
""")

# where a compile is when the signal comes: calibrating, verifying the model, and saving it (the
# temporary is complete, about to be renamed)
POINTS = {
    "calibration": ("spikec.calibrate", "_iterate", "0"),
    "verification": ("spikec.compiler", "verify", "0"),
    "save": ("spikec.modelio", "_sync", "1"),
}


def _paused_compile(work: Path, point: str, output: str = "out.onnx") -> tuple[subprocess.Popen, set[str]]:
    """A compile paused at ``point``; returns the process and the temporaries present while it waits."""
    marker = work.parent / f"{work.name}-marker"
    argv = ["compile", "mlp.onnx", "-o", output, "--calib", "calib.npz", "-T", "16", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED, *POINTS[point], str(marker), *argv],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the compile never reached " + point
        time.sleep(0.02)
    marker.unlink()
    return proc, {p.name for p in work.iterdir() if ".spikec-tmp-" in p.name}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda n: n.name)
def test_a_signal_leaves_nothing_behind(work, point, number):
    (work / "out.onnx").write_bytes(b"the previous output")
    before = _snapshot(work)
    proc, temporaries = _paused_compile(work, point)
    assert bool(temporaries) == (point == "save"), temporaries  # the save was under way: its temporary exists
    proc.send_signal(number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + number, err
    assert err.splitlines() == [f"spikec: interrupted ({number.name})"]
    assert _snapshot(work) == before


def test_a_killed_compile_leaves_a_temporary_the_next_run_removes(work):
    proc, temporaries = _paused_compile(work, "save")
    proc.kill()
    proc.communicate(timeout=60)
    assert len(temporaries) == 1 and {p.name for p in work.iterdir()} >= temporaries  # SIGKILL cannot clean up
    alive = work / f".other.onnx.spikec-tmp-{os.getpid()}-0"  # a live process's temporary stays
    alive.write_bytes(b"in progress")
    proc = _cli("compile", "mlp.onnx", "-o", "out.onnx", "--calib", "calib.npz", "-T", "16", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in work.iterdir() if ".spikec-tmp-" in p.name} == {alive.name}
    onnx.checker.check_model(os.fspath(work / "out.onnx"), full_check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A directory where no write fits: a one-page tmpfs holding an old output (root, as CI runs), or
    else a file size limit (RLIMIT_FSIZE) on the process. Returns (directory, preexec_fn, the error)."""
    directory = tmp_path / "disk"
    directory.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(directory)], capture_output=True
        ).returncode
        == 0
    )
    (directory / "old.onnx").write_bytes(b"the previous output")
    if mounted:
        yield directory, None, os.strerror(errno.ENOSPC)
        subprocess.run(["umount", str(directory)], check=True)
        return

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    yield directory, limit_file_size, os.strerror(errno.EFBIG)


@pytest.mark.parametrize("command", ["compile", "quantize", "run", "report", "ttfs report"])
def test_a_full_disk_is_one_line_and_leaves_the_old_output(work, full_disk, command):
    directory, preexec, error = full_disk
    if command == "ttfs report":
        assert (
            _cli(
                "compile", "mlp.onnx", "-o", "ttfs.onnx", "--calib", "calib.npz", "--method", "ttfs", cwd=work
            ).returncode
            == 0
        )
    target = directory / ("report" if "report" in command else "old.onnx")
    args = {
        "compile": ["compile", "mlp.onnx", "--calib", "calib.npz", "-T", "16"],
        "quantize": ["quantize", "mlp.onnx", "--calib", "calib.npz"],
        "run": ["run", "snn.onnx", "--inputs", "calib.npz"],
        "report": ["report", "mlp.onnx", "snn.onnx", "--inputs", "calib.npz"],
        "ttfs report": ["report", "mlp.onnx", "ttfs.onnx", "--inputs", "calib.npz"],
    }[command]
    inputs, disk = _snapshot(work), _snapshot(directory)
    proc = _cli(*args, "-o", target, cwd=work, preexec_fn=preexec)
    _one_error_line(proc, 2, "cannot write", error, str(directory))
    assert _snapshot(work) == inputs and _snapshot(directory) == disk


# ------------------------------------------------------------------ 4. exit 0 means a valid model


def test_an_already_converted_model_is_refused(work):
    for method in ("ecmt", "spikezip", "sta", "ttfs"):
        _refused(
            work,
            "compile",
            "snn.onnx",
            "-o",
            "again.onnx",
            "--calib",
            "calib.npz",
            "--method",
            method,
            culprits=("snn.onnx", "already a spikec model (method ecmt, T 16)"),
        )
    _refused(work, "quantize", "snn.onnx", "-o", "q.onnx", "--calib", "calib.npz", culprits=("already a spikec model",))


def test_an_already_quantized_model_is_refused_by_quantize_and_finetune(work):
    """Quantizing a QANN again would stack a second quantizer on every site (and graphsurgeon's warnings on
    every duplicate name): one line says what the model is and which command takes it."""
    assert _cli("quantize", "mlp.onnx", "-o", "qann.onnx", "--calib", "calib.npz", cwd=work).returncode == 0
    for command in ("quantize", "finetune"):
        _refused(
            work,
            command,
            "qann.onnx",
            "-o",
            "again.onnx",
            "--calib",
            "calib.npz",
            culprits=("model is already quantized", "compile --method spikezip"),
        )


@pytest.mark.parametrize(
    "model, culprits",
    [
        (mlp(passthrough=True), ("output 'x'", "not computed by any node")),
    ],
    ids=["output-is-an-input"],
)
def test_models_spikec_cannot_convert_are_refused(work, model, culprits):
    onnx.save(model, work / "odd.onnx")
    for method in ("ecmt", "ttfs"):  # time-stepped (repeats inputs) and one pass
        _refused(
            work,
            "compile",
            "odd.onnx",
            "-o",
            "out.onnx",
            "--calib",
            "calib.npz",
            "--method",
            method,
            culprits=("odd.onnx", *culprits),
        )


def test_verification_refuses_what_onnx_or_onnxruntime_reject():
    model = mlp()
    with pytest.raises(spikec.SpikecError, match=r"^m.onnx \(ecmt\): the converted model fails onnx.checker"):
        broken = onnx.ModelProto.FromString(model.SerializeToString())
        broken.graph.node[0].input[1] = "missing"
        verify(broken, "m.onnx (ecmt)")
    with pytest.raises(spikec.SpikecError, match="onnxruntime cannot load the converted model"):
        unknown = onnx.ModelProto.FromString(model.SerializeToString())
        unknown.graph.node[2].domain = "elsewhere"  # an op of a domain the checker cannot look into
        unknown.opset_import.append(helper.make_opsetid("elsewhere", 1))
        verify(unknown, "m.onnx (ecmt)")
    assert verify(model, "m.onnx (ecmt)") is None  # valid; nothing measured without held-out samples


def test_folded_weights_that_overflow_are_refused_naming_the_tensor(work):
    """ECMT folds theta_1 into the next weights (Eq. 27): near float32's limit that overflows."""
    onnx.save(mlp(scale2=5e37), work / "huge.onnx")
    np.savez(work / "loud.npz", x=_samples() * 100)
    line = _refused(
        work,
        "compile",
        "huge.onnx",
        "-o",
        "out.onnx",
        "--calib",
        "loud.npz",
        culprits=("huge.onnx (ecmt)", "inf/NaN", "overflow float32"),
    )
    assert "weight '" in line


# ------------------------------------------------------------------ 5. one-line errors, not tracebacks


def test_a_member_that_is_not_npy_is_one_line(work):
    import zipfile

    with zipfile.ZipFile(work / "bad.npz", "w") as archive:
        archive.writestr("x.npy", b"not an array")
    _refused(work, "compile", "mlp.onnx", "-o", "out.onnx", "--calib", "bad.npz", culprits=("bad.npz", "member 'x'"))
    with zipfile.ZipFile(work / "truncated.npz", "w") as archive:
        archive.writestr("x.npy", (work / "calib.npz").read_bytes()[:200])
    _refused(work, "run", "snn.onnx", "--inputs", "truncated.npz", "-o", "out.npz", culprits=("truncated.npz",))


def test_truncated_external_data_is_one_line(work):
    weights = work / "ext.weights"
    weights.write_bytes(weights.read_bytes()[:1000])
    _refused(work, "compile", "ext.onnx", "-o", "out.onnx", "--calib", "calib.npz", culprits=("ext.onnx",))
    _refused(work, "run", "ext.onnx", "--inputs", "calib.npz", "-o", "out.npz", culprits=("ext.onnx",))


@pytest.mark.parametrize(
    "key, value",
    [
        ("spikec.timesteps", "-3"),
        ("spikec.timesteps", "two"),
        ("spikec.report", "{not json"),
        ("spikec.report", '{"neurons": {}}'),
        ("spikec.mode", "sideways"),
        ("spikec.options", "[1]"),
    ],
)
def test_tampered_metadata_is_one_line(work, key, value):
    model = onnx.load(work / "snn.onnx")
    next(p for p in model.metadata_props if p.key == key).value = value
    onnx.save(model, work / "tampered.onnx")
    for args in (
        ["run", "tampered.onnx", "--inputs", "calib.npz", "-o", "out.npz"],
        ["inspect", "tampered.onnx"],
        ["eval", "mlp.onnx", "tampered.onnx", "--inputs", "calib.npz"],
    ):
        _refused(work, *args, culprits=("tampered.onnx", key))


def test_a_static_batch_model_runs_in_chunks_of_its_batch(work):
    onnx.save(mlp(batch=4), work / "static.onnx")
    proc = _cli("run", "static.onnx", "--inputs", "calib.npz", "-o", "out.npz", "--batch-size", "5", cwd=work)
    assert proc.returncode == 0, proc.stderr
    x = np.load(work / "calib.npz")["x"][: SAMPLES - 2]
    np.savez(work / "odd.npz", x=x)  # 14 samples: the last chunk is filled up and cut back
    assert _cli("run", "static.onnx", "--inputs", "odd.npz", "-o", "odd-out.npz", cwd=work).returncode == 0
    want = InferenceSession(mlp()).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(np.load(work / "odd-out.npz")["y"], want, rtol=1e-5, atol=1e-6)
    with np.load(work / "out.npz") as out:
        assert out["y"].shape == (SAMPLES, FEATURES)
    assert (
        _cli("compile", "static.onnx", "-o", "snn4.onnx", "--calib", "calib.npz", "-T", "16", cwd=work).returncode == 0
    )
    proc = _cli("eval", "static.onnx", "snn4.onnx", "--inputs", "odd.npz", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["y"]["per_t"][-1]["cosine"] > 0.8


def test_stateful_time_must_start_at_one():
    snn = spikec.compile(mlp(), {"x": _samples()}, timesteps=2, mode="stateful", progress=False)
    session = InferenceSession(snn)
    with pytest.raises(spikec.SpikecError, match="timesteps=0"):
        run_stateful(session, {"x": _samples(2)}, 0)
    feeds = {i.name: np.zeros([1] * len(i.shape), np.float32) for i in session.get_inputs()}
    feeds["x"] = _samples(2)
    for t in (0.0, -1.0, 1.5, np.nan):
        with pytest.raises(spikec.SpikecError, match="'spikec.t'.*1-based"):
            session.run(None, {**feeds, "spikec.t": np.array(t, np.float32)})
    assert np.isfinite(session.run(None, {**feeds, "spikec.t": np.array(1.0, np.float32)})[0]).all()


# ------------------------------------------------------------------ 6. reproducible and quiet


def test_dropout_in_training_mode_is_identity_and_compiles_are_reproducible(work):
    onnx.save(mlp(dropout_training=True), work / "train.onnx")
    for method in ("ecmt", "spikezip"):
        results = [
            _cli(
                "compile",
                "train.onnx",
                "-o",
                f"{method}-{i}.onnx",
                "--calib",
                "calib.npz",
                "--method",
                method,
                "-T",
                "32",
                cwd=work,
            )
            for i in range(2)
        ]
        for proc in results:
            assert proc.returncode == 0, proc.stderr
            assert len(proc.stderr.splitlines()) == 1 and "Dropout" in proc.stderr and "identity" in proc.stderr
        assert (work / f"{method}-0.onnx").read_bytes() == (work / f"{method}-1.onnx").read_bytes()
    # the same thresholds as the model without the Dropout
    plain = _cli("compile", "mlp.onnx", "-o", "plain.onnx", "--calib", "calib.npz", "-T", "16", cwd=work)
    assert plain.returncode == 0 and plain.stderr == ""
    report = [
        json.loads({p.key: p.value for p in onnx.load(work / name).metadata_props}["spikec.report"])
        for name in ("ecmt-0.onnx", "plain.onnx")
    ]
    assert [n["theta_pos"] for n in report[0]["neurons"]] == [n["theta_pos"] for n in report[1]["neurons"]]


def test_onnxruntime_failures_are_one_line_naming_the_files(work):
    onnx.save(_embedding(), work / "embed.onnx")
    np.savez(work / "ids.npz", ids=np.full((4, 4), 50, np.int64))  # 10 embeddings: id 50 is out of range
    # compile first runs the first sample alone, to find where each tensor holds the batch (check_time_folding)
    line = _refused(
        work,
        "compile",
        "embed.onnx",
        "-o",
        "out.onnx",
        "--calib",
        "ids.npz",
        culprits=("embed.onnx", "ids.npz", "samples 0:2"),
    )
    assert "main_graph" not in line
    _refused(work, "run", "embed.onnx", "--inputs", "ids.npz", "-o", "out.npz", culprits=("embed.onnx", "samples 0:4"))


def test_numeric_warnings_do_not_reach_the_terminal(work):
    """SpikeZIP-TF's clip search squares quantization errors of values near float32's limit."""
    onnx.save(mlp(scale2=1e20), work / "loud.onnx")
    proc = _cli(
        "compile", "loud.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--method", "spikezip", "-T", "64", cwd=work
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_invalid_values_are_errors(work):
    assert _cli("quantize", "mlp.onnx", "-o", "qann.onnx", "--calib", "calib.npz", cwd=work).returncode == 0
    _refused(
        work,
        "compile",
        "qann.onnx",
        "-o",
        "zip.onnx",
        "--method",
        "spikezip",
        "--calib",
        "calib.npz",
        "--save-qann",
        "again.onnx",
        culprits=("argument --save-qann", "already quantized"),
    )  # it would write nothing
    _refused(work, "ugo", "train", "--only", "exp", "--hidden", "0", "--output-dir", ".", culprits=("hidden size 0",))
    _refused(
        work,
        "compile",
        "mlp.onnx",
        "-o",
        "out.onnx",
        "--calib",
        "calib.npz",
        "--allow-float",
        "Relu,Softmaks",
        culprits=("'Softmaks'", "argument --allow-float"),
    )
    before = _snapshot(work)
    proc = _cli(
        "run", "snn.onnx", "--inputs", "calib.npz", "-o", "out.npz", cwd=work, env=_env(SPIKEC_NATIVE_LIB=str(work))
    )
    assert "SPIKEC_NATIVE_LIB" in _one_error_line(proc, 2, "is a directory")
    assert _snapshot(work) == before
