"""Builds spikec's native kernels (runtime/kernels/) as part of `pip install`, where it can.

The kernels are optional: without them every spikec op runs as its ONNX function. So a build that
cannot happen (no C++ compiler, not x86-64, Debian's archive out of reach for the onnxruntime headers,
SPIKEC_NO_NATIVE set) prints one notice and the install goes on with the portable path; `make native`
builds them later. An editable install builds into build/, where the source tree's runtime looks; a
regular install ships the library inside the package.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBRARY = "libspikec_kernels.so"


def _notice(reason: str) -> None:
    print(
        f"spikec: native kernels not built ({reason}); spikec runs its portable ONNX functions, "
        f"several times slower: run `make native` in {ROOT} to build them",
        file=sys.stderr,
    )


def build_kernels() -> Path | None:
    """build/libspikec_kernels.so, built by runtime/kernels/build.sh; None (with a notice) where it cannot be."""
    if os.environ.get("SPIKEC_NO_NATIVE"):
        _notice("SPIKEC_NO_NATIVE is set")
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        _notice(f"the kernels target x86-64, this machine is {platform.machine()}")
        return None
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        _notice(f"no C++ compiler {compiler!r} on PATH")
        return None
    result = subprocess.run(["bash", str(ROOT / "runtime" / "kernels" / "build.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        _notice(lines[-1] if lines else f"build.sh exited with {result.returncode}")
        return None
    return ROOT / "build" / LIBRARY


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        library = build_kernels()
        if library is not None and not self.editable_mode:
            target = Path(self.build_lib) / "spikec" / "runtime" / LIBRARY
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library, target)


class KernelDistribution(Distribution):
    """The wheel may carry a shared library built for this platform: tag it as such, not as pure Python."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=KernelDistribution)
