"""The compile pipeline: import -> canonicalize -> calibrate -> rewrite -> emit -> save."""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from spikec import modelio
from spikec.calibrate import collect_statistics, load_inputs, naming_sources, run_batches
from spikec.errors import SpikecError
from spikec.memory import check_budget, parse_budget
from spikec.memory import estimate as estimate_memory
from spikec.passes import ecmt, emit, quantize as ptq, spikezip, sta, ttfs
from spikec.passes.canonicalize import canonicalize
from spikec.passes.loader import load_model
from spikec.passes.patterns import describe, find_regions
from spikec.passes.timing import MEAN, SUM
from spikec.runtime.ops import default_opset
from spikec.runtime.session import METHODS, check_timesteps
from spikec.verify import verify

# TTFS has no time steps to average or sum over: one pass, spike times passed between layers.
SEMANTICS = {"ecmt": MEAN, "spikezip": SUM, "sta": MEAN, "ttfs": "time-to-first-spike"}
# levels: ECMT's n (2n thresholds, paper default 8); SpikeZIP-TF's quantization levels L (the reference
# code's default is 32, its published runs use 16).
DEFAULT_LEVELS = {"ecmt": 8, "spikezip": 16, "sta": 0, "ttfs": 0}
LEVEL_RANGES = {"ecmt": (1, 24), "spikezip": (2, 2**16), "sta": (0, 0), "ttfs": (0, 0)}
MODES = ("unrolled", "stateful")
# T is at most runtime.session.MAX_TIMESTEPS (the float32 step counter t is exact up to 2^24). Below that,
# the unrolled form is bounded by the memory guard (spikec/memory.py): its activations grow with T.


@dataclass
class CompileOptions:
    method: str = "ecmt"
    timesteps: int = 8
    mode: str = "unrolled"
    levels: int | None = None  # per method, see DEFAULT_LEVELS; None = that default
    percentile: float = 99.0  # p: theta_1 = p-th, theta_2 = -(100-p)-th percentile
    per_channel: bool = False
    # ECMT: theta_1 is raised until the top level theta_1*2^(n-1) reaches coverage x the calibration
    # maximum (likewise theta_2 and the minimum); see ecmt.Thresholds.covering. 0 = percentiles only.
    coverage: float = 1.0
    allow_float: Sequence[str] = field(default_factory=tuple)
    batch_size: int = 32
    progress: bool = True
    # Refuse an unrolled model whose estimated run memory (batch_size samples) exceeds this many bytes
    # (an int, or a string such as "8G"); None = 80 % of physical RAM. See spikec/memory.py.
    memory_budget: int | str | None = None
    # SpikeZIP-TF on a float model: also write the quantized ANN it is equivalent to here.
    qann_output: str | os.PathLike | None = None
    # STA's techniques, each switchable off for its ablation (passes/sta.py)
    ugo: bool = True         # GELU by its universal group operator
    tcsa: bool = True        # temporal-corrective products (False: the naive split)
    signed: bool = True      # signed neurons with memory
    burst: int = 2           # burst spikes per step (1: off)
    softmax_ugo: bool = False  # Softmax by exp/inverse UGOs (appendix D.2); off: float, as the reference code
    gelu_hidden: int | None = None  # GELU UGO size (spikec ships 32, the paper's, and 64, the reference code's)
    # TTFSFormer (passes/ttfs.py)
    # calibrated ranges [a, b] widen by this fraction of their span per side; None = ttfs.default_margin
    margin: float | None = None
    precision: int = 0      # time precision p (spike times on a grid of delta/p); 0 = float spike times
    max_layer: bool = True  # softmax subtracts the row maximum first (appendix C.2, layer 0)

    @property
    def level_count(self) -> int:
        return DEFAULT_LEVELS[self.method] if self.levels is None else int(self.levels)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SpikecError(f"argument method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise SpikecError(f"argument mode={self.mode!r}: choose one of {', '.join(MODES)}")
        check_timesteps(self.timesteps)
        low, high = LEVEL_RANGES[self.method]
        if self.levels is not None and (isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer))
                                        or not low <= self.levels <= high):
            raise SpikecError(f"argument levels={self.levels!r}: expected an integer in {low}..{high} for {self.method}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, (int, np.integer)) or not 1 <= self.burst <= 64:
            raise SpikecError(f"argument burst={self.burst!r}: expected an integer in 1..64")
        if self.qann_output is not None and self.method != "spikezip":
            raise SpikecError("argument qann_output: only method spikezip quantizes the model")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) \
                or self.batch_size < 1:
            raise SpikecError(f"argument batch_size={self.batch_size!r}: expected a positive integer")
        parse_budget(self.memory_budget)
        if isinstance(self.coverage, bool) or not isinstance(self.coverage, (int, float)) \
                or not 0.0 <= float(self.coverage) <= 1e6:
            raise SpikecError(f"argument coverage={self.coverage!r}: expected a number >= 0")
        if self.method == "ttfs" and self.mode != "unrolled":
            raise SpikecError("argument mode: a ttfs model runs all layers in one pass; it has no stateful form")
        if self.margin is not None and (isinstance(self.margin, bool) or not isinstance(self.margin, (int, float))
                                        or not 0 <= self.margin <= 10):
            raise SpikecError(f"argument margin={self.margin!r}: expected a number in [0, 10]")
        if isinstance(self.precision, bool) or not isinstance(self.precision, (int, np.integer)) \
                or not 0 <= self.precision <= 2**24:
            raise SpikecError(f"argument precision={self.precision!r}: expected an integer in 0..{2**24} (0 = float times)")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise SpikecError(f"argument percentile={self.percentile!r}: expected a value in (50, 100]")


