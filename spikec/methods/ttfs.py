"""TTFSFormer (ICML 2025): time-to-first-spike conversion, one spike per neuron, no time steps.

Algorithm 1: the ANN decomposed into the constructions' stages (every site an ordinary tensor) is
calibrated for every site's range; then the same walk (passes/ttfs.py) builds the spiking graph with
those ranges."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec.calibrate import run_batches
from spikec.errors import SpikecError
from spikec.methods.base import FIRST_SPIKE, Bound, Calibration, Job, Method
from spikec.passes import emit, ttfs
from spikec.passes.patterns import find_regions
from spikec.runtime.ops import default_opset
from spikec.runtime.ttfs import Window


class _Exact(NamedTuple):
    """The ANN as the constructions' stages: the lowering (its sites) and the model that computes them."""

    lowering: ttfs.Lowering
    network: onnx.ModelProto

    @staticmethod
    def of(job: Job) -> _Exact:
        assert isinstance(job.prepared, _Exact), "TTFS.prepare runs before calibration and rewrite"
        return job.prepared


class TTFS(Method):
    name = "ttfs"
    paper = "TTFSFormer: time-to-first-spike conversion, one spike per neuron (ICML 2025)"
    Options = ttfs.TTFSOptions
    semantics = FIRST_SPIKE
    bound = Bound("relative_max_error", 1e-3)
    advice = "widen the calibrated ranges (--margin) or calibrate on more samples"
    modes = ("unrolled",)

    def prepare(self, job: Job) -> None:
        super().prepare(job)
        exact_graph = gs.import_onnx(job.ann)
        lowering = ttfs.lower(exact_graph, find_regions(exact_graph), job.options, default_opset(job.ann))
        if not lowering.sites:
            raise SpikecError("model has no float input or nonlinear layer: nothing to convert")
        job.prepared = _Exact(lowering, emit.to_model(exact_graph, job.ann, {}))

    def calibration(self, job: Job) -> Calibration:
        return Calibration(
            taps=ttfs.calibration_taps(_Exact.of(job).lowering),
            neuron_sites=[],
            model=_Exact.of(job).network,
            max_values=10_000,
        )

    def rewrite(self, job: Job, stats: dict) -> dict:
        o: ttfs.TTFSOptions = job.options
        ranges = ttfs.calibration_ranges(stats, _Exact.of(job).lowering, o.range_margin)
        clipped = self.widen_to_held_out(job, ranges)
        spiking = ttfs.lower(job.graph, job.regions, o, default_opset(job.ann), ranges)
        return {
            "ttfs": {
                "clipped": clipped,
                "sites": ttfs.describe(spiking),
                "constructions": spiking.constructions,
                "float_nodes": spiking.float_nodes,
                "delta": o.delta,
                "precision": o.precision,
                "margin": o.range_margin,
                "max_layer": o.max_layer,
            }
        }

    def widen_to_held_out(self, job: Job, ranges: dict) -> dict[str, dict] | None:
        """Widen, in place, each calibrated range that clips the held-out samples (the calibration data's
        validation part), and return per widened site the share of held-out values it clipped, how far past
        the range they reached (a fraction of its span: the error clipping would have cost there) and the
        range it had (None without held-out samples).

        A value beyond the range cannot be told from the range's end. Where the held-out samples go past an
        end by d, unseen data may go as far again: the end moves 2d past its calibrated place. The held-out
        samples then no longer measure clipping on unseen data, so what they clipped is kept in the report
        and warned about."""
        if job.held_out is None:
            return None
        exact = _Exact.of(job)
        taps = {name: (exact.lowering.sites[name].tap or exact.lowering.sites[name].value).name for name in ranges}
        outside, total = dict.fromkeys(taps, 0), dict.fromkeys(taps, 0)
        low = {name: window.lower for name, window in ranges.items()}
        high = {name: window.upper for name, window in ranges.items()}
        for batch in run_batches(
            exact.network, job.held_out, sorted(set(taps.values())), batch_size=job.batch_size, progress=False
        ):
            for name, tap in taps.items():
                window, values = ranges[name], batch[tap]
                outside[name] += int(np.count_nonzero((values < window.lower) | (values > window.upper)))
                total[name] += values.size
                low[name], high[name] = min(low[name], float(values.min())), max(high[name], float(values.max()))
        clipped = {}
        for name in (name for name in taps if outside[name]):
            window, floor = ranges[name], exact.lowering.sites[name].floor
            span = window.upper - window.lower
            lower = 2 * low[name] - window.lower
            ranges[name] = Window(
                lower if floor is None else max(lower, floor), 2 * high[name] - window.upper, window.delta
            )
            clipped[name] = {
                "share": outside[name] / total[name],
                "overshoot": max(window.lower - low[name], high[name] - window.upper) / span,
                "from": [window.lower, window.upper],
            }
        if clipped:
            from spikec.compiler import FidelityWarning

            worst = sorted(clipped, key=lambda name: clipped[name]["share"], reverse=True)
            warnings.warn(
                f"{len(clipped)} of {len(taps)} TTFS ranges clip held-out calibration samples ("
                + ", ".join(f"'{name}' {clipped[name]['share']:.2%}" for name in worst[:3])
                + (", ..." if len(worst) > 3 else "")
                + "), widened to cover them: unseen data may "
                f"reach further; raise --margin (now {job.options.range_margin:g}) or calibrate on "
                "more samples",
                FidelityWarning,
                stacklevel=2,
            )
        return clipped

    def report_section(self):
        from spikec.report.ttfs import TTFSSection

        return TTFSSection


METHOD = TTFS()
