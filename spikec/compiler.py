"""The compile pipeline: import -> canonicalize -> calibrate -> rewrite -> emit -> save."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx_graphsurgeon.logger import G_LOGGER

from spikec import graphinfo, methods, modelio
from spikec.calibrate import collect_statistics, load_inputs, naming_sources, run_batches
from spikec.equilibrium import (
    BOUND_CAP,
    CAP,
    ROUND_TO,
    Probe,
    equilibrium_line,
    fewest_steps_meeting_bound,
    steps_to_quiet,
)
from spikec.errors import SpikecError
from spikec.memory import check_budget, format_bytes, parse_budget, stateful_instead
from spikec.memory import estimate as estimate_memory
from spikec.methods.base import SUM, Job
from spikec.methods.spikezip import DEFAULT_LEVELS, SpikeZIPOptions, quantize_model, recorded_quantization
from spikec.passes import emit
from spikec.passes.canonicalize import canonicalize
from spikec.passes.loader import load_model
from spikec.passes.options import Options, option, outputs_of
from spikec.passes.patterns import describe, padding_mask_input
from spikec.runtime import weights
from spikec.runtime.metadata import MAX_TIMESTEPS, SpikecMetadata, model_label
from spikec.verify import HeldOut, verify

MODES = ("unrolled", "stateful")


@dataclass(frozen=True)
class CompileOptions(Options):
    """What every method shares; each method adds its own Options (spikec/methods/)."""

    method: str = option("ecmt", "the conversion method", flag="--method")
    # None: the method's own default_timesteps (ECMT's few steps would leave STA or SpikeZIP-TF far from
    # their ANN)
    timesteps: int | None = option(
        None,
        "T: time steps of the unrolled model, the default T of a stateful one (default: the method's, see spikec info)",
        bounds=(1, MAX_TIMESTEPS),
        flag=("--timesteps", "-T"),
    )
    mode: str = option(
        "unrolled",
        "unrolled: T steps folded into the batch, one run; stateful: one run per "
        "step, neuron states carried between runs",
        flag="--mode",
    )
    allow_float: tuple[str, ...] = option(
        (), "comma-separated op types or node names to keep in floating point", flag="--allow-float", metavar="OPS"
    )
    batch_size: int = option(
        32, "samples per calibration run (and per run of the memory estimate)", bounds=(1, 2**31), flag="--batch-size"
    )
    # None = 80 % of physical RAM; see spikec/memory.py
    memory_budget: int | str | None = option(
        None,
        "refuse an unrolled model whose estimated run memory (a batch "
        "of --batch-size) exceeds this (e.g. 8G; default 80%% of RAM)",
        flag="--memory-budget",
        metavar="BYTES",
    )
    progress: bool = option(True, "progress bars on stderr", flag="--quiet")
    calibration_checkpoint: str | os.PathLike | None = option(
        None,
        "save the calibration statistics here as they are gathered (.npz); a compile of the same model, "
        "data and settings resumes from them (with --calib-workers N, each process its own PATH.K-of-N)",
        flag="--calib-checkpoint",
        metavar="PATH",
        output="the calibration checkpoint",
    )
    calibration_workers: int = option(
        1,
        "calibrate in this many processes (each holds its own copy of the weights)",
        bounds=(1, 256),
        flag="--calib-workers",
        metavar="N",
    )
    verify: bool = option(
        True,
        "hold out some calibration samples and run the SNN on them before writing: "
        "refuse one that fails or answers inf/NaN, warn below the method's fidelity "
        "bound, record the fidelity in the model",
        flag="--no-verify",
    )

    def check(self) -> None:
        method = methods.get(self.method)
        if self.mode not in method.modes:
            detail = (
                "a ttfs model runs all layers in one pass; it has no stateful form"
                if not method.stepped
                else f"choose one of {', '.join(method.modes)}"
            )
            raise SpikecError(f"argument mode={self.mode!r}: {detail}")
        if not method.stepped and self.timesteps is not None:
            raise SpikecError(
                f"argument timesteps={self.timesteps}: a {method.name} model runs all layers in one pass "
                f"(time-to-first-spike), with no time steps; leave timesteps out"
            )
        parse_budget(self.memory_budget)


def _quiet_graphsurgeon(function):
    """graphsurgeon prints warnings to stdout (types it cannot map, subgraphs it cannot fold) and goes on:
    not the user's to act on, and the CLI's stdout carries results only. What is really wrong with a
    model is reported as one SpikecError line."""

    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):
            return function(*args, **kwargs)

    return quiet


def split_options(options: Mapping[str, Any]) -> tuple[CompileOptions, Options]:
    """The common and the method's options from keyword arguments; a keyword neither knows is an error
    naming the method's own options."""
    common_names = {f.name for f in CompileOptions.declared()}
    common = CompileOptions(**{k: v for k, v in options.items() if k in common_names})
    method = methods.get(common.method)
    own = {f.name for f in method.Options.declared()}
    unknown = sorted(set(options) - common_names - own)
    if unknown:
        others = [
            name
            for name, m in methods.METHODS.items()
            if name != method.name and set(unknown) <= {f.name for f in m.Options.declared()}
        ]
        hint = f" (an option of method {others[0]})" if others else ""
        raise SpikecError(
            f"unknown compile option(s) for method {method.name}: {', '.join(unknown)}{hint}; its "
            f"options: {', '.join(sorted(own)) or 'none'}"
        )
    try:
        return common, method.Options(**{k: v for k, v in options.items() if k in own})
    except SpikecError as exc:
        raise SpikecError(f"{exc} for method {method.name}") from None


