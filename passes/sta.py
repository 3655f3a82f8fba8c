"""STA (Spatio-Temporal Approximation, seed 000) as graph rewrites, mean semantics.

* GELU becomes its universal group operator (spikec/ugo.py): h = w1 x + b1 per element and hidden
  unit, N IF neurons, then w2 . spikes + b2. The UGO's output is a weighted sum of spikes. SiLU and
  quick_gelu get spikec's SiLU UGO; other activations (Sigmoid, Tanh, Relu, HardSwish) stay exact with
  expectation compensation (activation_operator), as does an activation whose calibrated inputs the UGO
  does not fit (ugo_fits: its fit error, absolute, swamps a site of tiny values).
* Every other activation input of a weight product gets an X2X encoder: IF neurons on x and on -x
  (relu(x) - relu(-x)), as the reference code encodes the LayerNorm and attention outputs.
* Activation x activation products use TCSA (Def. 3), the expectation-compensated product; with
  ``tcsa=False`` the naive temporal split of Def. 2 (increments of the product of running sums,
  weighted 1/T) for the ablation.
* IF neurons are signed with memory (Eq. 34) and fire burst spikes (Gamma=8, rho=1/8; the paper's 2), each
  switchable off; thresholds come from an MMSE grid search against the T-step rate quantizer
  (Eq. 33, the reference code's grid of 95 points in [0.53, 1] x max): per hidden unit for UGOs; per channel
  for X2X encoders, lifted to the site's typical multiple of the channel's RMS with headroom
  (encoder_thresholds).
* LayerNorm (over the last axis) is decomposed as appendix D.1 says: centering and averaging as
  weighted additions, the two elementwise products by TCSA, 1/sqrt by the rsqrt UGO; RMSNorm and L2
  normalization the same way without the centering. Gated MLPs' act(gate) * up is a TCSA product.
* Softmax stays in float with expectation compensation by default, as the reference code runs it;
  ``softmax_ugo`` decomposes it as appendix D.2 says (exp and inverse UGOs between clamps). That loses
  accuracy (docs/methods/sta.md): with the first column as offset (the reference code's), the largest
  shifted scores exceed the exp UGO's domain top (3), and the clamp flattens exactly the peaks softmax
  exists to keep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.options import Options, option
from spikec.passes.patterns import Region
from spikec.passes.regions import WEIGHT_PRODUCT, Operands, detach, operand_sites
from spikec.passes.stats import DEFAULT_MMSE_GRID, TapStats
from spikec.passes.timing import (
    MEAN,
    convert_time,
    fresh_like,
    refuse_float_in_regions,
    running_sum_product,
)
from spikec.passes.ttfs import Masking
from spikec.runtime import ugo as ugos
from spikec.runtime.layout import UGO_ACTIVATION, UGO_EXP, UGO_INVERSE, UGO_RSQRT, ugo_node

SAMPLE_VALUES = 100_000  # per UGO hidden layer: the MMSE search runs on a subsample
# A UGO's largest fit error on a site's calibrated inputs, as a fraction of the site's output span, above which
# the activation stays exact. Measured: the zoo's GELU/SiLU/quick_gelu sites stay below 0.002; MobileViT's
# BatchNorm-shrunk stages (inputs ~1e-5 against a fit error ~1e-3) reach 150.
UGO_FIT_TOLERANCE = 0.01
# X2X encoder thresholds over the site's typical multiple of a channel's RMS (encoder_thresholds). Measured at
# T=32 (docs/methods/sta.md): without it LeViT and MobileViT clip held-out values; 2 loses on MobileViT.
ENCODER_HEADROOM = 1.5


@dataclass(frozen=True)
class STAOptions(Options):
    ugo: bool = option(True, "GELU and LayerNorm by UGOs (off: both exact in float, compensated)")
    tcsa: bool = option(True, "activation products by TCSA (off: the naive temporal split of Def. 2)")
    signed: bool = option(True, "signed IF neurons with memory (off: no negative spikes)")
    # 8, not the paper's 2: at T=64 the rate code's step theta/(T*burst) is what limits a BERT-sized model
    # (docs/defaults.md); more burst refines it without moving the thresholds
    burst: int = option(8, "burst spikes per step (1: plain IF)", bounds=(1, 64))
    gelu_hidden: int | None = option(
        None,
        "GELU UGO size N (shipped: 32, the paper's, and 64, the reference code's; default the paper's)",
        bounds=(1, 4096),
        metavar="N",
    )
    softmax_ugo: bool = option(
        False, "Softmax by exp/inverse UGOs (appendix D.2) instead of float, as the reference code runs it"
    )


def rate_quantizer(timesteps: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """QT(z) = theta/T * clamp(floor(T z / theta), 0, T): what an IF neuron's rate makes of z."""

    def quantize(z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, np.float64)
        # in place on one float64 buffer: the MMSE search calls this per grid entry on 10^6-value samples
        levels = np.divide(timesteps * z, theta)
        np.floor(levels, out=levels)
        np.clip(levels, 0, timesteps, out=levels)
        levels *= theta / timesteps
        return levels

    return quantize


