"""ECMT (Expectation Compensation + Multi-Threshold neurons, ACM MM 2024): passes/ecmt.py's rewrite with
thresholds from percentiles of the calibration data (Algorithm 1, line 4), optionally raised per site by
the energy objective (``sparsest``): fewer spikes for a bounded error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from spikec.errors import SpikecError
from spikec.methods.base import MEAN, Bound, Calibration, Job, Method
from spikec.passes import ecmt
from spikec.passes import options as options_lib
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
    # Not in the paper: see least_error. Off by default: with unbias it fixes Swin-v2 but tips MobileViT
    # below the conformance bound (docs/conformance.md, conf5), and unbias leaves chains unfused.
    threshold_search: bool = option(
        False,
        "scale each site's thresholds (per channel, unless --no-per-channel) by the factor of 0.5-1.4 whose "
        "neurons' 8-step means of the calibration sample err least (off: the percentile rule)",
    )
    # Not in the paper: see ecmt.Thresholds.gain. The one setting that depends on T: the shortfall falls as
    # 1/T, and a gain measured at another T compounds its own error over a deep network's sites.
    unbias: bool = option(False, "divide each neuron's spike value by the measured gain of its T-step mean")
    # Not in the paper: the spike products are most of the SNN's energy (docs/tune.md), and a percentile
    # threshold spends spikes on values that carry little of the signal (e.g. GELU's small negative side).
    energy_slack: float = option(
        0.0,
        "energy objective: per site and sign, raise thresholds (up to x8) to fire least over 8 steps while "
        "the error of the neurons' 8-step means of the calibration sample grows by at most this fraction "
        "of the thresholds' it starts from (0: off)",
        bounds=(0, 100),
    )


class ECMT(Method):
    name = "ecmt"
    paper = "Expectation Compensation + Multi-Threshold neurons (ACM MM 2024)"
    Options = ECMTOptions
    semantics = MEAN
    bound = Bound("cosine", 0.99)
    advice = "raise --timesteps, or try another --percentile"
    # the fewest steps its T search tries (and T with --unbias): the objective below simulates this many
    default_timesteps: int = 8

    def measures_timesteps(self, options: options_lib.Options) -> bool:
        # every other setting's thresholds are the same at every T: one rewrite serves every T searched
        return not (isinstance(options, ECMTOptions) and options.unbias)

    def calibration(self, job: Job) -> Calibration:
        sites = list(ecmt.neuron_sites(job.regions))
        if not sites:
            raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to convert")
        return Calibration(taps=sites, neuron_sites=sites)

    def rewrite(self, job: Job, stats: dict) -> dict:
        o: ECMTOptions = job.options
        # Algorithm 1, line 4: theta_1 = p-th percentile, theta_2 = -(100-p)-th percentile.
        thresholds, searched = {}, {}
        for name, s in stats.items():
            base = ecmt.Thresholds.from_percentiles(
                s.percentile(o.percentile, o.per_channel), s.percentile(100.0 - o.percentile, o.per_channel)
            )
            cover = partial(
                ecmt.Thresholds.covering,
                high=s.max(o.per_channel),
                low=s.min(o.per_channel),
                levels=o.levels,
                coverage=o.coverage,
            )
            if o.threshold_search:
                thresholds[name], searched[name] = least_error(
                    s.sample, base, cover, o.levels, OBJECTIVE_STEPS, o.per_channel, o.unbias
                )
            else:
                thresholds[name] = cover(base)
        objective = {}
        if o.energy_slack > 0:
            sites = ecmt.neuron_sites(job.regions)
            # only spikes into weight products cost energy by the number of spikes (spikec/report/energy.py):
            # an activation x activation product runs on running means at every step whatever fires
            for name in [n for n in stats if any(is_constant(node.inputs[1 - i]) for node, i in sites[n])]:
                thresholds[name], objective[name] = sparsest(
                    stats[name].sample, thresholds[name], o.levels, OBJECTIVE_STEPS, o.energy_slack
                )
        if o.unbias:
            assert job.timesteps is not None, "with --unbias T is not measured (measures_timesteps)"
            thresholds = {
                name: unbiased(stats[name].sample, theta, o.levels, job.timesteps) for name, theta in thresholds.items()
            }
        report = ecmt.rewrite(job.graph, job.regions, thresholds, levels=o.levels, allow_float=job.allow_float)
        report["calibration"] = {name: s.to_json() for name, s in stats.items()}
        if searched:
            report["threshold_search"] = searched
        if objective:
            report["energy_objective"] = objective
        return report

    def report_section(self):
        from spikec.report.ecmt import ECMTSection

        return ECMTSection


# Factors of the percentile thresholds the error search tries (both signs alike): for normal, Laplace and
# GELU-like samples the T-step mean errs least at 0.5 to 0.7 times the 90th percentile, at every T from 4
# to 64 (Eq. 25 rounds a membrane far above theta to a power of two: what is left scales with the value,
# not with theta).
SEARCH_SCALES = (0.5, 0.7, 1.0, 1.4)
SEARCH_TIE = 1e-3
# A mean gain outside this band is no rounding bias but values the neurons do not resolve in the horizon
# (far below theta): dividing by it would scale what they fire at a longer T; such channels keep gain 1.
GAIN_BAND = (0.9, 1.1)
# Threshold multiples the energy objective searches on each sign's side: spikes fall roughly as 1/scale
# for values below theta, the T-step mean's error grows as scale.
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# values per site the objective simulates (whole rows of the calibration sample, evenly spaced)
SIMULATED_VALUES = 2**15
# the steps the energy objective and the error search simulate: ECMT's default T, whatever the model's, so
# that thresholds never depend on T (spikec tune reads every T as a prefix of one model; the mean gain, the
# one part measured at the model's T, makes a prefix slightly less faithful than a model compiled for it)
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


def _rows(sample: np.ndarray) -> np.ndarray:
    """Whole rows of a calibration sample, evenly spaced, SIMULATED_VALUES values at most."""
    rows = max(1, min(len(sample), SIMULATED_VALUES // sample.shape[1]))
    return sample[np.linspace(0, len(sample) - 1, rows).astype(np.int64)].astype(np.float32)


def _simulated(
    x: np.ndarray, candidates: list[ecmt.Thresholds], levels: int, timesteps: int
) -> tuple[np.ndarray, np.ndarray]:
    """The neurons fed ``x`` [M, C] under each candidate's thresholds, all in one run (the sample repeated
    along the channel axis, each copy with its candidate's thresholds): their spike codes [K, T, M, C] and
    ``timesteps``-step means [K, M, C]."""
    channels = x.shape[1]
    tiled = ecmt.Thresholds(
        np.concatenate([np.broadcast_to(c.positive, (channels,)) for c in candidates]),
        np.concatenate([np.broadcast_to(c.negative, (channels,)) for c in candidates]),
    )
    codes = mt_codes(np.tile(x, (1, len(candidates))), tiled, levels, timesteps)
    means = codes.mean(axis=0, dtype=np.float64) * tiled.positive

    def per_candidate(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a.reshape(*a.shape[:-1], len(candidates), channels), -2, 0)

    return per_candidate(codes), per_candidate(means)


def _gains(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per channel least-squares slope of ``means`` [..., M, C] over ``x`` [M, C]; 1 outside GAIN_BAND."""
    power = np.square(x, dtype=np.float64).sum(axis=0)
    slope = (means * x).sum(axis=-2) / np.where(power > 0, power, 1.0)
    return np.where((slope >= GAIN_BAND[0]) & (slope <= GAIN_BAND[1]), slope, 1.0)