def _quiet_graphsurgeon(function):
    """graphsurgeon prints warnings to stdout (types it cannot map, subgraphs it cannot fold) and goes on:
    not the user's to act on, and the CLI's stdout carries results only. What is really wrong with a
    model is reported as one SpikecError line."""
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):
            return function(*args, **kwargs)
    return quiet


@_quiet_graphsurgeon
@naming_sources
def compile(model: str | os.PathLike | onnx.ModelProto,
            calibration: str | os.PathLike | Mapping[str, np.ndarray],
            output: str | os.PathLike | None = None,
            *, input_shapes: Mapping[str, Sequence[int | str]] | None = None,
            **options) -> onnx.ModelProto:
    """Convert an ANN ONNX model into a spiking model. ``options`` are the fields of CompileOptions.

    ``calibration`` is an .npz (or dict) keyed by model input name, first axis = samples: held-out
    data, never the evaluation set. If ``output`` is given the model is written there atomically."""
    unknown = set(options) - set(CompileOptions.__dataclass_fields__)
    if unknown:
        raise SpikecError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
    opts = CompileOptions(**options)
    opts.validate()
    reads = modelio.reads(models=[("input model", model)], files=[("calibration data", calibration)])
    outputs = [("output", output), ("quantized ANN output (--save-qann)", opts.qann_output)]
    modelio.check_outputs(outputs, reads)  # before the work, not after it

    ann = canonicalize(load_model(model, input_shapes=input_shapes, convert_with=opts.method))
    _check_allow_float(opts.allow_float, ann)
    feeds = load_inputs(calibration, ann)
    if opts.method == "ttfs":
        return _write(model, opts.method, ann, reads, [(*outputs[0], _compile_ttfs(ann, feeds, opts))])
    qann = None
    graph = gs.import_onnx(ann)
    regions = find_regions(graph)
    report: dict = {}
    hidden: dict[str, int] = {}  # neurons per element where it is not one (STA's UGOs)
    if opts.method == "spikezip":
        if not any(r.kind == "quantizer" for r in regions):
            ann, report["quantization"] = _quantize(ann, graph, regions, feeds, opts)
            qann = ann
            graph = gs.import_onnx(ann)
            regions = find_regions(graph)
        elif opts.levels is not None:
            raise SpikecError("argument levels: the model is already quantized (it has QuantizeLinear/DequantizeLinear "
                              "pairs); leave levels out")
        if qann is None and opts.qann_output is not None:
            raise SpikecError("argument qann_output: the model is already quantized, it is the quantized ANN; "
                              "leave qann_output out")
        sites = [r.attrs["input"].name for r in regions if r.kind == "quantizer"]
    elif opts.method == "sta":
        sta_options = sta.STAOptions(ugo=opts.ugo, corrected=opts.tcsa, signed=opts.signed, burst=opts.burst,
                                     softmax_ugo=opts.softmax_ugo, gelu_hidden=opts.gelu_hidden)
        sites = sta.calibration_taps(regions, sta_options)
        hidden = sta.hidden_sizes(regions, sta_options)
        if not sites:
            raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to convert")
    else:
        sites = ecmt.neuron_sites(regions)
        if not sites:
            raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to convert")
    if opts.mode == "unrolled":
        check_time_folding(ann, feeds)
    # Before calibration (the slow part): the unrolled form's activations are T times the ANN's.
    check_budget(estimate_memory(ann, feeds, batch=opts.batch_size, neuron_sites=sites, hidden=hidden),
                 mode=opts.mode, timesteps=opts.timesteps, budget=parse_budget(opts.memory_budget))
    allow_float = frozenset(opts.allow_float)
    if opts.method == "spikezip":
        report.update(spikezip.rewrite(graph, regions, allow_float=allow_float))
    elif opts.method == "sta":
        stats = collect_statistics(ann, feeds, list(sites), batch_size=opts.batch_size, max_values=100_000,
                                   progress=opts.progress)
        report.update(sta.rewrite(graph, regions, stats, opts.timesteps, sta_options, allow_float=allow_float))
    else:
        stats = collect_statistics(ann, feeds, list(sites), batch_size=opts.batch_size, progress=opts.progress)
        # Algorithm 1, line 4: theta_1 = p-th percentile, theta_2 = -(100-p)-th percentile.
        thresholds = {name: ecmt.Thresholds.from_percentiles(s.percentile(opts.percentile, opts.per_channel),
                                                             s.percentile(100.0 - opts.percentile, opts.per_channel))
                      .covering(s.max(opts.per_channel), s.min(opts.per_channel), opts.level_count, opts.coverage)
                      for name, s in stats.items()}
        report.update(ecmt.rewrite(graph, regions, thresholds, levels=opts.level_count, allow_float=allow_float))
        report["calibration"] = {name: s.to_json() for name, s in stats.items()}
    report["regions"] = describe(regions)
    semantics = report["semantics"] = SEMANTICS[opts.method]
    if opts.mode == "unrolled":
        emit.emit_unrolled(graph, opts.timesteps, semantics)
    else:
        emit.emit_stateful(graph, semantics)
    options = {"levels": opts.level_count, "percentile": opts.percentile, "per_channel": opts.per_channel,
               "coverage": opts.coverage, "allow_float": sorted(opts.allow_float)}
    snn = _finish(graph, ann, opts.method, opts.mode, opts.timesteps, options, report)
    return _write(model, opts.method, ann, reads, [(*outputs[0], snn), (*outputs[1], qann)])


