"""Calibration data from what users hold: a text file and the model's tokenizer, an image folder, or a
Python function.

Compile takes an .npz keyed by the model's input names; this module builds one and checks it against the
model with the same ``load_inputs`` compile uses, so a file it writes is one compile accepts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spikec.calibrate import _graph_inputs, _load_model, _one_line, load_inputs
from spikec.errors import SpikecError
from spikec.passes.loader import check_input_file

# tokenizer calls per progress step: one call per sentence would be slow, one for the file shows nothing
_CHUNK = 256


def _sequence_length(graph, label: str, max_length: int | None) -> int:
    """``max_length``, or the static axis 1 the model's inputs share."""
    if max_length is not None:
        if max_length < 1:
            raise SpikecError(f"argument max_length={max_length}: expected a positive integer")
        return max_length
    static = {
        dims[1].dim_value
        for vi in _graph_inputs(graph)
        for dims in [vi.type.tensor_type.shape.dim]
        if len(dims) > 1 and dims[1].WhichOneof("value") == "dim_value"
    }
    if len(static) != 1:
        raise SpikecError(f"{label}: the model's inputs fix no single sequence length; give --max-length")
    return static.pop()


def from_text(
    model,
    text: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """One sample per non-empty line of ``text``, tokenized by the Hugging Face tokenizer saved in the
    directory ``tokenizer`` (offline), padded and truncated to ``max_length`` (default: the model's static
    sequence length); the model inputs are taken from the tokenizer's outputs of the same name."""
    path = check_input_file(text, f"text file {text}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise SpikecError(f"text file {text}: not UTF-8 text ({_one_line(exc)})") from None
    if not lines:
        raise SpikecError(f"text file {text}: holds no non-empty line")
    graph, _, label = _load_model(model)
    length = _sequence_length(graph, label, max_length)
    if not Path(tokenizer).is_dir():
        raise SpikecError(f"tokenizer {tokenizer}: not a directory (a saved Hugging Face tokenizer)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SpikecError(
            "argument tokenizer: reading a tokenizer needs the transformers package (pip install transformers)"
        ) from None
    try:
        encode = AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for a bad directory
        raise SpikecError(f"tokenizer {tokenizer}: cannot load it ({_one_line(exc)})") from None
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(lines), desc="tokenizing", unit="line", disable=not progress) as bar:
        for start in range(0, len(lines), _CHUNK):
            encoded = encode(
                lines[start : start + _CHUNK],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="np",
            )
            for name, values in encoded.items():
                parts.setdefault(name, []).append(np.asarray(values))
            bar.update(min(_CHUNK, len(lines) - start))
    produced = {name: np.concatenate(values) for name, values in parts.items()}
    wanted = [vi.name for vi in _graph_inputs(graph)]
    missing = [name for name in wanted if name not in produced]
    if missing:
        raise SpikecError(f"tokenizer {tokenizer}: gives {sorted(produced)}, not the model's input '{missing[0]}'")
    return load_inputs({name: produced[name] for name in wanted}, model, what=f"text file {text}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESAMPLING = ("nearest", "box", "bilinear", "bicubic", "lanczos")


def _image_input(graph, label: str) -> tuple[str, bool, int, tuple[int, int] | None]:
    """The model's one image input: its name, whether channels come last, the channel count, and its static
    height and width (None where either is symbolic)."""
    candidates = []
    for vi in _graph_inputs(graph):
        dims = list(vi.type.tensor_type.shape.dim)
        if len(dims) != 4:
            continue
        static = [d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in dims]
        # channels first unless axis 1 is no channel count (1 or 3) and the last axis is one
        last = static[1] not in (1, 3) and static[3] in (1, 3)
        channels = static[3] if last else static[1]
        height, width = static[1:3] if last else static[2:4]
        candidates.append((vi.name, last, channels, (height, width) if height and width else None))
    if len(candidates) != 1:
        raise SpikecError(f"{label}: an image folder feeds a model with one 4-D image input; it has {len(candidates)}")
    name, last, channels, size = candidates[0]
    if channels not in (1, 3):
        raise SpikecError(f"{label}: input '{name}' has {channels} channels on its channel axis; images give 1 or 3")
    return name, last, channels, size


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise SpikecError(f"argument {flag}: {len(values)} values for {channels} channel(s); give 1 or {channels}")
    return np.broadcast_to(np.asarray(values, np.float64), (channels,))


def from_images(
    model,
    folder: str | os.PathLike,
    *,
    resize: tuple[int, int] | None = None,
    resample: str = "bilinear",
    scale: float = 1 / 255,
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """One sample per image file under ``folder`` (recursive, sorted by path), converted to the model's
    channel count (grey or RGB), resized to ``resize`` (height, width; default the model's static size),
    then ``(pixel * scale - mean) / std`` per channel, in the model's layout (channels first or last)."""
    root = Path(folder)
    if not root.is_dir():
        raise SpikecError(f"image folder {folder}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SpikecError(f"image folder {folder}: holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    if resample not in RESAMPLING:
        raise SpikecError(f"argument resample={resample!r}: expected one of {', '.join(RESAMPLING)}")
    if std and min(abs(v) for v in std) == 0:
        raise SpikecError("argument --std: a standard deviation of 0 divides by zero")
    try:
        from PIL import Image
    except ImportError:
        raise SpikecError("argument images: reading images needs the Pillow package (pip install pillow)") from None
    graph, _, label = _load_model(model)
    name, last, channels, size = _image_input(graph, label)
    size = resize or size
    if size is None:
        raise SpikecError(f"{label}: input '{name}' has no static height and width; give --resize HxW")
    if len(size) != 2 or min(size) < 1:
        raise SpikecError(f"argument resize={'x'.join(map(str, size))}: expected two positive sizes, HxW")
    offset, divisor = _per_channel(mean, channels, "--mean"), _per_channel(std, channels, "--std")
    filter_ = getattr(Image.Resampling, resample.upper())
    samples = np.empty((len(files), size[0], size[1], channels), np.float32)
    for i, path in enumerate(tqdm(files, desc="reading images", unit="image", disable=not progress)):
        try:
            with Image.open(path) as image:
                pixels = image.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), filter_)
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, ValueError, ... for a bad file
            raise SpikecError(f"image {path}: cannot read it ({_one_line(exc)})") from None
        values = np.asarray(pixels, np.float64).reshape(size[0], size[1], channels)
        samples[i] = (values * scale - offset) / divisor
    arrays = {name: samples if last else samples.transpose(0, 3, 1, 2)}
    return load_inputs(arrays, model, what=f"image folder {folder}")


def from_callable(model, reference: str) -> dict[str, np.ndarray]:
    """The mapping of input name to array that ``reference`` (``module:function`` or ``file.py:function``)
    returns when called without arguments, checked against the model."""
    where, _, name = reference.rpartition(":")
    if not where or not name:
        raise SpikecError(f"argument python={reference!r}: expected module:function or file.py:function")
    try:
        if where.endswith(".py"):
            check_input_file(where, f"python file {where}")
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            assert spec is not None and spec.loader is not None, "a .py file has a source loader"
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # as `python -m` finds modules: the working directory first (a console script's path lacks it)
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(os.getcwd())
        function = getattr(module, name)
    except SpikecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything on import
        raise SpikecError(
            f"argument python={reference!r}: cannot load it ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    try:
        arrays = function()
    except Exception as exc:  # noqa: BLE001 - the user's function may raise anything
        raise SpikecError(
            f"argument python={reference!r}: the function raised {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    if not isinstance(arrays, Mapping):
        raise SpikecError(
            f"argument python={reference!r}: returned {type(arrays).__name__}; expected a "
            f"mapping of input name to array"
        )
    return load_inputs(arrays, model, what=f"the arrays {reference} returned")
