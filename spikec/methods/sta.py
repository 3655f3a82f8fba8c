"""STA (Spatio-Temporal Approximation, ICLR 2024): passes/sta.py's rewrite, its IF thresholds by MMSE
against the T-step rate quantizer on the calibration data."""

from __future__ import annotations

from spikec.errors import SpikecError
from spikec.methods.base import MEAN, Bound, Calibration, Job, Method
from spikec.passes import sta


class STA(Method):
    name = "sta"
    paper = "Spatio-Temporal Approximation (ICLR 2024)"
    Options = sta.STAOptions
    semantics = MEAN
    bound = Bound("cosine", 0.97)
    default_timesteps = 64  # the paper's T; rate codes of IF neurons need many more steps than ECMT's

    def calibration(self, job: Job) -> Calibration:
        taps = sta.calibration_taps(job.regions, job.options)
        if not taps:
            raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to convert")
        return Calibration(
            taps=taps, neuron_sites=taps, hidden=sta.hidden_sizes(job.regions, job.options), max_values=100_000
        )

    def rewrite(self, job: Job, stats: dict) -> dict:
        return sta.rewrite(job.graph, job.regions, stats, job.timesteps, job.options, allow_float=job.allow_float)

    def report_section(self):
        from spikec.report.sta import STASection

        return STASection


METHOD = STA()