def _write(source, method: str, ann: onnx.ModelProto, reads: list[modelio.Read],
           models: list[tuple[str, str | os.PathLike | None, onnx.ModelProto | None]]) -> onnx.ModelProto:
    """Verify every model made (spikec.verify), then write those given a path, all or none; returns the
    first (the SNN)."""
    label = f"{os.fspath(source) if isinstance(source, (str, os.PathLike)) else '<in-memory model>'} ({method})"
    for _, _, made in models:
        if made is not None:
            verify(made, label, ann)
    modelio.write([model for model in models if model[1] is not None], reads)
    return models[0][2]


def _check_allow_float(names: Sequence[str], ann: onnx.ModelProto) -> None:
    """Every --allow-float entry must name an op type or a node of the model: a misspelt one would
    silently keep nothing in float."""
    known = {n.op_type for n in ann.graph.node} | {n.name for n in ann.graph.node}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SpikecError(f"argument allow_float: {', '.join(map(repr, unknown))} is neither an op type nor a "
                          f"node name of the model (see `spikec inspect`)")


def _finish(graph: gs.Graph, ann: onnx.ModelProto, method: str, mode: str, timesteps: int,
            options: dict, report: dict) -> onnx.ModelProto:
    """The spiking model with its metadata (what InferenceSession and the reports read)."""
    metadata = {
        "spikec.method": method,
        "spikec.mode": mode,
        "spikec.semantics": report["semantics"],
        "spikec.timesteps": str(timesteps),
        "spikec.options": json.dumps(options, sort_keys=True),
        "spikec.report": json.dumps(report, sort_keys=True, default=_json_default),
    }
    return emit.to_model(graph, ann, metadata)


def _compile_ttfs(ann: onnx.ModelProto, feeds: Mapping[str, np.ndarray], opts: CompileOptions) -> onnx.ModelProto:
    """Algorithm 1: the ANN decomposed into the constructions' stages is calibrated for every site's
    range, then the same walk builds the spiking graph with those ranges."""
    margin = ttfs.default_margin(int(opts.precision)) if opts.margin is None else float(opts.margin)
    options = ttfs.TTFSOptions(margin=margin, precision=int(opts.precision), max_layer=opts.max_layer)
    opset = default_opset(ann)
    exact_graph = gs.import_onnx(ann)
    exact = ttfs.lower(exact_graph, find_regions(exact_graph), options, opset)
    if not exact.sites:
        raise SpikecError("model has no float input or nonlinear layer: nothing to convert")
    network = emit.to_model(exact_graph, ann, {})
    stats = collect_statistics(network, feeds, ttfs.calibration_taps(exact), batch_size=opts.batch_size,
                               max_values=10_000, progress=opts.progress)
    ranges = ttfs.calibration_ranges(stats, exact, options.margin)
    graph = gs.import_onnx(ann)
    regions = find_regions(graph)
    spiking = ttfs.lower(graph, regions, options, opset, ranges)
    report = {"regions": describe(regions), "semantics": SEMANTICS["ttfs"], "ttfs": {
        "sites": ttfs.describe(spiking), "constructions": spiking.constructions,
        "float_nodes": spiking.float_nodes, "delta": options.delta,
        "precision": options.precision, "margin": options.margin, "max_layer": options.max_layer}}
    return _finish(graph, ann, "ttfs", "ttfs", 1, {"margin": options.margin, "precision": options.precision,
                                                   "max_layer": options.max_layer, "delta": options.delta},
                   report)


