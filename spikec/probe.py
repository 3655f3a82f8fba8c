"""Fetch intermediate tensors of ANNs and a spikec model side by side, and read the spikec model's tensors
as estimates of the ANN's.

Tensors are exposed with `spikec.calibrate.run_batches` (extra graph outputs on an in-memory copy; the
model files are never modified). In a time-unrolled model every tensor downstream of the inputs holds
all steps folded into the batch axis, ``[T*B, ...]`` step-major (passes/emit.py). What the SNN makes of
an ANN tensor after T steps depends on where the tensor sits (`Estimate`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from spikec.calibrate import run_batches

ModelLike = str | os.PathLike | onnx.ModelProto


class Estimate:
    """How an SNN tensor estimates the ANN tensor of its name after T steps."""

    OUTPUT = "graph output (after T steps)"  # a rate readout: already the estimate
    # F of running means/sums, or a time-invariant tensor: its last step is the estimate (the value itself
    # where the tensor is computed once, not per step: position embeddings, rotary tables)
    LAST = "last step"
    MEAN = "running mean"  # per-step values, mean semantics (ECMT, STA)
    SUM = "running sum"  # per-step values, sum semantics (SpikeZIP-TF)
    SINGLE = "one pass"  # TTFS: no time steps, the received value itself


def side_by_side(
    models: Sequence[ModelLike],
    names: Sequence[Sequence[str]],
    feeds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Iterator[list[dict[str, np.ndarray]]]:
    """Run every model over the same batches; yield one {tensor: value} per model and batch."""
    runs = [
        run_batches(model, feeds, model_names, batch_size=batch_size, progress=progress and i == 0, desc="report")
        for i, (model, model_names) in enumerate(zip(models, names, strict=True))
    ]
    for values in zip(*runs, strict=True):
        yield list(values)


def per_step(value: np.ndarray, timesteps: int, rows: int) -> np.ndarray | None:
    """[T*rows, ...] -> [T, rows, ...]; None when axis 0 does not hold T*rows rows. ``rows`` is the batch,
    or what axis 0 of the ANN tensor holds (e.g. batch x heads where an exporter merged them)."""
    if value.ndim == 0 or value.shape[0] != timesteps * rows:
        return None
    return value.reshape(timesteps, rows, *value.shape[1:])


def final_estimate(value: np.ndarray, reference_shape: Sequence[int], timesteps: int, kind: str) -> np.ndarray | None:
    """The SNN's estimate, after all T steps, of an ANN tensor of ``reference_shape`` (see `Estimate`).
    None where the shapes do not correspond."""
    reference_shape = tuple(reference_shape)
    if kind in (Estimate.OUTPUT, Estimate.SINGLE) or (kind == Estimate.LAST and value.shape == reference_shape):
        return value if value.shape == reference_shape else None
    steps = per_step(value, timesteps, reference_shape[0]) if reference_shape else None
    if steps is None or steps.shape[1:] != reference_shape:
        return None
    if kind == Estimate.LAST:
        return steps[-1]
    return steps.sum(axis=0, dtype=np.float64) / (timesteps if kind == Estimate.MEAN else 1)