def unbiased(sample: np.ndarray, thresholds: ecmt.Thresholds, levels: int, timesteps: int) -> ecmt.Thresholds:
    """``thresholds`` with the per-channel gain of their neurons' ``timesteps``-step means of the sample."""
    x = _rows(sample)
    gain = _gains(x, _simulated(x, [thresholds], levels, timesteps)[1][0])
    return ecmt.Thresholds(thresholds.positive, thresholds.negative, gain.astype(np.float32))


def least_error(
    sample: np.ndarray,
    thresholds: ecmt.Thresholds,
    cover: Callable[[ecmt.Thresholds], ecmt.Thresholds],
    levels: int,
    timesteps: int,
    per_channel: bool,
    unbias: bool,
) -> tuple[ecmt.Thresholds, dict]:
    """The error search at one site: of ``thresholds`` times each of SEARCH_SCALES (then ``cover``ed), the
    factor whose neurons' ``timesteps``-step means of the sample (divided by their gain where ``unbias``)
    have the least squared error, per channel where ``per_channel``, else over the tensor. A percentile
    says where values lie, not which threshold codes them best: Eq. 25's residual is about theta/2 for
    values below theta and a fraction of the value above it, and the balance depends on the distribution.
    Returns the thresholds and what the search measured (relative RMS error at factor 1 and chosen)."""
    x = _rows(sample)
    candidates = [
        cover(ecmt.Thresholds(thresholds.positive * np.float32(f), thresholds.negative * np.float32(f)))
        for f in SEARCH_SCALES
    ]
    _, means = _simulated(x, candidates, levels, timesteps)
    if unbias:
        means = means / _gains(x, means)[:, None, :]
    errors = np.square(means - x).sum(axis=1)  # [K, C]
    if not per_channel:
        errors = errors.sum(axis=1, keepdims=True)
    # Float noise (another batch size or BLAS, values 1e-7 apart) must not flip the choice between nearly
    # equal candidates: those within SEARCH_TIE of the least error count as equal, and the factor nearest 1
    # (the percentile rule) wins among them.
    near = errors <= errors.min(axis=0) * (1 + SEARCH_TIE)
    preference = np.argsort(np.abs(np.log(SEARCH_SCALES)), kind="stable")
    pick = preference[near[preference].argmax(axis=0)]
    columns = np.arange(len(pick))
    best = candidates[int(pick[0])]
    if per_channel:
        best = ecmt.Thresholds(
            *(
                np.stack([np.broadcast_to(getattr(c, side), (x.shape[1],)) for c in candidates])[pick, columns]
                for side in ("positive", "negative")
            )
        )
    signal = float(np.square(x, dtype=np.float64).sum()) or 1.0
    unscaled = SEARCH_SCALES.index(1.0)
    return best, {
        "scales": sorted({SEARCH_SCALES[i] for i in pick}),
        "relative_error": [
            float(np.sqrt(errors[unscaled].sum() / signal)),
            float(np.sqrt(errors[pick, columns].sum() / signal)),
        ],
    }


def sparsest(
    sample: np.ndarray, thresholds: ecmt.Thresholds, levels: int, timesteps: int, slack: float
) -> tuple[ecmt.Thresholds, dict]:
    """The energy objective at one site: of ``thresholds`` times every pair of SCALES (positive side,
    negative side), the pair whose MT neurons fire least over ``timesteps`` steps of each sampled value,
    among those whose T-step means keep the relative RMS error within (1 + ``slack``) times the unscaled
    thresholds' (relative to it, the bound means the same at every T; the objective never lowers a
    threshold). Ties go to the smaller error. Returns the thresholds and what the search measured."""
    x = _rows(sample)
    pairs = [(a, b) for a in SCALES for b in SCALES]
    candidates = [ecmt.Thresholds(thresholds.positive * a, thresholds.negative * b) for a, b in pairs]
    codes, means = _simulated(x, candidates, levels, timesteps)
    signal = float(np.square(x, dtype=np.float64).sum())
    spikes = [float(np.count_nonzero(c)) / (timesteps * x.size) for c in codes]
    errors = [float(np.sqrt(np.square(m - x).sum() / signal)) if signal > 0 else 0.0 for m in means]
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