def _stats_of(name: str, sample: np.ndarray) -> TapStats:
    """TapStats over a [rows, channels] sample (the MMSE search needs only sample, min and max)."""
    return TapStats(
        name,
        (None, sample.shape[1]),
        1,
        int(sample.size),
        sample.astype(np.float32),
        sample.min(axis=0).astype(np.float32),
        sample.max(axis=0).astype(np.float32),
    )


def mmse_thresholds(stats: TapStats, timesteps: int) -> np.ndarray:
    """Per channel; a channel that never goes positive gets the largest threshold of the others (it never
    fires either way)."""
    theta = stats.mmse(rate_quantizer(timesteps), per_channel=True, grid=DEFAULT_MMSE_GRID, reference="max")
    fallback = theta.max() if (theta > 0).any() else np.float32(1.0)
    return np.where(theta > 0, theta, fallback).astype(np.float32)


def encoder_thresholds(stats: TapStats, timesteps: int) -> np.ndarray:
    """Per channel c: the larger of its own MMSE threshold (mmse_thresholds) and ENCODER_HEADROOM * g * rms_c,
    with rms_c the root mean square of the channel's positive part and g the site's median over channels of
    own threshold / rms_c. An encoder's IF neuron passes at most theta per step, so a held-out value above its
    channel's calibrated range is clipped; a channel's own maximum over few calibration rows (a late stage of
    a conv-stem model sees a few tokens per image) says little about that range, the site's other channels
    say more, and the headroom covers what calibration did not see (docs/methods/sta.md). A channel of
    outliers keeps its own threshold: a multiple pooled over channels would be its, and cost every other
    channel its resolution."""
    own = mmse_thresholds(stats, timesteps)
    sample = stats.sample.astype(np.float64)
    rms = np.sqrt(np.square(np.maximum(sample, 0.0)).mean(axis=0)) if len(sample) else np.zeros(stats.channels)
    live = (rms > 0) & (stats.channel_max > 0)
    if not live.any():
        return own
    multiple = float(np.median(own[live] / rms[live]))
    return np.where(live, np.maximum(own, ENCODER_HEADROOM * multiple * rms), own).astype(np.float32)


def _negated(stats: TapStats) -> TapStats:
    return replace(
        stats,
        name=stats.name + ".negated",
        sample=-stats.sample,
        channel_min=-stats.channel_max,
        channel_max=-stats.channel_min,
    )


