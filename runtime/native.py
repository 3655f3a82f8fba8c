"""spikec's native kernels: an onnxruntime custom-op library built from runtime/kernels/ (``make native``).

The library implements every op of runtime/ops.py (MTNeuron, STBIFNeuron, IFNeuron, UGO, ECAccumulate,
ECCompensate and their composites, unrolled and Step forms) with the exact float32 arithmetic of their
ONNX functions, which stay the definition and the portable path, the TTFS ops of runtime/ttfs.py
that have no transcendentals (the others run as their functions: onnxruntime's vectorized exp/erf beat
the C library's), and SpikeMatMul, a MatMul of spike codes whose cost follows the firing rate (equal to
the MatMul up to float rounding). It is optional: without it everything runs on stock onnxruntime.

Registration. The library registers its kernels under the models' own domain, ``spikec``. A spikec
model also carries model-local ONNX functions of the same names; measured with onnxruntime 1.32,
when a session's options register a custom-op library providing ``spikec.MTNeuron`` etc., the
registered kernels win and no function body is inlined (tests/test_native.py checks this with a
profile; consistent with onnxruntime inlining a function only where no execution provider has a kernel).
So a model needs no rewrite: ``InferenceSession`` registers the library on its session options, and
the same file runs natively where the library is built and portably elsewhere.

Numerics. The kernels repeat the functions' float32 operations in order, so they give the same bits
(tests/test_native.py: exact on every op, both forms, including level boundaries, inf and NaN; the
unrolled digits ViT's logits are identical). One difference is onnxruntime's, not the kernels': in a
*stateful* model the inlined step functions sit in the main graph, where MatMulScaleFusion folds the
MT neuron's final ``Div(emitted, theta_pos)`` into the next MatMul (FusedMatMul, alpha=1/theta_pos).
That rounds differently, and a neuron close to a level boundary may fire differently later on, so
``InferenceSession`` disables that fusion: portable runs then compute the functions as written, as the
native kernels do.

``pip install`` builds the library where a C++ compiler is available (setup.py): a regular install
ships it in the package, an editable one (and ``make native``) writes ``build/libspikec_kernels.so`` in
the source tree; the environment variable ``SPIKEC_NATIVE_LIB`` names another file. It carries the digest of the kernel sources it was built from; a
library built from other sources than runtime/kernels/ holds is refused (with a warning to rebuild):
its kernels would not be the ops' current definition, and run_stateful's in-place steps rely on every
step op of a model having its kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import warnings
from pathlib import Path

import onnxruntime as ort

from spikec.errors import SpikecError

ENV_VAR = "SPIKEC_NATIVE_LIB"
# Caps the vector ISA of the kernels' loops (runtime/kernels/isa.h), widest last; unset: the CPU's widest.
ISA_ENV_VAR = "SPIKEC_KERNEL_ISA"
ISAS = ("baseline", "avx2", "avx512")
# Marks session options that carry the library: registering it twice on one options object fails.
CONFIG_KEY = "spikec.native_library"
LIBRARY_NAME = "libspikec_kernels.so"
# A regular install ships the library in the package (setup.py); a source tree (editable install,
# `make native`) builds it into build/.
INSTALLED_PATH = Path(__file__).resolve().parent / LIBRARY_NAME
SOURCE_TREE_PATH = Path(__file__).resolve().parent.parent / "build" / LIBRARY_NAME
KERNEL_SOURCES = Path(__file__).resolve().parent / "kernels"


def library_path() -> Path | None:
    """The native library to use, or None where it is not built. A ``SPIKEC_NATIVE_LIB`` that names no
    file is an error: silently running the portable functions instead would hide the mistake."""
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "is not a file" if path.exists() else "does not exist"
            raise SpikecError(
                f"environment variable {ENV_VAR}={path}: {problem}; name the built library "
                f"(`make native` writes build/{LIBRARY_NAME}) or unset it"
            )
        return path
    return next((path for path in (INSTALLED_PATH, SOURCE_TREE_PATH) if path.is_file()), None)


def source_digest() -> str | None:
    """The digest build.sh stamps into the library: of the kernel sources, sorted by name (None where
    the sources are not installed)."""
    files = sorted([*KERNEL_SOURCES.glob("*.cc"), *KERNEL_SOURCES.glob("*.h")], key=lambda p: p.name)
    if not files:
        return None
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]


def built_from(path: Path) -> str | None:
    """The source digest a library was built with (None for a library without one)."""
    try:
        function = ctypes.CDLL(os.fspath(path)).SpikecSourceDigest
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_char_p
    return function().decode()


@functools.cache
def _loads(path: Path) -> bool:
    try:
        ort.SessionOptions().register_custom_ops_library(os.fspath(path))
    except Exception as error:  # a foreign build: fall back to the portable functions
        warnings.warn(
            f"spikec native library {path} does not load ({error}); using the ONNX functions",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    expected = source_digest()
    if expected is not None and built_from(path) != expected:
        warnings.warn(
            f"spikec native library {path} was built from other kernel sources than {KERNEL_SOURCES}: "
            "rebuild it with `make native`; using the ONNX functions",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


@functools.cache
def _exported(path: Path, name: str, restype, argtypes: tuple = ()):
    """A C function the library exports besides its kernels."""
    function = getattr(ctypes.CDLL(os.fspath(path)), name)
    function.argtypes, function.restype = list(argtypes), restype
    return function


def spike_matmul_pays(k: int, n: int) -> bool:
    """Whether the library's SpikeMatMul kernel can beat MatMul on a [k, n] weight at some firing rate
    (its own threshold, spike_matmul.cc); False without the library."""
    return (
        available()
        and _exported(library_path(), "SpikecSpikeMatMulThreshold", ctypes.c_float, (ctypes.c_int64, ctypes.c_int64))(
            k, n
        )
        > 0.0
    )


def kernel_isa() -> str | None:
    """The vector ISA the library's loops run with in this process (None without the library)."""
    return _exported(library_path(), "SpikecKernelIsa", ctypes.c_char_p)().decode() if available() else None


def available() -> bool:
    """Whether the native library is built and loads into this onnxruntime."""
    path = library_path()
    return path is not None and _loads(path)


def registered(options: ort.SessionOptions) -> bool:
    """Whether ``options`` already carry the native kernels (through ``register``)."""
    try:
        return bool(options.get_session_config_entry(CONFIG_KEY))
    except Exception:  # onnxruntime raises for a missing key
        return False


def register(options: ort.SessionOptions) -> bool:
    """Register the native kernels on ``options`` if available; returns whether they carry them."""
    if registered(options):
        return True
    cap = os.environ.get(ISA_ENV_VAR)
    if cap and cap not in ISAS:
        raise SpikecError(f"environment variable {ISA_ENV_VAR}={cap!r}: expected one of {', '.join(ISAS)}")
    library = library_path()
    if library is None or not _loads(library):
        return False
    path = os.fspath(library)
    options.register_custom_ops_library(path)
    options.add_session_config_entry(CONFIG_KEY, path)
    return True
