"""Static facts about an ANN or a spikec model, shared by `spikec inspect` and `spikec report`.

* `sample_shapes`: every tensor's shape for one sample (shape inference with batch 1), so neuron
  counts and MACs are per sample (and, for spiking models, per time step);
* `product_macs`: multiply-accumulates of every MatMul/Gemm/Conv;
* `classify_nodes`: what each node of a spikec model is for, and why an op stays in floating point;
* `rewrites`: every recognized region with the spikec ops the conversion put around it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec.errors import SpikecError
from spikec.passes.canonicalize import infer_shapes
from spikec.passes.timing import NEURON_OPS, varying_tensors
from spikec.runtime.layout import STATE_PREFIX, integer_product_node, is_spike_value, is_time_node, is_tracer_value
from spikec.runtime.metadata import CompileReport, SpikecMetadata
from spikec.runtime.ops import base_name

PRODUCT_OPS = ("MatMul", "MatMulInteger", "Gemm", "Conv", "ConvTranspose")
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)
# Region kinds the ECMT paper's Table 3 counts at one operation per output element.
NONLINEAR_KINDS = ("layernorm", "gelu", "softmax")
SPIKEC_DOMAIN = "spikec"

# Why a node of a spikec model runs as it does (classify_nodes).
CATEGORIES = {
    "spike_product": "activation x weight product fed by spike codes: accumulate-only (AC) on event-driven "
    "hardware; runs as a float MatMul in onnxruntime",
    "ec_float": "expectation compensation keeps F in floating point, evaluated on the running means "
    "(ECMT design; activation x activation products included)",
    "allow_float": "kept in floating point by --allow-float: evaluated on per-step values, not averaged",
    "integer_total": "integer-exact mode: runs on the neurons' running totals (tracers x theta) as the QANN "
    "runs on its levels; its value at step t is the estimate after t steps",
    "affine": "affine in its time-varying inputs: commutes with the running mean, runs on per-step values",
    "time_invariant": "depends on inputs and constants only: identical at every step",
    "decoded": "time-to-first-spike: a layer's synaptic sum on the decoded spike times, computed once (one pass)",
    "time": "time layout: tiling the input over steps, per-step readout",
    "spiking": "spikec op",
}


def base_op(node) -> str:
    """spikec ops of stateful models are the `<Op>Step` form of the same op."""
    op = node.op if isinstance(node, gs.Node) else node.op_type
    domain = node.domain if isinstance(node, (gs.Node, onnx.NodeProto)) else ""
    return base_name(op) if domain == SPIKEC_DOMAIN else op


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@dataclass(frozen=True)
class Shapes:
    """Tensor shapes inferred for one sample. A time-unrolled model carries ``rows`` = T rows per sample."""

    shapes: dict[str, tuple | None]
    dtypes: dict[str, int]
    rows: int = 1

    def elements(self, name: str) -> int | None:
        """Elements per sample (per step for a spiking model), None where a dim is unknown. Where
        inference lost axis 0 it is taken to be the batch axis (spikec's convention for activations)."""
        shape = self.shapes.get(name)
        if not shape or any(not isinstance(d, int) for d in shape[1:]):
            return None if shape is None or shape else 1
        if not isinstance(shape[0], int):
            return int(np.prod(shape[1:], dtype=np.int64))
        return int(np.prod(shape, dtype=np.int64)) // self.rows

    def is_float(self, name: str) -> bool:
        return self.dtypes.get(name) in FLOAT_TYPES

    def observe(self, values: Mapping[str, np.ndarray], batch: int) -> Shapes:
        """These shapes, with those of tensors actually computed for ``batch`` samples where inference
        left dims unknown (e.g. heads reshaped from a computed shape)."""
        shapes = dict(self.shapes)
        for name, value in values.items():
            if value.ndim and value.shape[0] % batch == 0:
                shapes[name] = (value.shape[0] // batch, *value.shape[1:])
        return Shapes(shapes, self.dtypes, self.rows)


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    g = model.graph
    return [*g.input, *g.value_info, *g.output]


def sample_shapes(model: onnx.ModelProto, inputs: Mapping[str, Sequence[int]] | None = None) -> Shapes:
    """Shapes of every tensor with batch 1: graph inputs get [1, *inputs[name][1:]] where given (so data
    resolves symbolic dims such as a sequence length), else their declared dims with axis 0 set to 1.
    Stateful models get states of ones-shape, as the driver feeds them."""
    record = SpikecMetadata.read(model)
    rows = record.timesteps if record and record.mode == "unrolled" else 1
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    graph = skeleton.graph
    graph.ClearField("value_info")
    constants = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in constants or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        given = inputs.get(vi.name) if inputs else None
        for axis, dim in enumerate(dims):
            if vi.name.startswith(STATE_PREFIX):
                size = 1
            elif axis == 0:
                size = 1
            elif given is not None and axis < len(given):
                size = int(given[axis])
            else:
                continue
            dim.Clear()
            dim.dim_value = size
    for vi in graph.output:  # outputs are re-inferred for batch 1
        vi.type.tensor_type.ClearField("shape")
    try:
        inferred = infer_shapes(skeleton)
    except SpikecError:
        inferred = model  # keep what the file declares; counts become unknown where dims are symbolic
    shapes, dtypes = {}, {}
    for vi in _value_infos(inferred):
        tensor = vi.type.tensor_type
        dtypes[vi.name] = tensor.elem_type
        shapes[vi.name] = (
            tuple(d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in tensor.shape.dim)
            if tensor.HasField("shape")
            else None
        )
    for t in model.graph.initializer:
        dtypes[t.name], shapes[t.name] = t.data_type, tuple(t.dims)
    return Shapes(shapes, dtypes, rows)


def node_macs(node: onnx.NodeProto, shapes: Shapes) -> int | None:
    """Multiply-accumulates of one product (PRODUCT_OPS) per sample (per step); None if unknown."""
    out = shapes.elements(node.output[0])
    if out is None:
        return None
    if node.op_type in ("MatMul", "MatMulInteger"):
        a = shapes.shapes.get(node.input[0])
        return out * a[-1] if a and isinstance(a[-1], int) else None
    if node.op_type == "Gemm":
        a = shapes.shapes.get(node.input[0])
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a and a[0 if trans_a else -1]
        return out * k if isinstance(k, int) else None
    w = shapes.shapes.get(node.input[1])
    if not w or any(not isinstance(d, int) for d in w):
        return None
    if node.op_type == "Conv":
        return out * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":  # every input element is scattered to C_out/group x kernel outputs
        x = shapes.elements(node.input[0])
        return None if x is None else x * int(np.prod(w[1:]))
    return None


def product_macs(model: onnx.ModelProto, shapes: Shapes) -> list[dict]:
    """Every product node: name, op, MACs per sample (per step), and its input's elements."""
    return [
        {
            "node": n.name,
            "op": n.op_type,
            "macs": node_macs(n, shapes),
            "inputs": list(n.input[:2]),
            "output": n.output[0],
        }
        for n in model.graph.node
        if n.op_type in PRODUCT_OPS
    ]


def nonlinear_regions(model: onnx.ModelProto) -> list[dict]:
    """The ANN's nonlinear modules: LayerNorm, GELU and Softmax regions with their outputs."""
    from spikec.passes.patterns import describe, find_regions

    graph = gs.import_onnx(model)
    graph.toposort()
    return [
        {"region": r["name"], "kind": r["kind"], "outputs": r["outputs"]}
        for r in describe(find_regions(graph))
        if r["kind"] in NONLINEAR_KINDS
    ]


def nonlinear_elements(regions: Sequence[dict], shapes: Shapes) -> list[dict]:
    """`nonlinear_regions` with their output elements per sample."""
    return [
        {"region": r["region"], "kind": r["kind"], "elements": _sum_or_none(shapes.elements(o) for o in r["outputs"])}
        for r in regions
    ]


def counted_tensors(model: onnx.ModelProto, regions: Sequence[dict] = ()) -> list[str]:
    """The activations whose shapes operation counts need: product operands and outputs, EC inputs and
    the outputs of ``regions``."""
    constants = {t.name for t in model.graph.initializer}
    names = [t for n in model.graph.node if n.op_type in PRODUCT_OPS for t in [*n.input[:2], n.output[0]]]
    names += [
        n.input[0]
        for n in model.graph.node
        if n.domain == SPIKEC_DOMAIN and base_op(n) in ("ECAccumulate", "ECCompensate")
    ]
    names += [o for r in regions for o in r["outputs"]]
    return [t for t in dict.fromkeys(names) if t and t not in constants]


def _sum_or_none(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else int(sum(values))


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str
    domain: str
    category: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # its outputs at step t already estimate their value after t steps: F of running means (ECMT's mean
    # domain, ECAccumulate's outputs) or integer-exact mode's running totals
    running: bool = False


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and what nodes compute from them alone: a product's weight, also where a QDQ model
    computes it (DequantizeLinear of int8 initializers)."""
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # in topological order
        if all(not name or name in constants for name in node.input):
            constants.update(node.output)
    return constants


def classify_nodes(model: onnx.ModelProto) -> list[NodeInfo]:
    """Every node of a spikec model with the category (CATEGORIES) saying why it runs as it does.

    Time-varying tensors are those downstream of a neuron; tensors downstream of an ECAccumulate and
    before the ECCompensate are running means (the "mean domain" where ECMT evaluates F in float)."""
    graph = gs.import_onnx(model)
    graph.toposort()
    record = SpikecMetadata.read(model)
    one_pass = record is not None and record.mode == "ttfs"
    # a TTFS model has no steps: what its spike times decode to varies with the input, once
    neurons = [
        n for n in graph.nodes if n.domain == SPIKEC_DOMAIN and (one_pass or base_op(n) in NEURON_OPS) and n.outputs
    ]
    varying = varying_tensors(graph, [n.outputs[0].name for n in neurons])
    spikes = {n.outputs[0].name for n in neurons} if not one_pass else set()
    allow = set(record.allow_float) if record else set()
    constants = constant_tensors(model)
    means: set[str] = set()
    spike_values: set[str] = set()  # code x theta: the spike scaled back, still one event per spike
    totals: set[str] = set()  # integer-exact mode: running totals, every op between neurons reads them
    result = []
    for node in graph.nodes:
        names = [t.name for t in node.inputs if not isinstance(t, gs.Constant)]
        if node.domain == SPIKEC_DOMAIN:
            category = "spiking"
            if base_op(node) == "ECAccumulate":
                means.update(t.name for t in node.outputs)
        elif is_time_node(node.name):
            category = "time"
        elif (
            node.op in PRODUCT_OPS
            and any(n in spikes or n in spike_values for n in names)
            and any(t.name in constants for t in node.inputs[:2])
        ):
            category = "spike_product"
            if any(n in totals for n in names):  # a product of tracers is the total of its spikes' products
                totals.update(t.name for t in node.outputs)
        elif is_tracer_value(node.name):
            # an integer-exact neuron's running total, read by weight products as spikes summed and by
            # every other op as the running sum it is
            category = "integer_total"
            spike_values.update(t.name for t in node.outputs)
            totals.update(t.name for t in node.outputs)
        elif any(n in totals for n in names):
            category = "integer_total"
            totals.update(t.name for t in node.outputs)
        elif any(n in means for n in names):
            category = "ec_float"
            means.update(t.name for t in node.outputs)
        elif not any(t.name in varying for t in node.outputs):  # shape-only ops of varying tensors too
            category = "time_invariant"
        elif one_pass:
            category = "decoded"
        elif node.op in allow or node.name in allow:
            category = "allow_float"
        else:
            category = "affine"
            if node.op == "Mul" and is_spike_value(node.name):
                spike_values.update(t.name for t in node.outputs)
        result.append(
            NodeInfo(
                node.name,
                base_op(node),
                node.domain or "ai.onnx",
                category,
                tuple(t.name for t in node.inputs),
                tuple(t.name for t in node.outputs),
                running=any(t.name in means or t.name in totals for t in node.outputs),
            )
        )
    return result


def mean_domain(nodes: Sequence[NodeInfo]) -> set[str]:
    """Tensors holding F of running means, or integer-exact mode's running totals (their value at step t is
    already the estimate after t steps)."""
    return {o for n in nodes if n.running for o in n.outputs}


def float_ops(nodes: Sequence[NodeInfo]) -> list[dict]:
    """Non-spikec nodes by category, with an op histogram and the reason they stay in floating point."""
    rows = []
    for category, reason in CATEGORIES.items():
        members = [n for n in nodes if n.category == category]
        if category == "spiking" or not members:
            continue
        ops = Counter(n.op for n in members)
        rows.append(
            {
                "category": category,
                "reason": reason,
                "nodes": len(members),
                "ops": dict(sorted(ops.items())),
                "node_names": [n.name for n in members],
            }
        )
    return rows


def neuron_counts(report: CompileReport, nodes: Sequence[NodeInfo], shapes: Shapes) -> dict:
    """Per MT neuron site, the number of neurons (elements per sample of its input), and the totals."""
    sites = []
    for neuron in report.neurons or []:
        sites.append({"tensor": neuron["tensor"], "node": neuron["node"], "neurons": shapes.elements(neuron["tensor"])})
    counts = [s["neurons"] for s in sites]
    return {
        "neuron_nodes": sum(1 for n in nodes if n.domain == SPIKEC_DOMAIN and n.op in NEURON_OPS),
        "neurons_total": None if any(c is None for c in counts) else int(sum(counts)),
        "sites": sites,
    }


def neuron_label(neuron: dict) -> str:
    """One neuron site of a compile report, as the op and parameters it got."""
    if "levels" in neuron:
        return f"MTNeuron(levels={neuron['levels']})"
    theta = np.asarray(neuron["threshold"], np.float64)
    shown = f"{theta.item():.4g}" if theta.size == 1 else f"[{theta.min():.3g} .. {theta.max():.3g}] x{theta.size}"
    low, high = np.asarray(neuron["s_min"]), np.asarray(neuron["s_max"])
    bounds = (
        f"[{low.item()}, {high.item()}]"
        if low.size == 1
        else f"[{low.min()} .. {low.max()}, {high.min()} .. {high.max()}] per channel"
    )
    op = neuron["node"].rsplit("/", 1)[-1]  # STBIFNeuron, or STBIFIntegerNeuron in integer-exact mode
    burst = f", burst {neuron['burst']}" if neuron.get("burst", 1) > 1 else ""
    return f"{op}(theta={shown}, tracer {bounds}{burst})"


def rewrites(report: CompileReport, nodes: Sequence[NodeInfo]) -> list[dict]:
    """Every recognized region (and every compensated single node): original ops -> what spikec made of it."""
    compensated = {c["region"]: c for c in report.compensated or []}
    integer = report.extra.get("integer", False)
    label = {n["tensor"]: neuron_label(n) for n in report.neurons or []}
    fed_by: dict[str, list[str]] = {}
    for neuron in report.neurons or []:
        # ECMT neurons feed products; a SpikeZIP-TF neuron stands where its quantizer region was
        for consumer in neuron.get("consumers", [neuron.get("region")]):
            fed_by.setdefault(consumer, []).append(neuron["tensor"])
    for encoder in report.encoders or []:  # STA
        label[encoder["tensor"]] = "X2XEncoder (IF neurons on x and -x)"
        for consumer in encoder["consumers"]:
            fed_by.setdefault(consumer, []).append(encoder["tensor"])
    ugo_of = {u["region"]: u for u in report.ugos or []}
    category = {n.name: n.category for n in nodes}
    folded = {name for name, c in category.items() if c == "spike_product"}
    rows = []
    units = [(r["name"], r["kind"], r["nodes"], r["ops"]) for r in report.regions or []]
    in_regions = {r["name"] for r in report.regions or []}
    units += [
        (c["region"], c["kind"], [c["region"]], c["ops"])
        for c in report.compensated or []
        if c["region"] not in in_regions
    ]
    for name, kind, members, ops in units:
        spikec_ops = []
        for tensor in sorted({t for m in members for t in fed_by.get(m, [])}):
            spikec_ops.append(f"{label[tensor]} on {tensor}")
        if any(m in folded or integer_product_node(m) in folded for m in members):
            spikec_ops.append(
                "reads the neurons' tracers (spikes summed) x theta: an accumulate per spike"
                if integer
                else "thresholds folded into weights (PPN)"
            )
        elif any(integer_product_node(m) in category for m in members):
            spikec_ops.append("MatMulInteger of the two operands' levels (int32), times both thresholds")
        if name in ugo_of:
            u = ugo_of[name]
            spikec_ops.append(
                f"UGO({u['operator']}, N={u['hidden']}): N IF neurons per element, one spikec UGO op"
                + (", products by TCSA" if u["operator"] == "rsqrt" else "")
            )
        if name in compensated:
            c = compensated[name]
            accumulated = "running sums" if report.semantics == "sum" else "means"
            if c.get("rewrite") == "SESA":
                spikec_ops.append(f"SESA: S_A S_B, ECAccumulate x2 ({accumulated}) -> MatMul -> ECCompensate")
            else:
                spikec_ops.append(
                    f"ECAccumulate x{len(c['inputs'])} -> {'/'.join(ops)} in float on {accumulated} "
                    f"-> ECCompensate x{len(c['outputs'])}"
                )
        if not spikec_ops:
            kept = {category.get(m) for m in members} - {None}
            spikec_ops = [
                "kept in float (--allow-float)"
                if "allow_float" in kept
                else "unchanged: time-invariant, identical at every step"
                if kept == {"time_invariant"}
                else "unchanged: runs on the running totals (tracers x theta), as the QANN on its levels"
                if "integer_total" in kept
                else "unchanged: affine, runs on per-step values"
            ]
        rows.append({"region": name, "kind": kind, "original_ops": list(ops), "spikec_ops": spikec_ops})
    return rows


def summarize(model: onnx.ModelProto, inputs: Mapping[str, Sequence[int]] | None = None) -> dict:
    """What `spikec inspect` adds to the op histogram: rewrites, neuron counts, float ops and why.
    ``inputs`` (input name -> data shape) resolves symbolic dims for the neuron counts."""
    record = SpikecMetadata.read(model)
    if record is None:
        return {"rewrites": [], "neuron_counts": {"neuron_nodes": 0, "neurons_total": 0, "sites": []}, "float_ops": []}
    report = record.report
    nodes = classify_nodes(model)
    return {
        "rewrites": rewrites(report, nodes),
        "neuron_counts": neuron_counts(report, nodes, sample_shapes(model, inputs)),
        "float_ops": float_ops(nodes),
    }