def x2x_encoder(
    graph: gs.Graph, tensor: gs.Variable, stats: TapStats, timesteps: int, options: STAOptions
) -> tuple[gs.Variable, dict]:
    """relu(x) - relu(-x) by two IF neurons, one spikec X2XEncoder op: spikes(x) - spikes(-x)."""
    theta_pos, theta_neg = encoder_thresholds(stats, timesteps), encoder_thresholds(_negated(stats), timesteps)
    node_name = f"{tensor.name}/X2X"
    b = GraphBuilder(graph, node_name)
    encoded = b.spikec(
        "X2XEncoder",
        tensor,
        b.const(theta_pos, None, name=f"{node_name}.theta_pos"),
        b.const(theta_neg, None, name=f"{node_name}.theta_neg"),
        out=fresh_like(tensor, ".x2x"),
        name=node_name,
        signed=int(options.signed),
        burst=int(options.burst),
    )
    return encoded, {
        "tensor": tensor.name,
        "encoder": "X2X",
        "theta_pos": theta_pos.tolist(),
        "theta_neg": theta_neg.tolist(),
    }


def _consumers(operands: list[tuple[gs.Node, int]]) -> list[str]:
    return sorted({node.name for node, _ in operands})


def _ugo(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    out: gs.Variable,
    operator: ugos.UGO,
    inputs: np.ndarray,
    timesteps: int,
    options: STAOptions,
) -> np.ndarray:
    """out = w2 . IF(w1 x + b1) + b2 elementwise, one spikec UGO op (its N hidden neurons are its state,
    never a tensor of the graph); the hidden thresholds by MMSE over the hidden pre-activations of
    ``inputs`` (a sample of x). Returns the thresholds."""
    rng = np.random.default_rng(0)
    values = inputs.reshape(-1)
    values = values[rng.choice(values.size, min(values.size, SAMPLE_VALUES), replace=False)]
    hidden_sample = values[:, None].astype(np.float64) * operator.w1 + operator.b1
    theta = mmse_thresholds(_stats_of(f"{x.name}.ugo_hidden", hidden_sample), timesteps)

    b = GraphBuilder(graph, prefix)
    weights = [
        b.const(value, name=f"{prefix}.{name}")
        for name, value in (
            ("w1", operator.w1),
            ("b1", operator.b1),
            ("theta", theta),
            ("w2", operator.w2),
            ("b2", operator.b2),
        )
    ]
    b.spikec("UGO", x, *weights, out=out, name=prefix, signed=int(options.signed), burst=int(options.burst))
    return theta


# quick_gelu(x) = silu(1.702 x) / 1.702
QUICK_GELU_SCALE = 1.702


def activation_operator(region: Region, options: STAOptions) -> ugos.UGO | None:
    """The UGO standing in for a GELU or activation region: GELU (erf or tanh form) by GELU's, SiLU and quick_gelu
    by SiLU's (spikec's; scaled for quick_gelu). Sigmoid, Tanh, Relu, HardSwish and HardSigmoid have none: they
    stay exact, with expectation compensation."""
    if not options.ugo:
        return None
    if region.kind == "gelu":
        return ugos.load("gelu", options.gelu_hidden)
    function = region.attrs.get("function") if region.kind == "activation" else None
    if function == "silu":
        return ugos.load("silu")
    if function == "quick_gelu":
        return ugos.load("silu").scaled(QUICK_GELU_SCALE)
    return None


def _exact_activation(region: Region) -> Callable[[np.ndarray], np.ndarray]:
    function = region.attrs.get("function") if region.kind == "activation" else "gelu"
    if function == "quick_gelu":
        return lambda x: ugos.SPECS["silu"].function(QUICK_GELU_SCALE * x) / QUICK_GELU_SCALE
    return ugos.SPECS[function].function


def ugo_fit(region: Region, operator: ugos.UGO, stats: TapStats) -> dict:
    """The UGO's largest error against the exact activation on (a subsample of) the site's calibrated inputs,
    and the span of the exact outputs there. The fit error is absolute (the UGO is fitted on [-25, 25]), so a
    site of tiny inputs sees it as large as its whole output."""
    values = stats.sample.reshape(-1).astype(np.float64)
    if values.size > SAMPLE_VALUES:
        values = values[np.random.default_rng(0).choice(values.size, SAMPLE_VALUES, replace=False)]
    exact = _exact_activation(region)(values)
    error = float(np.abs(operator(values) - exact).max()) if values.size else 0.0
    span = float(exact.max() - exact.min()) if values.size else 0.0
    return {"region": region.name, "fit_error": error, "output_span": span}


