"""Running models over datasets in batches, and fidelity of an SNN against its ANN per time step."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
from tqdm import tqdm

from spikec.errors import SpikecError
from spikec.runtime.layout import STEPS_SUFFIX
from spikec.runtime.session import InferenceSession, run


def run_dataset(model: str | os.PathLike | onnx.ModelProto | InferenceSession, feeds: Mapping[str, np.ndarray],
                *, batch_size: int = 32, timesteps: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Run any model (ANN or spikec, either mode) over all samples; ``y.steps`` outputs are [T, N, ...]."""
    session = model if isinstance(model, InferenceSession) else InferenceSession(model)
    wanted = {i.name for i in session.get_inputs() if not i.name.startswith("spikec.")}
    missing = wanted - set(feeds)
    if missing:
        raise SpikecError(f"inputs: missing model input(s) {', '.join(sorted(missing))}")
    count = len(next(iter(feeds.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, count, batch_size)
    # disable=None lets tqdm stay quiet when stderr is not a terminal (logs, CI).
    for start in tqdm(starts, desc="running", disable=None if progress else True, leave=False):
        batch = {name: feeds[name][start:start + batch_size] for name in wanted}
        for name, value in run(session, batch, timesteps).items():
            chunks.setdefault(name, []).append(value)
    return {name: np.concatenate(parts, axis=1 if name.endswith(STEPS_SUFFIX) else 0)
            for name, parts in chunks.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened per-sample outputs."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return float(np.mean(np.sum(a2 * b2, axis=1) / np.maximum(norms, 1e-30)))


def fidelity(reference: np.ndarray, steps: np.ndarray, labels: np.ndarray | None = None) -> list[dict]:
    """Per step t: max abs error, relative max error, cosine, and for [N, classes] outputs top-1
    agreement with the reference (and accuracy when labels are given)."""
    scale = float(np.max(np.abs(reference))) or 1.0
    rows = []
    for t, out in enumerate(steps, start=1):
        row = {"t": t, "max_abs_error": float(np.max(np.abs(out - reference))),
               "relative_max_error": float(np.max(np.abs(out - reference)) / scale),
               "cosine": cosine(reference, out)}
        if reference.ndim == 2 and reference.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(out.argmax(1) == reference.argmax(1)))
            if labels is not None:
                row["accuracy"] = float(np.mean(out.argmax(1) == labels))
        rows.append(row)
    return rows


def compare(ann: str | os.PathLike, snn: str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
            labels: np.ndarray | None = None, batch_size: int = 32, progress: bool = False) -> dict:
    """Fidelity of every SNN output against the ANN output of the same name, for every T."""
    ann_out = run_dataset(ann, feeds, batch_size=batch_size, progress=progress)
    snn_out = run_dataset(snn, feeds, batch_size=batch_size, progress=progress)
    result = {}
    for name, reference in ann_out.items():
        if name + STEPS_SUFFIX not in snn_out:
            continue
        result[name] = {"per_t": fidelity(reference, snn_out[name + STEPS_SUFFIX], labels)}
        if labels is not None and reference.ndim == 2 and reference.shape[1] > 1:
            result[name]["ann_accuracy"] = float(np.mean(reference.argmax(1) == labels))
    if not result:
        raise SpikecError(f"{snn}: no output of the SNN matches an ANN output by name")
    return result