@_quiet_graphsurgeon
@naming_sources
def compile(
    model: str | os.PathLike | onnx.ModelProto,
    calibration: str | os.PathLike | Mapping[str, np.ndarray],
    output: str | os.PathLike | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    verification: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    **options,
) -> onnx.ModelProto:
    """Convert an ANN ONNX model into a spiking model. ``options`` are the fields of CompileOptions and of
    the chosen method's Options (spikec/methods/).

    ``calibration`` is an .npz (or dict) keyed by model input name, first axis = samples: held-out
    data, never the evaluation set. The SNN is verified on one in eight of its samples, held out of
    calibration, or, given ``verification`` (the same form), on those samples with all of ``calibration``
    calibrating. If ``output`` is given the model is written there atomically."""
    common, method_options = split_options(options)
    method = methods.get(common.method)
    if verification is not None and not common.verify:
        raise SpikecError("argument verification: samples to verify on, but verify=False")
    reads = modelio.reads(
        models=[("input model", model)],
        files=[("calibration data", calibration), ("verification data", verification)],
    )
    outputs = [
        ("output", output),
        *((extra.label, extra.path) for extra in [*outputs_of(common), *outputs_of(method_options)]),
    ]
    modelio.check_outputs(outputs, reads)  # before the work, not after it

    with weights.source(_directory(model)):
        return _compile(model, calibration, verification, output, input_shapes, common, method, method_options, reads)