def ugo_fits(fit: dict) -> bool:
    return fit["fit_error"] <= UGO_FIT_TOLERANCE * fit["output_span"]


def activation_ugo(
    graph: gs.Graph, region: Region, operator: ugos.UGO, stats: TapStats, timesteps: int, options: STAOptions
) -> dict:
    """Replace a GELU or activation region by its UGO with a spiking hidden layer."""
    x, out = region.inputs[0], region.outputs[0]
    detach(region)
    theta = _ugo(graph, ugo_node(region.name, UGO_ACTIVATION), x, out, operator, stats.sample, timesteps, options)
    return {
        "region": region.name,
        "operator": region.attrs.get("function", "gelu"),
        "hidden": operator.hidden,
        "input": x.name,
        "theta": theta.tolist(),
    }


def layernorm_ugo(
    graph: gs.Graph, region: Region, stats: TapStats, timesteps: int, options: STAOptions, opset: int
) -> dict | None:
    """Appendix D.1: c = x - mean(x); var = mean(c * c) (a TCSA product); r = 1/sqrt(var + eps) by the rsqrt
        UGO; LN = gamma * (c * r) + beta (TCSA again). The UGO's domain is (0.01, 1]: var + eps is scaled by
        s = 1/(its calibration maximum) first and r by sqrt(s) after (spikec's; the reference code drops eps
        and relies on the variance staying in the domain). RMSNorm is the same without the centering (c = x),
        L2 normalization with a sum for the mean. A LayerNorm whose calibration variances span more than
    the domain's 100:1 stays float (returns None), as does one over more than the last axis."""
    x, out = region.inputs[0], region.outputs[0]
    epsilon, center = region.attrs["epsilon"], region.attrs["center"]
    reduce_op = {"mean": "ReduceMean", "sum": "ReduceSum"}[region.attrs["reduction"]]
    sample = stats.sample.astype(np.float64)  # the sample holds whole rows
    squares = np.square(sample - sample.mean(axis=1, keepdims=True) if center else sample)
    variance = (squares.mean(axis=1) if reduce_op == "ReduceMean" else squares.sum(axis=1)) + epsilon
    scale = float(1.0 / variance.max())
    low = ugos.SPECS["rsqrt"].domain[0]
    if (variance * scale).min() < low:
        # calibrated variances span more than the UGO's domain (100:1): some rows would fall outside it
        return None
    prefix = f"{region.name}/LayerNormUGO"
    detach(region)
    b = GraphBuilder(graph, prefix, opset, like=x)
    centered = b.op("Sub", x, b.reduce("ReduceMean", x)) if center else x
    variance_eps = b.op("Add", b.reduce(reduce_op, b.op("Mul", centered, centered)), b.const(epsilon))
    scaled = b.op("Mul", variance_eps, b.const(scale))
    operator = ugos.load("rsqrt")
    root_scaled = b.fresh("rsqrt_scaled")
    theta = _ugo(
        graph, ugo_node(region.name, UGO_RSQRT), scaled, root_scaled, operator, variance * scale, timesteps, options
    )
    root = b.op("Mul", root_scaled, b.const(np.sqrt(scale)))
    gamma, beta = region.attrs["scale"], region.attrs["bias"]
    normalized = b.op("Mul", centered, root, out=out if gamma is None and beta is None else None)
    if gamma is not None:
        normalized = b.op("Mul", normalized, gamma, out=out if beta is None else None)
    if beta is not None:
        b.op("Add", normalized, beta, out=out)
    return {
        "region": region.name,
        "operator": "rsqrt",
        "hidden": operator.hidden,
        "input": x.name,
        "variance_scale": scale,
        "theta": theta.tolist(),
    }