def _quantize(ann: onnx.ModelProto, graph: gs.Graph, regions: list, feeds: Mapping[str, np.ndarray],
              opts: CompileOptions) -> tuple[onnx.ModelProto, list[dict]]:
    """SpikeZIP-TF step 1 by post-training quantization (passes/quantize.py): the QANN and what was inserted."""
    sites = ptq.quantizer_sites(regions)
    if not sites:
        raise SpikecError("model has no MatMul/Gemm with an activation operand: nothing to quantize")
    stats = collect_statistics(ann, feeds, [s.tensor for s in sites], batch_size=opts.batch_size,
                               max_values=200_000, progress=opts.progress)
    quantizers = {name: ptq.choose_quantizer(s, opts.level_count) for name, s in stats.items()}
    inserted = ptq.insert_quantizers(graph, sites, quantizers)
    qann = gs.export_onnx(graph, do_type_check=False)
    del qann.opset_import[:]
    qann.opset_import.extend(ann.opset_import)
    qann.ir_version = ann.ir_version
    qann.producer_name = "spikec (quantized ANN)"
    return canonicalize(qann), inserted


@naming_sources
def quantize(model: str | os.PathLike | onnx.ModelProto,
             calibration: str | os.PathLike | Mapping[str, np.ndarray],
             output: str | os.PathLike | None = None, *, levels: int = DEFAULT_LEVELS["spikezip"],
             input_shapes: Mapping[str, Sequence[int | str]] | None = None, batch_size: int = 32,
             progress: bool = True) -> onnx.ModelProto:
    """The quantized ANN (QANN) that ``compile(method="spikezip", levels=levels)`` converts: an ONNX model
    with a quantizer before every product operand and after every product, for stock onnxruntime."""
    opts = CompileOptions(method="spikezip", levels=levels, batch_size=batch_size, progress=progress)
    opts.validate()
    reads = modelio.reads(models=[("input model", model)], files=[("calibration data", calibration)])
    modelio.check_outputs([("output", output)], reads)
    ann = canonicalize(load_model(model, input_shapes=input_shapes, convert_with="spikezip"))
    graph = gs.import_onnx(ann)
    qann, _ = _quantize(ann, graph, find_regions(graph), load_inputs(calibration, ann), opts)
    return _write(model, "quantize", ann, reads, [("output", output, qann)])


def check_time_folding(ann: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> None:
    """The unrolled form runs the graph on T*B rows. A model exported with a static batch B can use B
    beyond the batch axis (e.g. flat indices b*seq + s baked into a Gather for the attention mask);
    canonicalize relaxes the common places, and this check runs the ANN on the first B samples twice
    over: every output must be the batch-B output twice, or the model cannot be unrolled."""
    static = {d[0].dim_value for vi in ann.graph.input if vi.name in feeds
              for d in [vi.type.tensor_type.shape.dim] if len(d) and d[0].WhichOneof("value") == "dim_value"}
    if len(static) != 1:
        return
    batch = static.pop()
    outputs = [o.name for o in ann.graph.output]
    first = {name: array[:batch] for name, array in feeds.items()}
    reference = next(run_batches(ann, first, outputs, batch_size=batch, progress=False))
    grown = onnx.ModelProto()
    grown.CopyFrom(ann)
    grown.graph.ClearField("value_info")
    for vi in grown.graph.input:
        if vi.name in feeds:
            vi.type.tensor_type.shape.dim[0].dim_value = 2 * batch
    for vi in grown.graph.output:
        vi.type.tensor_type.ClearField("shape")
    advice = (f"the model was exported with a static batch of {batch} and uses it beyond the batch axis, so "
              f"the time-unrolled form cannot fold T into the batch; re-export with a dynamic batch axis, "
              f"or compile with --mode stateful")
    try:
        doubled = next(run_batches(grown, {k: np.concatenate([v, v]) for k, v in first.items()}, outputs,
                                   batch_size=2 * batch, progress=False))
    except SpikecError as exc:
        raise SpikecError(f"{advice} (at batch {2 * batch}: {exc})") from None
    for name in outputs:
        want, got = reference[name], doubled[name]
        if want.ndim == 0 or want.shape[0] != batch:
            continue  # not a per-sample output
        if got.shape != (2 * batch, *want.shape[1:]) or not (
                np.allclose(got[:batch], want, rtol=1e-4, atol=1e-5, equal_nan=True)
                and np.allclose(got[batch:], want, rtol=1e-4, atol=1e-5, equal_nan=True)):
            raise SpikecError(f"{advice} (output '{name}' changes when the batch grows)")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