def _compile(
    model,
    calibration,
    verification,
    output,
    input_shapes,
    common: CompileOptions,
    method,
    method_options: Options,
    reads: list[modelio.Read],
) -> onnx.ModelProto:
    ann, source = _load(model, input_shapes, method.name)
    _check_allow_float(common.allow_float, ann)
    feeds, held_out = load_inputs(calibration, ann), None
    if verification is not None:
        held_out = (load_inputs(verification, ann, what="verification data"), True)
    elif common.verify:
        feeds, held_out = split_held_out(feeds, static_batch(ann, feeds))
    # measured once the network is rewritten (spikec/equilibrium.py)
    measured = common.timesteps is None and method.stepped and method.measures_timesteps(method_options)
    steps = common.timesteps if common.timesteps is not None or measured else method.default_timesteps
    job = Job(
        ann,
        feeds,
        steps,
        common.mode,
        common.batch_size,
        common.progress,
        frozenset(common.allow_float),
        method_options,
        held_out=held_out[0] if held_out is not None and held_out[1] else None,
    )
    job.report.source = source
    method.prepare(job)
    # a model the compile also writes (SpikeZIP-TF's QANN) may be given to eval and report as well
    job.report.source = source | {
        extra.option: weights.digest(job.extra_outputs[extra.option]) for extra in outputs_of(method_options)
    }
    plan = method.calibration(job)
    if method.stepped:
        # the unrolled form folds T into the batch; the stateful form reads the layouts only to count a sum
        # method's spikes per sample (emit.emit_stateful), and the check runs every tensor at twice the batch
        folds = common.mode == "unrolled" or method.semantics == SUM
        layouts = check_time_folding(job.ann, job.feeds, common.mode) if folds else emit.BatchLayouts()
        # Before calibration (the slow part): the unrolled form's activations are T times the ANN's. A
        # measured T is checked at the fewest steps it may take, and capped by the budget when measured.
        memory = estimate_memory(
            job.ann, job.feeds, batch=common.batch_size, neuron_sites=plan.neuron_sites, hidden=plan.hidden
        )
        fewest = steps if steps is not None else method.default_timesteps
        if fewest is not None:
            check_budget(memory, mode=common.mode, timesteps=fewest, budget=parse_budget(common.memory_budget))
    stats = (
        collect_statistics(
            plan.model or job.ann,
            job.feeds,
            plan.taps,
            batch_size=common.batch_size,
            max_values=plan.max_values,
            progress=common.progress,
            checkpoint=common.calibration_checkpoint,
            workers=common.calibration_workers,
            padding_mask=padding_mask_input(job.regions),
        )
        if plan.taps
        else {}
    )
    job.report.update(method.rewrite(job, stats))
    del stats, plan
    job.report.regions = describe(job.regions)
    job.report.semantics = method.semantics
    if measured:
        # the samples verified on; without verification, those it would hold out
        samples = held_out or split_held_out(job.feeds, static_batch(job.ann, job.feeds))[1]
        budget = parse_budget(common.memory_budget) if common.mode == "unrolled" else None
        fits = CAP if budget is None else min(CAP, memory.most_timesteps(budget))
        if fits < 1:  # not one step: refused as a T of 1 would be
            check_budget(memory, mode=common.mode, timesteps=1, budget=budget)
        # a search for a bound runs whole rounds of ROUND_TO steps; the budget allowed the fewest (checked above)
        cap = fits if method.semantics == SUM else min(BOUND_CAP, fits) // ROUND_TO * ROUND_TO
        probe = Probe(
            job.graph,
            job.ann,
            method,
            method_options,
            layouts,
            samples[0],
            cap=cap,
            held_out=held_out is not None and held_out[1],
            batch_size=common.batch_size,
            progress=common.progress,
            external=modelio.external_data(ann),
        )
        if method.semantics == SUM:
            job.report.equilibrium = steps_to_quiet(probe)
            steps = job.report.equilibrium["timesteps"]
            if None in job.report.equilibrium["steps_to_quiet"] and budget is not None and fits < CAP:
                fewer = method.fewer_steps(method_options)
                raise SpikecError(
                    f"argument timesteps: {equilibrium_line(job.report.equilibrium)}, the most an unrolled "
                    f"model fits in the memory budget of {format_bytes(budget)} (argument memory_budget): "
                    f"compile with {stateful_instead(memory)}, "
                    + (f"{fewer}, " if fewer else "")
                    + "or use a smaller --batch-size"
                )
        else:
            job.report.timesteps_search = fewest_steps_meeting_bound(
                probe, *method.verification_reference(job.ann, method_options)
            )
            steps = job.report.timesteps_search["timesteps"]
    if not method.stepped:
        mode, timesteps = "ttfs", 1
    else:
        assert steps is not None, "given, the method's default or measured above"
        mode, timesteps = common.mode, steps
        if mode == "unrolled":
            emit.emit_unrolled(job.graph, timesteps, method.semantics, layouts)
        else:
            emit.emit_stateful(job.graph, method.semantics, layouts)
    record = SpikecMetadata(
        method.name,
        mode,
        method.semantics,
        timesteps,
        method_options.to_json(),
        tuple(sorted(common.allow_float)),
        job.report,
    )
    graph, reference, report = job.graph, job.ann, job.report
    checks = None  # made only where verified (compare and tune compile without): it may copy the model
    if held_out is not None:
        held_to, held_to_name = method.verification_reference(job.ann, method_options)
        given = ann if job.ann is not ann else None  # the method converts a model made from the input
        checks = HeldOut(held_out[0], held_to, held_to_name, common.batch_size, held_out=held_out[1], given=given)
    extras = [(extra.label, extra.path, job.extra_outputs[extra.option]) for extra in outputs_of(method_options)]
    del job  # its regions hold the ANN's replaced weights, mapped: released before the SNN is verified
    label = _label(model, method.name)
    # A model with external data (or past protobuf's limit) gets its weights beside it: emitted into the
    # output's data file as the graph is exported (the graph's new weights released on the way), and the
    # SNN verified from there.
    with modelio.staging(output, reads) if modelio.external_data(ann) else contextlib.nullcontext() as staged:
        with weights.DataFile(staged.data) if staged else contextlib.nullcontext() as data:
            snn = emit.to_model(graph, reference, record.to_props(), data)
        del graph
        gc.collect()  # graphsurgeon's graphs are reference cycles: their arrays and maps go now, not later
        made = snn if staged is None else staged
        if staged is not None:
            staged.save_references(snn)
        if checks is not None:
            report.verification = verify(snn if staged is None else staged.path, label, ann, checks)
            _warn_below_bound(method, method_options, report.verification)
            record.write(snn)
            if staged is not None:
                staged.save_references(snn)
        else:
            verify(snn if staged is None else staged.path, label, ann)
        return _write(model, method.name, ann, reads, [("output", output, made), *extras], verified=1)


