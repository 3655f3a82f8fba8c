"""ECMT (Expectation Compensation + Multi-Threshold neurons, ACM MM 2024): passes/ecmt.py's rewrite with
thresholds from percentiles of the calibration data (Algorithm 1, line 4), optionally raised per site by
the energy objective (``sparsest``): fewer spikes for a bounded error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spikec.errors import SpikecError
from spikec.methods.base import MEAN, Bound, Calibration, Job, Method
from spikec.passes import ecmt
from spikec.passes.options import Options, option
from spikec.passes.timing import is_constant


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
    # Not in the paper: the spike products are most of the SNN's energy (docs/tune.md), and a percentile
    # threshold spends spikes on values that carry little of the signal (e.g. GELU's small negative side).
    energy_slack: float = option(
        0.0,
        "energy objective: per site and sign, raise thresholds (up to x8) to fire least over 8 steps while "
        "the error of the neurons' 8-step means of the calibration sample grows by at most this fraction "
        "of the percentile thresholds' (0: off)",
        bounds=(0, 100),
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
        objective = {}
        if o.energy_slack > 0:
            sites = ecmt.neuron_sites(job.regions)
            # only spikes into weight products cost energy by the number of spikes (spikec/report/energy.py):
            # an activation x activation product runs on running means at every step whatever fires
            for name in [n for n in stats if any(is_constant(node.inputs[1 - i]) for node, i in sites[n])]:
                thresholds[name], objective[name] = sparsest(
                    stats[name].sample, thresholds[name], o.levels, OBJECTIVE_STEPS, o.energy_slack
                )
        report = ecmt.rewrite(job.graph, job.regions, thresholds, levels=o.levels, allow_float=job.allow_float)
        report["calibration"] = {name: s.to_json() for name, s in stats.items()}
        if objective:
            report["energy_objective"] = objective
        return report

    def report_section(self):
        from spikec.report.ecmt import ECMTSection

        return ECMTSection


# Threshold multiples the energy objective searches on each sign's side: spikes fall roughly as 1/scale
# for values below theta, the T-step mean's error grows as scale.
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# values per site the objective simulates (whole rows of the calibration sample, evenly spaced)
SIMULATED_VALUES = 2**15
# the steps it simulates: ECMT's default T, whatever the model's, so that thresholds never depend on T and a
# model compiled for T is the prefix of one compiled for more steps (spikec tune measures every T that way)
OBJECTIVE_STEPS = ECMT.default_timesteps


def mt_codes(x: np.ndarray, thresholds: ecmt.Thresholds, levels: int, timesteps: int) -> np.ndarray:
    """MT neurons (runtime/ops.py's MTNeuron, run in onnxruntime) fed ``x`` [M, C] at every step for
    ``timesteps`` steps: their spike codes [T, M, C], in units of ``thresholds.positive``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from spikec.runtime import ops
    from spikec.runtime.session import quiet_options

    channels = x.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node(
                "MTNeuron",
                ["x", "theta_pos", "theta_neg"],
                ["spikes"],
                domain=ops.DOMAIN,
                levels=levels,
                timesteps=timesteps,
            )
        ],
        "mt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels])],
        [helper.make_tensor_value_info("spikes", TensorProto.FLOAT, [None, channels])],
        [
            onnx.numpy_helper.from_array(np.broadcast_to(theta, (channels,)).astype(np.float32), name)
            for name, theta in (("theta_pos", thresholds.positive), ("theta_neg", thresholds.negative))
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=ops.functions_for({"MTNeuron"}, 17),
    )
    session = ort.InferenceSession(model.SerializeToString(), quiet_options(), providers=["CPUExecutionProvider"])
    steps = np.tile(np.asarray(x, np.float32), (timesteps, 1))
    return session.run(None, {"x": steps})[0].reshape(timesteps, *x.shape)


def sparsest(
    sample: np.ndarray, thresholds: ecmt.Thresholds, levels: int, timesteps: int, slack: float
) -> tuple[ecmt.Thresholds, dict]:
    """The energy objective at one site: of ``thresholds`` times every pair of SCALES (positive side,
    negative side), the pair whose MT neurons fire least over ``timesteps`` steps of each sampled value,
    among those whose T-step means keep the relative RMS error within (1 + ``slack``) times the unscaled
    thresholds' (relative to it, the bound means the same at every T; the objective never lowers a
    threshold). Ties go to the smaller error. Returns the thresholds and what the search measured."""
    rows = max(1, min(len(sample), SIMULATED_VALUES // sample.shape[1]))
    x = sample[np.linspace(0, len(sample) - 1, rows).astype(np.int64)].astype(np.float32)
    pairs = [(a, b) for a in SCALES for b in SCALES]
    # every pair at once: the sample repeated along the channel axis, each copy with its pair's thresholds
    channels = x.shape[1]
    tiled = ecmt.Thresholds(
        np.concatenate([np.broadcast_to(thresholds.positive * a, (channels,)) for a, _ in pairs]),
        np.concatenate([np.broadcast_to(thresholds.negative * b, (channels,)) for _, b in pairs]),
    )
    codes = mt_codes(np.tile(x, (1, len(pairs))), tiled, levels, timesteps)
    means = codes.mean(axis=0, dtype=np.float64) * tiled.positive
    signal = float(np.square(x, dtype=np.float64).sum())
    spikes, errors = [], []
    for i in range(len(pairs)):
        part = slice(i * channels, (i + 1) * channels)
        spikes.append(float(np.count_nonzero(codes[:, :, part])) / (timesteps * x.size))
        residual = float(np.square(means[:, part] - x).sum())
        errors.append(float(np.sqrt(residual / signal)) if signal > 0 else 0.0)
    allowed = (1 + slack) * errors[0]
    best = min((i for i in range(len(pairs)) if errors[i] <= allowed), key=lambda i: (spikes[i], errors[i]))
    a, b = pairs[best]
    chosen = ecmt.Thresholds(
        (thresholds.positive * np.float32(a)).astype(np.float32),
        (thresholds.negative * np.float32(b)).astype(np.float32),
    )
    return chosen, {
        "scale_pos": a,
        "scale_neg": b,
        "spikes_per_value_step": [spikes[0], spikes[best]],
        "relative_error": [errors[0], errors[best]],
    }


METHOD = ECMT()
