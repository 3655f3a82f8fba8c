"""Fetch intermediate tensors of an ANN and its time-unrolled SNN side by side, and read SNN tensors as
estimates of the ANN's.

Tensors are exposed with `spikec.calibrate.run_batches` (extra graph outputs on an in-memory copy; the
model files are never modified). In a time-unrolled model every tensor downstream of the inputs holds
all steps folded into the batch axis, ``[T*B, ...]`` step-major (passes/emit.py). Tensors that keep
their ANN name carry per-step values (mean semantics: the estimate after t steps is their running mean)
except inside expectation compensation, where F runs on running means and its value at step t is already
the estimate after t steps (`spikec.graphinfo.mean_domain`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from spikec.calibrate import run_batches

ModelLike = str | os.PathLike | onnx.ModelProto


def paired_batches(ann: ModelLike, snn: ModelLike, feeds: Mapping[str, np.ndarray], ann_names: Sequence[str],
                   snn_names: Sequence[str], *, batch_size: int = 32,
                   progress: bool = False) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run both models over the same batches; yield ({ann tensor: value}, {snn tensor: value})."""
    ann_batches = run_batches(ann, feeds, ann_names, batch_size=batch_size, progress=progress, desc="ANN + SNN")
    snn_batches = run_batches(snn, feeds, snn_names, batch_size=batch_size, progress=False)
    for ann_values, snn_values in zip(ann_batches, snn_batches, strict=True):
        yield ann_values, snn_values


def per_step(value: np.ndarray, timesteps: int, rows: int) -> np.ndarray | None:
    """[T*rows, ...] -> [T, rows, ...]; None when axis 0 does not hold T*rows rows. ``rows`` is the batch,
    or what axis 0 of the ANN tensor holds (e.g. batch x heads where an exporter merged them)."""
    if value.ndim == 0 or value.shape[0] != timesteps * rows:
        return None
    return value.reshape(timesteps, rows, *value.shape[1:])


def final_estimate(value: np.ndarray, reference_shape: Sequence[int], timesteps: int, *,
                   running_mean: bool) -> np.ndarray | None:
    """The SNN's estimate, after all T steps, of an ANN tensor of ``reference_shape``: the running mean over
    T of per-step values, or the last step of a tensor that already holds means. A tensor shaped like the
    reference (graph outputs ``y``) is already final. None where the shapes do not correspond."""
    reference_shape = tuple(reference_shape)
    if value.shape == reference_shape and timesteps > 1:
        return value
    steps = per_step(value, timesteps, reference_shape[0]) if reference_shape else None
    if steps is None or steps.shape[1:] != reference_shape:
        return None
    return steps.mean(axis=0, dtype=np.float64) if running_mean else steps[-1]