# Table 3's domains of the exp and inverse UGOs
EXP_DOMAIN = (-35.0, 3.0)
INVERSE_DOMAIN = (2.0, 75.0)


def softmax_ugo(graph: gs.Graph, region: Region, stats: TapStats, timesteps: int, options: STAOptions) -> dict:
    """Appendix D.2 with the reference code's offset: shift by the first column (linear, it cancels),
    clamp into the exp UGO's domain, e = exp UGO, S = sum e, clamp k*S into the inverse UGO's domain
    (k = 75 / the calibration maximum of S: spikec's scaling, where the reference code renormalizes),
    softmax = e * k * inverse(k S) by TCSA. The clamps are float ops, with expectation compensation.
    A mask takes TTFS's time-invariant terms (ttfs.Masking): the exp UGO sees the scores alone, and e is
    weighted by e^m' (0 where masked), so a masked score never meets the clamp; a row masked everywhere
    by -inf gives 0, as sdpa's guard does. ``stats`` are the unmasked scores' (a -inf mask makes the masked
    ones unmeasurable): their sums bound the weighted ones, so k never pushes k*S above the domain."""
    attrs = region.attrs
    scores, out = attrs["scores"], region.outputs[0]
    prefix = f"{region.name}/SoftmaxUGO"
    sample = stats.sample.astype(np.float64)
    shifted_sample = np.clip(sample - sample[:, :1], *EXP_DOMAIN)
    sums = np.exp(shifted_sample).sum(axis=1)
    k = float(INVERSE_DOMAIN[1] / sums.max())
    detach(region)  # mask, softmax and guard go
    b = GraphBuilder(graph, prefix, graph.opset)
    masking = Masking(b, attrs["masks"], scores) if attrs["masks"] else None
    x = scores if masking is None else masking.scores(scores)
    first = b.op("Slice", x, b.const([0], np.int64), b.const([1], np.int64), b.const([-1], np.int64))
    clamped = b.op("Clip", b.op("Sub", x, first), b.const(EXP_DOMAIN[0]), b.const(EXP_DOMAIN[1]))
    exp_operator, inverse_operator = ugos.load("exp"), ugos.load("inverse")
    exps = b.fresh("exp")
    theta_exp = _ugo(
        graph, ugo_node(region.name, UGO_EXP), clamped, exps, exp_operator, shifted_sample, timesteps, options
    )
    if masking is not None:
        exps = b.op("Mul", exps, b.op("Exp", masking.log_weight(0.0)))
    bounded = b.op(
        "Clip",
        b.op("Mul", b.reduce("ReduceSum", exps), b.const(k)),
        b.const(INVERSE_DOMAIN[0]),
        b.const(INVERSE_DOMAIN[1]),
    )
    inverse = b.fresh("inverse")
    theta_inv = _ugo(
        graph,
        ugo_node(region.name, UGO_INVERSE),
        bounded,
        inverse,
        inverse_operator,
        np.clip(sums * k, *INVERSE_DOMAIN),
        timesteps,
        options,
    )
    b.op("Mul", exps, b.op("Mul", inverse, b.const(k)), out=out)
    return {
        "region": region.name,
        "operator": "softmax (exp, inverse)",
        "hidden": exp_operator.hidden + inverse_operator.hidden,
        "input": scores.name,
        "sum_scale": k,
        "theta": theta_exp.tolist() + theta_inv.tolist(),
    }


def naive_split(graph: gs.Graph, node: gs.Node, name: str, timesteps: int) -> dict:
    """Def. 2: P(t) = (S_A(t) S_B(t) - S_A(t-1) S_B(t-1)) / T from running sums; its mean over T is the
    product of the means, but its steps grow with t."""
    return running_sum_product(graph, node, name, label="Naive", rewrite="naive split (Def. 2)", weight=1.0 / timesteps)