def _load(model, input_shapes, method: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model to convert, canonical, and the weight digests an SNN of it records as its sources: the
    model's own as given ("input") and, for a QANN spikec made, the float model's it was quantized from
    ("quantized_from"), which eval and report check the models they are given against."""
    loaded = load_model(model, input_shapes=input_shapes, convert_with=method, map_weights=True)
    digests = {"input": weights.digest(loaded)}
    quantized_from = (recorded_quantization(loaded) or {}).get("source")
    if quantized_from:
        digests["quantized_from"] = quantized_from
    return canonicalize(loaded), digests


def _directory(model: str | os.PathLike | onnx.ModelProto) -> Path | None:
    """The directory a model file's external data resolves against (None for a model in memory)."""
    return Path(model).parent if isinstance(model, (str, os.PathLike)) else None


def split_held_out(
    feeds: Mapping[str, np.ndarray], batch: int | None = None
) -> tuple[dict[str, np.ndarray], tuple[dict, bool]]:
    """(calibration samples, (held-out samples, whether they are held out)): one in eight samples, at most
    32 and spread over the data, is kept from calibration to verify the SNN on; for a model with a static
    ``batch``, as many more as keep the calibration samples a multiple of it. Where none can be spared
    (a single sample), the calibration samples are verified on."""
    count = len(next(iter(feeds.values())))
    held = min(count // 8, 32)
    while held and batch and (count - held) % batch:
        held += 1
    if held == 0 or held > count // 2:
        return dict(feeds), (dict(feeds), False)
    chosen = np.unique(np.linspace(0, count - 1, held).round().astype(np.int64))
    kept = np.setdiff1d(np.arange(count), chosen)
    return (
        {name: value[kept] for name, value in feeds.items()},
        ({name: value[chosen] for name, value in feeds.items()}, True),
    )


def _warn_below_bound(method, options: Options, verification: dict) -> None:
    if method.bound is None:
        return
    for name, measured in verification["outputs"].items():
        value = measured[method.bound.measure]
        if not method.bound.met(value):
            warnings.warn(
                f"output '{name}' on {verification['samples']} held-out calibration samples: "
                f"{method.bound.measure.replace('_', ' ')} {value:.4g} against the {verification['reference']}"
                + (f" at T={verification['timesteps']}" if verification["timesteps"] else "")
                + f", short of {method.name}'s bound ({method.bound}): "
                f"{method.advise(verification, options)}",
                FidelityWarning,
                stacklevel=5,
            )  # the caller of compile


class FidelityWarning(UserWarning):
    """A compiled SNN below its method's fidelity bound on held-out data (it is still written)."""


def _label(source, method: str) -> str:
    return f"{model_label(source)} ({method})"


def _write(
    source,
    method: str,
    ann: onnx.ModelProto,
    reads: list[modelio.Read],
    models: list[tuple[str, str | os.PathLike | None, onnx.ModelProto | modelio.Staged | None]],
    verified: int = 0,
) -> onnx.ModelProto:
    """Verify every model made (spikec.verify) but the first ``verified``, then write those given a path,
    all or none; returns the first (the SNN) as `_returned` says."""
    for _, _, made in models[verified:]:
        if made is not None:
            verify(made.path if isinstance(made, modelio.Staged) else made, _label(source, method), ann)
    modelio.write([(what, path, made) for what, path, made in models if path is not None and made is not None], reads)
    path, snn = models[0][1:]
    assert snn is not None, "the first model is the one the command makes"
    return _returned(path, snn)


def _returned(path: str | os.PathLike | None, made: onnx.ModelProto | modelio.Staged) -> onnx.ModelProto:
    """The model as compile/quantize return it: one written with external data as its graph, referencing
    its data file (as onnx.load(path, load_external_data=False) reads it); any other whole, in memory."""
    if isinstance(made, modelio.Staged):
        if path is None:
            return weights.load_all(onnx.load(made.path, load_external_data=False), made.directory)
        return onnx.load(path, load_external_data=False)
    if not modelio.external_data(made):
        return made
    return weights.load_all(made) if path is None else onnx.load(path, load_external_data=False)


def _check_allow_float(names: Sequence[str], ann: onnx.ModelProto) -> None:
    """Every --allow-float entry must name an op type or a node of the model: a misspelt one would
    silently keep nothing in float."""
    known = {n.op_type for n in ann.graph.node} | {n.name for n in ann.graph.node}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SpikecError(
            f"argument allow_float: {', '.join(map(repr, unknown))} is neither an op type nor a "
            f"node name of the model (see `spikec inspect`)"
        )


@naming_sources
def quantize(
    model: str | os.PathLike | onnx.ModelProto,
    calibration: str | os.PathLike | Mapping[str, np.ndarray],
    output: str | os.PathLike | None = None,
    *,
    levels: int = DEFAULT_LEVELS,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    per_tensor: bool = False,
    zero_points: bool = False,
    refit: bool = True,
) -> onnx.ModelProto:
    """The quantized ANN (QANN) that ``compile(method="spikezip", levels=levels)`` converts: an ONNX model
    with a quantizer before every product operand and after every product, for stock onnxruntime."""
    common = CompileOptions(method="spikezip", batch_size=batch_size, progress=progress)
    options = SpikeZIPOptions(levels=levels, per_tensor=per_tensor, zero_points=zero_points, refit=refit)
    reads = modelio.reads(models=[("input model", model)], files=[("calibration data", calibration)])
    modelio.check_outputs([("output", output)], reads)
    with weights.source(_directory(model)):
        ann, source = _load(model, input_shapes, "spikezip")
        qann, _, _ = quantize_model(
            ann,
            load_inputs(calibration, ann),
            levels,
            batch_size=common.batch_size,
            progress=common.progress,
            per_tensor=options.per_tensor,
            zero_points=options.zero_points,
            refit=options.refit,
            source=source["input"],
        )
        return _write(model, "quantize", ann, reads, [("output", output, qann)])


def finetune(
    model: str | os.PathLike | onnx.ModelProto,
    calibration: str | os.PathLike | Mapping[str, np.ndarray],
    output: str | os.PathLike | None = None,
    *,
    levels: int = DEFAULT_LEVELS,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    per_tensor: bool = False,
    zero_points: bool = False,
    refit: bool = True,
    steps: int = 1000,
    time_budget: float | None = None,
    lr: float = 2e-5,
    scale_lr: float = 1e-3,
    checkpoint: str | os.PathLike | None = None,
    hidden_weight: float = 4.0,
    qdrop: float = 0.0,
) -> tuple[onnx.ModelProto, dict]:
    """The QANN of ``quantize``, then fine-tuned (spikec.finetune: LSQ steps distilling the float model's outputs
    on the calibration data) for ``steps`` steps or ``time_budget`` seconds; returns it and the losses.
    ``hidden_weight`` > 0 (the default) also distills the hidden states (every normalization's output, spikec.lsq.hidden_states)
    with that weight on their mean error; ``qdrop`` is QDrop's probability (spikec.lsq.finetune)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SpikecError("spikec finetune needs PyTorch (pip install torch); quantize works without it")
    from spikec import lsq as ft

    ft.check_training_arguments(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        scale_lr=scale_lr,
        time_budget=time_budget,
        hidden_weight=hidden_weight,
        qdrop=qdrop,
    )
    reads = modelio.reads(models=[("input model", model)], files=[("calibration data", calibration)])
    # the checkpoint is read and written: an output that may not alias the others
    modelio.check_outputs([("output", output), ("checkpoint", checkpoint)], reads)
    if checkpoint is not None and Path(checkpoint).exists():
        ft.read_checkpoint(checkpoint)
    with weights.source(_directory(model)):
        ann, source = _load(model, input_shapes, "spikezip")
        ft.check_torch_forms(ann)
        feeds = load_inputs(calibration, ann)
        qann, _, _ = quantize_model(
            ann,
            feeds,
            levels,
            batch_size=batch_size,
            progress=progress,
            per_tensor=per_tensor,
            zero_points=zero_points,
            refit=refit,
            source=source["input"],
        )
        names = [o.name for o in ann.graph.output]
        hidden = ft.hidden_states(ann) if hidden_weight > 0 else []
        batches = list(run_batches(ann, feeds, names + hidden, batch_size=batch_size, progress=False))
        targets = [np.concatenate([b[name] for b in batches]) for name in names]
        tuned, summary = ft.finetune(
            qann,
            feeds,
            targets,
            hidden={name: np.concatenate([b[name] for b in batches]) for name in hidden},
            hidden_weight=hidden_weight,
            qdrop=qdrop,
            steps=steps,
            time_budget=time_budget,
            batch_size=batch_size,
            lr=lr,
            scale_lr=scale_lr,
            checkpoint=checkpoint,
            progress=progress,
        )
        summary["quantization"] = recorded_quantization(qann)
        return _write(model, "finetune", ann, reads, [("output", output, tuned)]), summary


def static_batch(ann: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int | None:
    """The batch size the model's inputs fix at axis 0, where they agree on one."""
    static = {
        d[0].dim_value
        for vi in ann.graph.input
        if vi.name in feeds
        for d in [vi.type.tensor_type.shape.dim]
        if len(d) and d[0].WhichOneof("value") == "dim_value"
    }
    return static.pop() if len(static) == 1 else None


def check_time_folding(ann: onnx.ModelProto, feeds: Mapping[str, np.ndarray], mode: str) -> emit.BatchLayouts:
    """Where every tensor of the ANN carries the batch, which is where a model folds time (passes/emit.py): the
    unrolled form runs the graph on T*B rows, and every spikec op needs each element's steps. Runs the ANN on a
    group of samples A, on a group B and on both together (A then B) and compares, tensor by tensor: the axis
    that doubles holds the batch, and the rows of A, of B, or blocks of them (the batch merged behind other
    axes, as torch.nn.MultiheadAttention's [seq * batch, dim]), tell where in it.

    Refused for the unrolled form: a model exported with a static batch B that uses B beyond the batch axis
    (e.g. flat indices b*seq + s baked into a Gather for the attention mask; canonicalize relaxes the common
    places), or any model whose outputs do not keep each sample's rows on axis 0. The stateful form runs at B
    and needs the layouts only to count each sample's spikes: where the model cannot run at 2B, it assumes
    axis 0."""
    static = static_batch(ann, feeds)
    # Groups of two where the batch is dynamic: some exports fail at a batch of one (the dynamo exporter's
    # Squeeze without axes drops a batch axis of size 1) and run at any other.
    samples = min(len(v) for v in feeds.values())
    batch = static or min(2, samples)
    group_a = {name: array[:batch] for name, array in feeds.items()}
    group_b = {name: array[batch : 2 * batch] for name, array in feeds.items()} if samples >= 2 * batch else group_a
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in [*ann.graph.value_info, *ann.graph.output]}
    outputs = [o.name for o in ann.graph.output]
    names = list(
        dict.fromkeys(
            [
                *outputs,
                *(
                    t
                    for node in ann.graph.node
                    for t in node.output
                    if t and typed.get(t, onnx.TensorProto.FLOAT) in float_types
                ),
            ]
        )
    )
    both = {k: np.concatenate([group_a[k], group_b[k]]) for k in feeds}
    grown = ann
    if static:
        grown = onnx.ModelProto()
        grown.CopyFrom(ann)
        grown.graph.ClearField("value_info")
        for vi in grown.graph.input:
            if vi.name in feeds:
                vi.type.tensor_type.shape.dim[0].dim_value = 2 * batch
        for vi in grown.graph.output:
            vi.type.tensor_type.ClearField("shape")
    advice = (
        (
            f"the model was exported with a static batch of {batch} and uses it beyond the batch axis, so "
            f"the time-unrolled form cannot fold T into the batch; re-export with a dynamic batch axis, "
            f"or compile with --mode stateful"
        )
        if static
        else "the time-unrolled form cannot fold T into the batch; compile with --mode stateful"
    )
    layouts: dict[str, emit.Layout | None] = {}
    output_shapes: dict[str, tuple[int, ...]] = {}  # for group A
    for part in _check_parts(ann, names, {k: v.shape for k, v in group_a.items()}, batch):
        alone = list(run_batches(ann, both, part, batch_size=batch, progress=False))  # A, then B
        try:
            together = next(run_batches(grown, both, part, batch_size=2 * batch, progress=False))
        except SpikecError as exc:
            if mode == "unrolled":
                raise SpikecError(f"{advice} (at batch {2 * batch}: {exc})") from None
            return emit.BatchLayouts()
        for name in part:
            layouts[name] = _batch_layout(alone[0][name], alone[1][name], together[name])
            if name in outputs:
                output_shapes[name] = alone[0][name].shape
        del alone, together
    for name in outputs if mode == "unrolled" else ():
        layout = layouts[name]
        if layout is not None and layout.leading:
            continue
        if layout is None and not (output_shapes[name] and output_shapes[name][0] == batch):
            continue  # not a per-sample output (one that should grow with the batch but does not is refused)
        where = (
            f"keeps the samples' rows on axis {layout.axis}, not on axis 0"
            if layout not in (None, emit.UNKNOWN_LAYOUT) and layout.outer == 1
            else "changes when the batch grows"
        )
        raise SpikecError(f"{advice} (output '{name}' {where})")
    return emit.BatchLayouts(
        {name: emit.Layout(0, 1, array.ndim) for name, array in group_a.items()},
        {node.name: tuple(layouts.get(t) for t in node.output) for node in ann.graph.node},
    )


# onnxruntime holds every output a model declares while a run lasts: the time-folding check fetches a large
# graph's tensors in parts, each its own session, holding at most about this much at once (docs/scale.md)
_CHECK_PART_BYTES = 128 * 2**20


def _check_parts(
    ann: onnx.ModelProto, names: list[str], sample: Mapping[str, tuple[int, ...]], batch: int
) -> list[list[str]]:
    """``names`` in order, in parts whose tensors for groups A, B and both together (4 x batch samples of
    float32) stay within _CHECK_PART_BYTES; a tensor of unknown size counts as the largest known one."""
    shapes = graphinfo.sample_shapes(ann, sample)
    elements = [shapes.elements(name) for name in names]
    largest = max((e for e in elements if e is not None), default=0)
    parts: list[list[str]] = [[]]
    held = 0
    for name, count in zip(names, elements):
        size = 4 * batch * 4 * (largest if count is None else count)
        if parts[-1] and held + size > _CHECK_PART_BYTES:
            parts.append([])
            held = 0
        parts[-1].append(name)
        held += size
    return parts


def _batch_layout(a: np.ndarray, b: np.ndarray, both: np.ndarray) -> emit.Layout | None:
    """Where ``both`` (the tensor for samples A then B) holds the batch, given ``a`` and ``b`` (for A and B
    alone): (axis, outer) with the axis read as [outer, batch, rest]; None where the tensor has no batch axis,
    emit.UNKNOWN_LAYOUT where it is not one of these."""
    if a.shape == both.shape:
        return None
    grown = [axis for axis, (x, y) in enumerate(zip(a.shape, both.shape)) if x != y]
    if a.ndim != both.ndim or len(grown) != 1 or both.shape[grown[0]] != 2 * a.shape[grown[0]]:
        return emit.UNKNOWN_LAYOUT
    axis, size = grown[0], a.shape[grown[0]]
    if not np.issubdtype(a.dtype, np.floating):
        return emit.Layout(axis, 1, a.ndim)
    scale = float(np.nanmax(np.abs(np.where(np.isfinite(both), both, 0)))) if both.size else 0.0
    for outer in (o for o in range(1, size + 1) if size % o == 0):
        split = both.reshape(*both.shape[:axis], outer, 2, size // outer, *both.shape[axis + 1 :])
        if all(
            np.allclose(
                np.take(split, half, axis=axis + 1),
                part.reshape(*part.shape[:axis], outer, size // outer, *part.shape[axis + 1 :]),
                rtol=1e-3,
                atol=1e-4 * scale,
                equal_nan=True,
            )
            for half, part in enumerate((a, b))
        ):
            return emit.Layout(axis, outer, a.ndim)
    return emit.UNKNOWN_LAYOUT
