"""`pip install` builds the native kernels where a C++ compiler is available (setup.py)."""

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from spikec.runtime import native

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
CAN_BUILD = (
    platform.machine() in ("x86_64", "AMD64")
    and shutil.which(os.environ.get("CXX", "g++")) is not None
    and not os.environ.get("SPIKEC_NO_NATIVE")
)
needs_compiler = pytest.mark.skipif(
    not CAN_BUILD, reason="no C++ compiler for x86-64: the install keeps the portable path"
)


@needs_compiler
def test_the_installed_library_loads():
    assert native.available(), f"a C++ compiler exists but no native library loads (looked at {native.library_path()})"
    assert native.built_from(native.library_path()) == native.source_digest()
    assert native.kernel_isa() in native.ISAS


@needs_compiler
def test_a_wheel_ships_the_kernels_of_its_sources(tmp_path):
    """A regular (non-editable) install gets the library inside the package, built from the sources it ships.
    Built from a copy of the tree, so that setuptools' staging stays out of this checkout's build/."""
    source = tmp_path / "source"
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = dict(os.environ)
    headers = REPO / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"
    if headers.is_dir():
        env.setdefault("ORT_INCLUDE", str(headers))  # the headers make native fetched, not a second download
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        env=env,
    )
    (wheel,) = tmp_path.glob("spikec-*.whl")
    assert not wheel.name.endswith("-none-any.whl")  # tagged for the platform its library was built for
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "spikec/runtime/libspikec_kernels.so" in names
        assert {"spikec/runtime/kernels/spikec_kernels.cc", "spikec/runtime/kernels/build.sh"} <= names
        installed = {"spikec": "spikec", "passes": "spikec/passes", "runtime": "spikec/runtime"}
        modules = {
            f"{installed[path.parts[0]]}/{'/'.join(path.parts[1:])}"
            for path in (Path(name) for name in files)
            if path.suffix == ".py" and path.parts[0] in installed
        }
        assert modules <= names, f"the wheel lacks {sorted(modules - names)}"
        archive.extract("spikec/runtime/libspikec_kernels.so", tmp_path)
    assert native.built_from(tmp_path / "spikec/runtime/libspikec_kernels.so") == native.source_digest()


@needs_compiler
def test_info_reports_the_library_the_sessions_use(capsys):
    from spikec.cli import main

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["native"]["loads"] and info["native"]["matches_sources"]
    assert info["native"]["library"] == os.fspath(native.library_path()) and info["native"]["isa"] in native.ISAS
    assert set(info["methods"]) >= {"ecmt", "spikezip", "sta", "ttfs"}


def test_sessions_say_once_which_path_runs(caplog, monkeypatch):
    import numpy as np
    from graphs import FEATURES, mlp
    from spikec.runtime import InferenceSession, session

    import spikec

    snn = spikec.compile(mlp(), {"x": np.ones((8, FEATURES), np.float32)}, verify=False, progress=False)
    monkeypatch.setattr(session, "_PATH_SAID", False)
    with caplog.at_level(logging.INFO, logger="spikec"):
        InferenceSession(snn, native=False)
        InferenceSession(snn)
    assert [r.getMessage() for r in caplog.records] == ["spikec ops run as their ONNX functions (native=False)"]
