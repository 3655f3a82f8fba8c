"""ECMT (Expectation Compensation + Multi-Threshold neurons, ACM MM 2024): passes/ecmt.py's rewrite with
thresholds from percentiles of the calibration data (Algorithm 1, line 4)."""

from __future__ import annotations

from dataclasses import dataclass

from spikec.errors import SpikecError
from spikec.methods.base import MEAN, Bound, Calibration, Job, Method
from spikec.passes import ecmt
from spikec.passes.options import Options, option


@dataclass(frozen=True)
class ECMTOptions(Options):
    levels: int = option(8, "n: each MT neuron gets 2n thresholds theta*2^k", bounds=(1, 24))
    # Not the paper's p=99 per tensor: measured on MiniLM and the digits ViT (docs/methods/ecmt.md), p=90
    # per channel is as good or better on both, and per tensor a few outlier channels set every threshold.
    percentile: float = option(
        90.0, "p: theta_1 / theta_2 from the p-th / (100-p)-th percentile", bounds=(50, 100), open_low=True
    )
    per_channel: bool = option(True, "thresholds per channel (last axis; off: one per tensor)")
    # Not in the paper: see ecmt.Thresholds.covering.
    coverage: float = option(
        1.0,
        "raise thresholds until the top level reaches this multiple of the calibration "
        "maximum (0: percentiles only, as the paper)",
        bounds=(0, 1e6),
    )


class ECMT(Method):
    name = "ecmt"
    paper = "Expectation Compensation + Multi-Threshold neurons (ACM MM 2024)"
    Options = ECMTOptions
    semantics = MEAN
    bound = Bound("cosine", 0.99)
    advice = "raise --timesteps, or try another --percentile"

    def calibration(self, job: Job) -> Calibration:
        sites = list(ecmt.neuron_sites(job.regions))
        if not sites:
            raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to convert")
        return Calibration(taps=sites, neuron_sites=sites)

    def rewrite(self, job: Job, stats: dict) -> dict:
        o: ECMTOptions = job.options
        # Algorithm 1, line 4: theta_1 = p-th percentile, theta_2 = -(100-p)-th percentile.
        thresholds = {
            name: ecmt.Thresholds.from_percentiles(
                s.percentile(o.percentile, o.per_channel), s.percentile(100.0 - o.percentile, o.per_channel)
            ).covering(s.max(o.per_channel), s.min(o.per_channel), o.levels, o.coverage)
            for name, s in stats.items()
        }
        report = ecmt.rewrite(job.graph, job.regions, thresholds, levels=o.levels, allow_float=job.allow_float)
        report["calibration"] = {name: s.to_json() for name, s in stats.items()}
        return report

    def report_section(self):
        from spikec.report.ecmt import ECMTSection

        return ECMTSection


METHOD = ECMT()