def encoder_sites(regions: list[Region], skip: set[str]) -> dict[str, Operands]:
    """Activation inputs of weight products, except those a UGO already delivers as spikes."""
    return operand_sites(regions, (WEIGHT_PRODUCT,), keep=lambda tensor: tensor.name not in skip)


def calibration_taps(regions: list[Region], options: STAOptions) -> list[str]:
    """The ANN tensors whose statistics rewrite() needs."""
    activations = [r for r in regions if activation_operator(r, options) is not None]
    ugo_inputs = [r.inputs[0].name for r in activations]
    ugo_inputs += [r.inputs[0].name for r in regions if r.kind == "layernorm"] if options.ugo else []
    ugo_inputs += (
        [r.attrs["scores"].name for r in regions if r.kind == "softmax"] if options.ugo and options.softmax_ugo else []
    )
    # the activations' outputs too: one the UGO does not fit stays exact, and its consumers get X2X encoders
    return list(dict.fromkeys([*encoder_sites(regions, set()), *ugo_inputs]))


def hidden_sizes(regions: list[Region], options: STAOptions) -> dict[str, int]:
    """Per GELU (or SiLU) input, the N hidden neurons its UGO keeps per element (their states dominate a
    stateful STA model's memory; the rsqrt UGOs' are per LayerNorm row, small)."""
    operators = [(r, activation_operator(r, options)) for r in regions]
    return {r.inputs[0].name: operator.hidden for r, operator in operators if operator is not None}


def rewrite(
    graph: gs.Graph,
    regions: list[Region],
    stats: dict[str, TapStats],
    timesteps: int,
    options: STAOptions = STAOptions(),
    *,
    allow_float: frozenset[str] = frozenset(),
) -> dict:
    refuse_float_in_regions(regions, set(allow_float))
    opset = graph.opset
    candidates = [(r, operator) for r in regions if (operator := activation_operator(r, options)) is not None]
    fits = [ugo_fit(r, operator, stats[r.inputs[0].name]) for r, operator in candidates]
    activations = [candidate for candidate, fit in zip(candidates, fits) if ugo_fits(fit)]
    gelus = [r for r, _ in activations]
    norms = [r for r in regions if r.kind == "layernorm" and r.attrs["axis"] == -1] if options.ugo else []
    softmaxes = [r for r in regions if r.kind == "softmax"] if options.ugo and options.softmax_ugo else []
    ugo_outputs = {r.outputs[0].name for r in gelus}
    sites = encoder_sites(regions, ugo_outputs)
    tensors = graph.tensors()
    encoders = []
    for name, operands in sites.items():
        encoded, info = x2x_encoder(graph, tensors[name], stats[name], timesteps, options)
        for node, index in operands:
            node.inputs[index] = encoded
        encoders.append({**info, "consumers": _consumers(operands)})
    replaced = [
        activation_ugo(graph, r, operator, stats[r.inputs[0].name], timesteps, options) for r, operator in activations
    ]
    decomposed = [(r, layernorm_ugo(graph, r, stats[r.inputs[0].name], timesteps, options, opset)) for r in norms]
    norms = [r for r, info in decomposed if info is not None]
    replaced += [info for _, info in decomposed if info is not None]
    replaced += [softmax_ugo(graph, r, stats[r.attrs["scores"].name], timesteps, options) for r in softmaxes]
    graph.cleanup()
    product = None if options.tcsa else functools.partial(naive_split, timesteps=timesteps)
    rewritten = {id(r) for r in [*gelus, *norms, *softmaxes]}
    timing = convert_time(
        graph, [r for r in regions if id(r) not in rewritten], set(allow_float), MEAN, product=product
    )
    return {
        "neurons": [],
        "encoders": encoders,
        "ugos": replaced,
        "compensated": timing["compensated"],
        "layernorms_kept_float": [r.name for r, info in decomposed if info is None],
        "activations_kept_exact": [fit for fit in fits if not ugo_fits(fit)],
        "options": options.to_json(),
    }
