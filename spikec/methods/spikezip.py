"""SpikeZIP-TF (ICML 2024): an SNN equal to a quantized ANN (QANN). A model with activation quantizers
(QDQ pairs, or spikec's own) is converted as it is; a float model is quantized first by post-training
quantization (passes/quantize.py), the paper's step 1 without its training."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec.calibrate import collect_statistics
from spikec.errors import SpikecError
from spikec.methods.base import SUM, Bound, Calibration, Job, Method
from spikec.passes import options as options_lib
from spikec.passes import quantize as ptq
from spikec.passes import spikezip
from spikec.passes.builder import export_like
from spikec.passes.canonicalize import canonicalize
from spikec.passes.options import Options, option
from spikec.passes.patterns import find_regions, padding_mask_input
from spikec.refit import refit_products

# The reference code's default is 32 levels, its published runs use 16.
DEFAULT_LEVELS = 16


@dataclass(frozen=True)
class SpikeZIPOptions(Options):
    levels: int | None = option(
        None,
        f"quantization levels L of a float model (default {DEFAULT_LEVELS}); a quantized model keeps its own",
        bounds=(2, 2**16),
    )
    per_tensor: bool = option(
        False,
        "a float model: one quantizer scale per tensor (hardware without "
        "per-channel thresholds), not one per channel of the last axis",
    )
    refit: bool = option(
        True,
        "a float model: refit each weight product's W and b to the float model's output by ridge regression "
        "on the QANN's quantized operands, where that lowers the error on held-back calibration samples",
    )
    zero_points: bool = option(
        False,
        "a float model: a zero point per channel (its mid-range) at quantizers read by biased weight "
        "products, where it lowers the error (finer levels, more spikes, longer T_eq)",
    )
    integer: bool = option(
        True,
        "integer-exact: membranes and tracers in integer units of each threshold, every "
        "op between neurons on their totals, so that once quiet the SNN equals the QANN "
        "bit for bit; off, the paper's float form (compensated ops and SESA on spike increments: "
        "faster, but float32 rounding can flip a level)",
    )
    burst: int = option(
        1, "integer-exact: up to this many spikes per neuron per step (T_eq about 1/burst)", bounds=(1, 2**16)
    )
    save_qann: str | os.PathLike | None = option(
        None,
        "a float model: also write the quantized ANN it is equivalent to here",
        metavar="PATH",
        output="the quantized ANN",
    )

    def check(self) -> None:
        if self.burst != 1 and not self.integer:
            raise SpikecError(
                "argument burst: several spikes per step keep the SNN equal to its QANN in "
                "integer-exact mode only, which integer=False (--no-integer) turns off"
            )


def quantize_model(
    ann: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    levels: int,
    *,
    batch_size: int,
    progress: bool,
    per_tensor: bool = False,
    bias_correction: bool = True,
    zero_points: bool = False,
    refit: bool = True,
    source: str | None = None,
) -> tuple[onnx.ModelProto, list[dict], list[dict]]:
    """The QANN of ``ann`` by post-training quantization, the quantizers inserted and the products refit:
    per channel of the last axis where its size is static, unless ``per_tensor``; products' biases
    corrected for their quantized operands' mean shift unless not ``bias_correction``; with ``zero_points``,
    a zero point per channel where it folds into the biases of the products reading it and lowers the error
    (passes/quantize.py); then, with ``refit``, each weight product's W and b refit to the float model's
    output by ridge regression in graph order (spikec/refit.py). ``source``, the weight digest of the float
    model as given (runtime/weights.digest), is recorded with the summary: an SNN compiled from the QANN
    then knows its float model too."""
    graph = gs.import_onnx(ann)
    regions = find_regions(graph)
    quantized = [r for r in regions if r.kind == "quantizer"]
    if quantized:
        raise SpikecError(
            f"model is already quantized ({len(quantized)} quantizers, the first at node "
            f"'{quantized[0].nodes[0].name}'): quantize and finetune take a float model; "
            "compile --method spikezip converts a quantized one as it is"
        )
    sites = ptq.quantizer_sites(regions, ptq.activation_tensors(graph))
    if not sites:
        raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to quantize")
    stats = collect_statistics(
        ann,
        feeds,
        [s.tensor for s in sites],
        batch_size=batch_size,
        max_values=1_000_000,
        progress=progress,
        padding_mask=padding_mask_input(regions),
    )
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    quantizers = {}
    for site in sites:
        s = stats[site.tensor]
        per_channel = not per_tensor and ptq.channel_count(tensors[site.tensor]) == s.channels
        quantizers[site.tensor] = ptq.choose_quantizer(
            s,
            levels,
            per_channel,
            zero_point=zero_points and ptq.biased_products(site, s.channels) is not None,
            # a graph output's rows are often just the samples, and a classifier's logit channel that
            # calibration never saw positive would get no level above zero: a split by the whole tensor
            channel_splits=site.tensor not in outputs,
        )
    if bias_correction:
        ptq.correct_biases(graph, sites, quantizers, stats)
    inserted = ptq.insert_quantizers(graph, sites, quantizers)
    qann = export_like(graph, ann)
    qann.producer_name = "spikec (quantized ANN)"
    qann = canonicalize(qann)
    refitted: list[dict] = []
    if refit:
        qann, refitted = refit_products(
            qann, ann, feeds, padding_mask=padding_mask_input(regions), batch_size=batch_size, progress=progress
        )
    # added beside any metadata the QANN carries (onnx.helper.set_model_props would clear it)
    summary = {**quantization_summary(inserted, refitted), **({"source": source} if source else {})}
    qann.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(summary))
    return qann, inserted, refitted


# The QANN's metadata key of its quantization_summary (JSON); not under "spikec.", which marks spikec's SNNs
QUANTIZATION_KEY = "spikec-quantization"


def quantization_summary(inserted: list[dict], refitted: list[dict]) -> dict:
    """What quantize_model did, in numbers: quantizers per kind, and the refit's products with the median of
    their held-back errors (relative to the target's energy) before and after."""
    refit = [r for r in refitted if r["alpha"] is not None]
    return {
        "quantizers": len(inserted),
        "per_channel": sum("scale_channels" in q for q in inserted),
        "zero_points": sum(bool(q.get("zero_point")) for q in inserted),
        "products_considered": len(refitted),
        "products_refit": len(refit),
        "refit_error_before": float(np.median([r["error_before"] for r in refit])) if refit else None,
        "refit_error_after": float(np.median([r["error_after"] for r in refit])) if refit else None,
    }


def recorded_quantization(qann: onnx.ModelProto) -> dict | None:
    """The quantization_summary that quantize_model recorded in the QANN's metadata (None in a QANN spikec did
    not make, such as a QDQ model)."""
    recorded = {p.key: p.value for p in qann.metadata_props}.get(QUANTIZATION_KEY)
    return None if recorded is None else json.loads(recorded)


def describe_quantization(summary: dict) -> str:
    """quantization_summary as one line for the command line."""
    line = f"{summary['quantizers']} quantizers ({summary['per_channel']} per channel"
    line += f", {summary['zero_points']} with zero points)" if summary["zero_points"] else ")"
    if summary["products_considered"]:
        line += f"; refit {summary['products_refit']} of {summary['products_considered']} weight products"
        if summary["products_refit"]:
            line += (
                f" (held-back error, median: {summary['refit_error_before']:.3g} -> {summary['refit_error_after']:.3g}"
                " of the target's)"
            )
    return line


def integer_qann(qann: onnx.ModelProto) -> onnx.ModelProto:
    """The QANN as integer-exact mode computes it (passes/spikezip.py quantizers_as_levels): the model an
    integer-exact SNN equals bit for bit once quiet."""
    model = canonicalize(qann)
    graph = gs.import_onnx(model)
    spikezip.quantizers_as_levels(graph, find_regions(graph))
    return export_like(graph, model)


class SpikeZIP(Method):
    name = "spikezip"
    paper = "SpikeZIP-TF: equivalent conversion of a quantized ANN (ICML 2024)"
    Options = SpikeZIPOptions
    semantics = SUM
    # equal to its QANN once no neuron fires any more (T_eq), up to float rounding at level boundaries
    bound = Bound("relative_max_error", 1e-4)
    advice = "raise --timesteps to the steps until no neuron fires (spikec run --until-quiet prints T_eq)"
    reference = "QANN"
    # T_eq ranges from some 20 steps (a 16-level PTQ ViT) to hundreds (a 256-level QDQ model): measured
    default_timesteps = None

    def advise(self, verification: dict, options: options_lib.Options) -> str:
        integer = isinstance(options, SpikeZIPOptions) and options.integer
        if verification.get("quiet_samples") == verification["samples"] and not integer:
            return (
                "no neuron fired at the last step on any sample, so more steps change nothing: the "
                "differences are float32 rounding at level boundaries, which integer-exact mode (the "
                "default, which --no-integer turns off) removes: the SNN then equals the QANN bit for bit"
            )
        fewer = self.fewer_steps(options)
        return self.advice + (f" or {fewer}" if fewer else "")

    def fewer_steps(self, options: options_lib.Options) -> str:
        # bursts of up to k spikes a step divide the steps to quiet by about k (integer-exact mode only)
        integer = isinstance(options, SpikeZIPOptions) and options.integer
        return "--burst k (up to k spikes a step: about T_eq / k steps)" if integer else ""

    def verification_reference(self, ann: onnx.ModelProto, options: options_lib.Options) -> tuple[onnx.ModelProto, str]:
        # onnxruntime's session of a QDQ model fuses LayerNorm, GELU and attention its own way, which can
        # move a level; what an integer-exact SNN promises is the integer QANN, bit for bit
        if isinstance(options, SpikeZIPOptions) and options.integer:
            return integer_qann(ann), "integer QANN"
        return ann, self.reference

    def prepare(self, job: Job) -> None:
        o: SpikeZIPOptions = job.options
        if any(r.kind == "quantizer" for r in job.regions):
            if o.levels is not None:
                raise SpikecError(
                    "argument levels: the model is already quantized (it has QuantizeLinear/"
                    "DequantizeLinear pairs); leave levels out"
                )
            defaults = {f.name: f.default for f in o.declared()}
            for name in ("per_tensor", "zero_points", "refit"):
                if getattr(o, name) != defaults[name]:
                    raise SpikecError(
                        f"argument {name}: the model is already quantized; its quantizers keep their scales"
                    )
            if o.save_qann is not None:
                raise SpikecError("argument save_qann: the model is already quantized; it is its own QANN")
            for region in (r for r in job.regions if r.kind == "quantizer"):
                scale = np.asarray(region.attrs["scale"], np.float64).reshape(-1)  # spikec's may be per channel
                bad = scale[~(np.isfinite(scale) & (scale > 0))]
                if bad.size:
                    # onnxruntime's quantize_static gives an additive attention mask of -inf the scale inf
                    raise SpikecError(
                        f"quantizer '{region.name}' has the scale {bad[0]:g}: its levels are not "
                        f"numbers (its calibration saw infinite values, e.g. an attention mask of -inf), so the "
                        f"QANN computes nothing an SNN can equal; quantize the model again without that node "
                        f"(onnxruntime.quantization's nodes_to_exclude), or compile the float model with --levels L"
                    )
            return
        qann, job.report.quantization, refitted = quantize_model(
            job.ann,
            job.feeds,
            DEFAULT_LEVELS if o.levels is None else o.levels,
            batch_size=job.batch_size,
            progress=job.progress,
            per_tensor=o.per_tensor,
            zero_points=o.zero_points,
            refit=o.refit,
            source=(job.report.source or {}).get("input"),
        )
        job.report.update({"refit": refitted})
        job.extra_outputs["save_qann"] = qann
        job.recognize(qann)

    def calibration(self, job: Job) -> Calibration:
        # thresholds are the quantizers' scales: nothing to measure, but the neurons' memory to estimate
        return Calibration(taps=[], neuron_sites=[r.attrs["input"].name for r in job.regions if r.kind == "quantizer"])

    def rewrite(self, job: Job, stats: dict) -> dict:
        o: SpikeZIPOptions = job.options
        return spikezip.rewrite(job.graph, job.regions, allow_float=job.allow_float, integer=o.integer, burst=o.burst)

    def report_section(self):
        from spikec.report.spikezip import SpikeZIPSection

        return SpikeZIPSection


METHOD = SpikeZIP()
