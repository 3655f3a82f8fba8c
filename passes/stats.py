"""Statistics of calibrated tensors as the passes consume them: exact extremes and counts over all data,
a deterministic sample of whole rows for percentiles and MMSE threshold searches. `spikec.calibrate`
collects them; the passes read them, so they live here, below the driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from spikec.errors import SpikecError

# STA's neuron-wise search: Vth = max * (1 - 0.005 i), i = 0..94 (Eq. 33, the reference code's grid).
DEFAULT_MMSE_GRID = np.linspace(0.53, 1.0, 95)

SAMPLE_SEED = 0


def check_positive_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpikecError(f"argument {argument}={value!r}: expected a positive integer")
    return int(value)


def _check_percentile(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 <= p <= 100:
        raise SpikecError(f"argument p={p!r}: expected a percentile in [0, 100]")
    return float(p)


@dataclass(frozen=True, eq=False)
class TapStats:
    """Statistics of one calibrated tensor, viewed as rows over its channel axis.

    `count`, `min`, `max` and `absmax` are exact over all calibration data. `percentile`, `mmse` and the
    mean/std in `to_json` use `sample` ([rows, channels] float32, a uniform sample of whole rows, equal
    to all data when it fit in the budget), so e.g. `percentile(100)` may sit below `max()`.
    """

    name: str
    shape: tuple[int | None, ...]  # as fetched per batch; None where a dimension varied between batches
    channel_axis: int  # non-negative
    count: int  # values seen
    sample: np.ndarray = field(repr=False)
    channel_min: np.ndarray = field(repr=False)
    channel_max: np.ndarray = field(repr=False)

    @property
    def channels(self) -> int:
        return int(self.channel_min.shape[0])

    @staticmethod
    def _reduce(per_channel: np.ndarray, keep: bool, combine: Callable) -> np.ndarray | np.float32:
        return per_channel.copy() if keep else np.float32(combine(per_channel))

    def min(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(self.channel_min, per_channel, np.min)

    def max(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(self.channel_max, per_channel, np.max)

    def absmax(self, per_channel: bool = False) -> np.ndarray | np.float32:
        return self._reduce(np.maximum(-self.channel_min, self.channel_max), per_channel, np.max)

    def percentile(self, p: float, per_channel: bool = False) -> np.ndarray | np.float32:
        """The p-th percentile (linear interpolation, as np.percentile) of the sample; [C] if per_channel."""
        p = _check_percentile(p)
        if per_channel:
            return np.percentile(self.sample, p, axis=0).astype(np.float32)
        return np.float32(np.percentile(self.sample, p))

    def mmse(
        self,
        quantize: Callable[[np.ndarray, np.ndarray], np.ndarray],
        *,
        per_channel: bool = False,
        grid: Sequence[float] | np.ndarray | None = None,
        reference: str = "absmax",
    ) -> np.ndarray | np.float32:
        """Threshold g * ref (g in `grid`, ref = absmax or max) minimising sum((quantize(x, thr) - x)^2).

        `quantize(x, thr)` gets the sample x [rows, C] and thr as a float32 scalar array (per tensor) or
        [C] (per channel, searched independently for each channel) and returns an array shaped like x.
        Ties go to the earliest grid entry. Channels (or a tensor) whose reference is <= 0 never carry a
        positive value to threshold: they get 0 and are not searched.
        """
        if reference not in ("absmax", "max"):
            raise SpikecError(f"tap '{self.name}': argument reference={reference!r}: expected 'absmax' or 'max'")
        grid = DEFAULT_MMSE_GRID if grid is None else np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or not (np.isfinite(grid).all() and (grid > 0).all()):
            raise SpikecError(f"tap '{self.name}': argument grid: expected a non-empty 1-D array of positive factors")
        ref = np.maximum(-self.channel_min, self.channel_max) if reference == "absmax" else self.channel_max
        if not per_channel:
            ref = ref.max(keepdims=True)
        live = ref > 0
        ref = np.where(live, ref, 1)  # a zero threshold would make quantize divide by zero
        x = self.sample
        errors = np.empty((grid.size, ref.size))
        for i, g in enumerate(grid):
            thr = (g * ref).astype(np.float32)
            q = np.asarray(quantize(x, thr if per_channel else thr[0]))
            if q.shape != x.shape:
                raise SpikecError(f"tap '{self.name}': quantize returned shape {q.shape}, expected {x.shape}")
            # in float64 (the square of a float32 error can overflow float32), in place where q already is
            own = q.dtype == np.float64 and not np.may_share_memory(q, x)
            error = np.subtract(q, x, dtype=np.float64, out=q if own else None)
            per_channel_error = np.square(error, out=error).sum(axis=0)
            errors[i] = per_channel_error if per_channel else per_channel_error.sum()
        best = np.where(live, grid[errors.argmin(axis=0)] * ref, 0).astype(np.float32)
        return best if per_channel else best[0]

    def shifted(self, offset: np.ndarray) -> TapStats:
        """The statistics of x - ``offset`` (one value per channel): what a quantizer with that zero point sees."""
        offset = np.asarray(offset, np.float32)
        return replace(
            self,
            sample=(self.sample - offset).astype(np.float32),
            channel_min=self.channel_min - offset,
            channel_max=self.channel_max - offset,
        )

    @property
    def rows(self) -> int:
        """Rows of the channel axis seen (``count`` / channels)."""
        return self.count // self.channels

    def merge(self, other: TapStats, max_values: int = 2_000_000) -> TapStats:
        """The statistics of this tap's data followed by ``other``'s (the same tap calibrated on more samples,
        e.g. in another process). count, min and max are exact. The sample is the two samples in order
        where together they hold all rows and fit ``max_values`` (so merging equals one pass over all the
        data), else a uniform sample of all rows of that size: how many rows come from each side is
        hypergeometric in the rows each saw, and which ones uniform within its sample, drawn with a seed
        fixed by the row counts (the same merge gives the same sample)."""
        if (other.name, other.channel_axis, other.channels) != (self.name, self.channel_axis, self.channels) or len(
            other.shape
        ) != len(self.shape):
            raise SpikecError(
                f"tap '{self.name}': cannot merge statistics of '{other.name}' (channel axis "
                f"{other.channel_axis}, {other.channels} channels, shape {list(other.shape)}) into "
                f"channel axis {self.channel_axis}, {self.channels} channels, shape {list(self.shape)}"
            )
        capacity = max(1, check_positive_int(max_values, "max_values") // self.channels)
        rows = self.rows + other.rows
        whole = len(self.sample) == self.rows and len(other.sample) == other.rows
        if whole and rows <= capacity:
            sample = np.concatenate([self.sample, other.sample])
        else:
            rng = np.random.default_rng([SAMPLE_SEED, self.rows, other.rows])
            size = min(capacity, rows)
            mine = int(
                np.clip(rng.hypergeometric(self.rows, other.rows, size), size - len(other.sample), len(self.sample))
            )
            picks = [
                np.sort(rng.choice(len(part.sample), count, replace=False))
                for part, count in ((self, mine), (other, size - mine))
            ]
            sample = np.concatenate([self.sample[picks[0]], other.sample[picks[1]]])
        return TapStats(
            name=self.name,
            shape=tuple(a if a == b else None for a, b in zip(self.shape, other.shape)),
            channel_axis=self.channel_axis,
            count=self.count + other.count,
            sample=sample,
            channel_min=np.minimum(self.channel_min, other.channel_min),
            channel_max=np.maximum(self.channel_max, other.channel_max),
        )

    def to_json(self) -> dict:
        """A JSON-serialisable summary for reports."""
        p1, p99, p999 = np.percentile(self.sample, [1, 99, 99.9])
        return {
            "name": self.name,
            "shape": list(self.shape),
            "channel_axis": self.channel_axis,
            "channels": self.channels,
            "count": self.count,
            "min": float(self.min()),
            "max": float(self.max()),
            "p1": float(p1),
            "p99": float(p99),
            "p99.9": float(p999),
            "mean": float(self.sample.mean(dtype=np.float64)),
            "std": float(self.sample.std(dtype=np.float64)),
        }
