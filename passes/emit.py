"""Give a rewritten graph its time structure: time-unrolled or stateful (one step per run).

Both forms run the same generic spikec ops, so they compute the same thing:

* **unrolled**: every graph input is repeated T times along the batch axis ([T*B, ...], step-major);
  linear layers run once on all steps, each spikec op scans its time axis internally. Each output
  ``y`` becomes the rate-coded result after T steps and ``y.steps`` [T, B, ...] holds the result
  after every step 1..T, so fidelity versus T comes from one run.
* **stateful**: one step per run. Extra inputs: ``spikec.t`` (float scalar, the 1-based step) and
  ``spikec.state.<node>.<state>`` for every spikec node; extra outputs
  ``spikec.next_state.<node>.<state>``, to feed back at the next step. Every state starts as
  zeros (a tensor of ones-shape broadcasts: the driver passes shape [1]*rank). Output ``y`` is the
  result after the steps run so far.

The time semantics (passes/timing.py) decide what ``y`` and ``y.steps`` are. Mean semantics (ECMT):
the input is presented at every step, biases act at every step, an output is the running mean of its
per-step values. Sum semantics (SpikeZIP-TF): time-invariant tensors count at the first step only
(each spikec ``Onset`` node is lowered here to a Where on the first step's rows, or on ``spikec.t == 1``),
an output is the running sum of its per-step values, and the model also outputs how many spikes each
sample fired at each step: ``spikec.spikes.steps`` [T, B] (unrolled) or ``spikec.spikes`` [B]
(stateful). Once a sample fires nothing at a step after the first, it never fires again and its
outputs are final: the last step with spikes is its T_eq.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from spikec.passes.builder import GraphBuilder
from spikec.passes.timing import MEAN, NEURON_OPS, SUM, replace_uses, varying_tensors
from spikec.runtime import ops as spec
from spikec.runtime import ttfs as ttfs_ops
from spikec.runtime import weights
from spikec.runtime.layout import (
    NEXT_STATE_PREFIX,
    SPIKES_OUTPUT,
    STATE_PREFIX,
    STEPS_SUFFIX,
    TIME_INPUT,
    time_node,
)

from spikec.errors import SpikecError


class Layout(NamedTuple):
    """Where a tensor carries the batch (and, folded, the steps): axis ``axis`` of a rank-``rank`` tensor, read
    as [outer, batch, rest]. (0, 1) is the layout the spikec ops scan: time-major rows of axis 0.
    torch.nn.MultiheadAttention runs sequence-first: [seq, batch, dim] is (1, 1), the [seq * batch, dim] its
    output projection reads is (0, seq)."""

    axis: int
    outer: int
    rank: int

    @property
    def leading(self) -> bool:
        return self.axis == 0 and self.outer == 1


# A tensor whose batch is neither one axis nor a block of one (or that mixes samples): time cannot fold there.
UNKNOWN_LAYOUT = Layout(-1, 0, 0)


@dataclass
class BatchLayouts:
    """The ANN's batch layouts (compiler.check_time_folding): by graph input, and by node and output index, which
    a rewrite keeps (it renames and re-wires tensors, never ANN nodes). Empty: every tensor batch-leading."""

    inputs: dict[str, Layout] = field(default_factory=dict)
    nodes: dict[str, tuple[Layout | None, ...]] = field(default_factory=dict)

    def of_graph(self, graph: gs.Graph) -> dict[int, Layout]:
        """Every tensor's layout in a rewritten graph (by id): the ANN's where the node is the ANN's, else its
        first varying input's of the same rank (spikec ops, the rewrite's elementwise ops and last-axis
        reductions keep the layout of what they read). Absent: no batch axis."""
        found: dict[int, Layout] = {id(t): self.inputs[t.name] for t in graph.inputs if t.name in self.inputs}
        for node in graph.nodes:
            if node.name in self.nodes:
                for tensor, layout in zip(node.outputs, self.nodes[node.name]):
                    if layout is not None:
                        found[id(tensor)] = layout
                continue
            inherited = next((found[id(t)] for t in node.inputs if id(t) in found), None)
            for tensor in node.outputs:
                if inherited is not None and (tensor.shape is None or len(tensor.shape) == inherited.rank):
                    found[id(tensor)] = inherited
        return found


# Ops that only reshape (the flat order of the elements stays): a batch merged behind other axes is recovered
# by viewing a tensor through them as the nearest one whose batch has an axis of its own.
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def fold_time_where_the_batch_is(graph: gs.Graph, layouts: BatchLayouts) -> int:
    """Give every spikec op a batch-leading view of its inputs: a tensor whose batch sits on axis k is transposed
    to put it first (and back after the op); one whose batch is merged behind other axes is first reshaped as a
    related tensor with a batch axis of its own. Each op scans time over axis 0 and counts spikes per row of it,
    so both need the batch there. Returns how many ops were wrapped; refuses an op whose input's batch cannot be
    located, naming it."""
    wrappers = _batch_leading_views(graph, layouts, [n for n in graph.nodes if n.domain == "spikec"])
    for wrapper in wrappers.values():
        wrapper.wrap()
    _cancel_transpose_pairs(graph)
    graph.toposort()
    return len(wrappers)


def _batch_leading_views(graph: gs.Graph, layouts: BatchLayouts, nodes: list[gs.Node]) -> dict[int, _BatchLeading]:
    """By node id, the views of the spikec ``nodes`` whose input is not batch-leading, all found on the graph as
    the rewrite left it, before any op is rewired."""
    found = layouts.of_graph(graph)
    views = {}
    for node in nodes:
        # Onset(x, like): x at the first step's rows of like, whose layout counts
        layout = found.get(id(node.inputs[1 if node.op == "Onset" else 0]))
        if layout is not None and not layout.leading:
            views[id(node)] = _BatchLeading(graph, node, layout, found)
    return views


class _Signature(NamedTuple):
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    outputs: tuple[str, ...]
    hidden: tuple[str, ...] = ()


_ONSET = _Signature(("x", "like"), (), ("y",))  # lowered by _lower_onsets, not in the op library


class _BatchLeading:
    """Rewires one spikec op to read and write batch-leading views of its tensors."""

    def __init__(self, graph: gs.Graph, node: gs.Node, layout: Layout, found: dict[int, Layout]):
        self.graph, self.node, self.b = graph, node, GraphBuilder(graph, node.name)
        self.data = node.inputs[1 if node.op == "Onset" else 0]
        if layout == UNKNOWN_LAYOUT:
            self.refuse("is neither one axis nor a block of one")
        self.view = None  # where the batch is merged: how to reshape a tensor of the data's shape to unmerge it
        self.channels_kept = True
        if layout.outer != 1:
            related = self.related(found)
            if related is None:
                self.refuse(
                    f"is merged behind other axes (axis {layout.axis}) and no reshape relates it to a tensor "
                    f"with a batch axis of its own"
                )
            relative, as_relative = related
            layout = found[id(relative)]
            self.view, kept = self.keeping_channels(relative, layout, as_relative)
            if kept is None:
                self.channels_kept = False
            else:
                layout = Layout(layout.axis, 1, kept)
        self.rank = layout.rank
        self.perm = [layout.axis, *(a for a in range(layout.rank) if a != layout.axis)]

    def keeping_channels(self, relative: gs.Tensor, layout: Layout, as_relative: Callable):
        """(view, its rank): the relative's shape with the trailing dims that the data's last axis (its channels,
        per-channel parameters' axis) spreads over merged back into one, when the batch stays before them;
        else (the relative's own shape, None)."""
        channels, shape = (self.data.shape or [None])[-1], relative.shape or []
        for count in range(1, len(shape) - layout.axis):
            dims = shape[-count:]
            if not isinstance(channels, int) or not all(isinstance(d, int) for d in dims):
                break
            if int(np.prod(dims)) == channels:
                keep = self.b.const([channels], np.int64, name=f"{self.node.name}.view_shape_tail")
                rank = len(shape) - count + 1

                def view(x: gs.Variable, name: str, count=count, keep=keep) -> gs.Variable:
                    unmerged = as_relative(x, name)
                    head = self.add(
                        "Slice",
                        [
                            self.add("Shape", [unmerged], f"{name}.view_shape"),
                            self.b.const([0], np.int64, name=f"{name}.zero"),
                            self.b.const([-count], np.int64, name=f"{name}.head"),
                        ],
                        f"{name}.view_head",
                    )
                    return self.add(
                        "Reshape",
                        [unmerged, self.add("Concat", [head, keep], f"{name}.view_target", axis=0)],
                        f"{name}.channels_last",
                    )

                return view, rank
        return as_relative, None

    def refuse(self, why: str) -> None:
        raise SpikecError(
            f"node {self.node.name}: the batch of its input '{self.data.name}' {why}, so time cannot be "
            f"folded into it; compile with --mode stateful"
        )

    def add(self, op: str, inputs: list, name: str, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        dtype = np.int64 if op == "Shape" else inputs[0].dtype or np.float32
        return self.b.op(
            op, *inputs, out=out if out is not None else gs.Variable(name, dtype=dtype), name=f"{name}/{op}", **attrs
        )

    def wrap(self) -> None:
        op = spec.op_for(self.node.op) if self.node.op != "Onset" else _ONSET
        if op is _ONSET:  # x broadcasts against like: viewed, it must have like's shape
            self.node.inputs[0] = self.add(
                "Expand",
                [self.node.inputs[0], self.add("Shape", [self.data], f"{self.node.name}.like_shape")],
                f"{self.node.name}.broadcast",
            )
        for i in range(len(op.inputs)):
            self.node.inputs[i] = self.leading(self.node.inputs[i], f"{self.node.name}.in{i}")
        for i, name in enumerate(op.params):
            param = self.node.inputs[len(op.inputs) + i]
            if not self.channels_kept and name not in op.hidden and param.values.size > 1:
                self.refuse(
                    f"is merged behind other axes and its per-channel parameter '{param.name}' cannot follow "
                    f"it into a view with a batch axis"
                )
        if "rank" in self.node.attrs:  # Onset's
            self.node.attrs["rank"] = self.rank
        inverse = [int(i) for i in np.argsort(self.perm)]
        for i, out in enumerate(list(self.node.outputs[: len(op.outputs)])):
            inner = gs.Variable(f"{out.name}.batch_leading", dtype=out.dtype, shape=[None] * self.rank)
            self.node.outputs[i] = inner
            if self.view is None:
                self.add("Transpose", [inner], f"{out.name}.batch_back", out=out, perm=inverse)
                continue
            back = self.add("Transpose", [inner], f"{out.name}.batch_back", perm=inverse)
            self.add(
                "Reshape",
                [back, self.add("Shape", [self.data], f"{out.name}.merged_shape")],
                f"{out.name}.batch_merged",
                out=out,
            )

    def leading(self, tensor: gs.Variable, name: str) -> gs.Variable:
        """A tensor of the data's shape and layout, viewed batch-leading."""
        if self.view is not None:
            tensor = self.view(tensor, name)
        viewed = self.add("Transpose", [tensor], f"{name}.batch_leading", perm=self.perm)
        viewed.shape = [None] * self.rank
        return viewed

    def related(self, found: dict[int, Layout]):
        """(relative, view): a tensor with a batch axis of its own that the data is a reshape of, and how to view a
        tensor of the data's shape as it. Backwards through the reshapes that computed the data (the view is
        Reshape(x, Shape(relative))), else forwards through the reshape that reads the op's output after its
        elementwise followers (a neuron's spike value), cloned onto x."""
        tensor = self.data
        while tensor.inputs and (_same_shape_step(tensor.inputs[0]) or tensor.inputs[0].op in _RESHAPES):
            producer = tensor.inputs[0]
            tensor = next(t for t in producer.inputs if not isinstance(t, gs.Constant))
            if found.get(id(tensor), UNKNOWN_LAYOUT).outer == 1:
                relative = tensor
                return relative, lambda x, name, relative=relative: self.add(
                    "Reshape", [x, self.add("Shape", [relative], f"{name}.relative_shape")], f"{name}.unmerged"
                )
        follower = self.node
        while len(follower.outputs[0].outputs) == 1:
            follower = follower.outputs[0].outputs[0]
            if follower.op in _RESHAPES and found.get(id(follower.outputs[0]), UNKNOWN_LAYOUT).outer == 1:
                reshape = follower
                return reshape.outputs[0], lambda x, name, reshape=reshape: self.add(
                    reshape.op, [x, *reshape.inputs[1:]], f"{name}.unmerged", **dict(reshape.attrs)
                )
            if not _same_shape_step(follower):
                break
        return None


def _same_shape_step(node: gs.Node) -> bool:
    """A spikec op, or a Mul/Add by a constant (a neuron's spike value, a bias): its output has its input's shape."""
    return node.domain == "spikec" or (
        node.op in ("Mul", "Add", "Identity") and sum(not isinstance(t, gs.Constant) for t in node.inputs) == 1
    )


def _cancel_transpose_pairs(graph: gs.Graph) -> None:
    """Transpose(perm) read only by Transpose(inverse): wrapped ops in a row hand each other batch-leading
    tensors, and the runtime fuses adjacent spikec ops (runtime/fusion.py) only without the pair between."""
    for first in [n for n in graph.nodes if n.op == "Transpose"]:
        readers = first.outputs[0].outputs
        if (
            len(readers) != 1
            or readers[0].op != "Transpose"
            or first.outputs[0] in graph.outputs
            or readers[0].outputs[0] in graph.outputs
        ):
            continue
        second = readers[0]
        perm, back = first.attrs.get("perm"), second.attrs.get("perm")
        if perm is None or back is None or [perm[i] for i in back] != list(range(len(perm))):
            continue
        replace_uses(second.outputs[0], first.inputs[0])
    graph.cleanup()


def _readout_sources(graph: gs.Graph) -> set[str]:
    return varying_tensors(graph, [t.name for n in graph.nodes if n.domain == "spikec" for t in n.outputs])


def _is_float(tensor: gs.Variable) -> bool:
    return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)


def _add_rate_readouts(graph: gs.Graph, semantics: str) -> list[tuple[gs.Variable, gs.Variable]]:
    """Route each time-varying output through a running mean (or sum); returns (readout, original output) pairs."""
    varying = _readout_sources(graph)
    b = GraphBuilder(graph, "readout")
    pairs = []
    for output in list(graph.outputs):
        # Outputs that cannot be averaged (indices from an op kept in float) report their last step.
        if output.name not in varying or not _is_float(output):
            continue
        per_step = gs.Variable(f"{output.name}.per_step", dtype=output.dtype, shape=output.shape)
        producer = output.inputs[0] if output.inputs else None
        replace_uses(output, per_step, producer=True)
        if (
            producer is not None
            and producer.domain == "spikec"
            and producer.op == "ECCompensate"
            and producer.attrs["average"] == int(semantics == MEAN)
        ):
            # The running sum (mean) of a compensation's increments is the output of the function it
            # compensates: read that, without the float rounding of summing the increments back up.
            b.op("Identity", producer.inputs[0], out=output, name=f"readout/{output.name}")
        else:
            b.spikec(
                "ECAccumulate", per_step, out=output, name=f"readout/{output.name}", average=int(semantics == MEAN)
            )
        pairs.append((output, per_step))
    return pairs


def _batch_size(graph: gs.Graph) -> gs.Variable:
    """[1] int64: the batch size B of the first batched graph input (before time folding)."""
    source = next((i for i in graph.inputs if i.shape), None)
    if source is None:
        raise ValueError("the model has no batched input to count spikes per sample")
    b = GraphBuilder(graph, "spikec")
    shape = b.op("Shape", source, out=gs.Variable("spikec.batch_shape", dtype=np.int64), name=time_node("batch_shape"))
    return b.op(
        "Slice",
        shape,
        b.const([0], np.int64, name="spikec.zero1"),
        b.const([1], np.int64, name="spikec.one1"),
        out=gs.Variable("spikec.batch", dtype=np.int64),
        name=time_node("batch"),
    )


def _add_spike_counts(graph: gs.Graph, leading: list, name: str, views: dict[int, _BatchLeading] | None = None) -> None:
    """Output ``name``: spikes fired per row of ``leading`` + [B] (a shape prefix of constants and tensors),
    from each neuron's count output (its spikes per row of their leading axis: per sample and step, or
    per head of one; fused into the neuron's pass by the native kernels). A neuron whose input is not
    batch-leading (``views``, the stateful form: its states keep its input's layout) is counted from its spikes
    viewed batch-leading instead."""
    neurons = [n for n in graph.nodes if n.domain == "spikec" and spec.base_name(n.op) in NEURON_OPS]
    if not neurons:
        return
    b = GraphBuilder(graph, f"count/{name}")
    target = b.op(
        "Concat",
        *leading,
        b.const([-1], np.int64, name=f"{name}.rest"),
        out=gs.Variable(f"{name}.shape", dtype=np.int64),
        name=f"count/{name}/shape",
        axis=0,
    )
    counts = []
    for neuron in neurons:
        if not spec.op_for(neuron.op).spike_count:
            raise ValueError(f"spikec node {neuron.name}: {neuron.op} has no spike count output")
        spikes = neuron.outputs[0]
        per_row, rows, count = (gs.Variable(f"{spikes.name}.{s}", dtype=np.float32) for s in ("count", "rows", "total"))
        view = (views or {}).get(id(neuron))
        neuron.outputs.append(per_row if view is None else gs.Variable.empty())  # "": the op does not count
        if view is not None:
            codes = view.leading(view.add("Abs", [spikes], f"{spikes.name}.magnitude"), f"{spikes.name}.counted")
            view.add(
                "ReduceSum",
                [codes, b.const(list(range(1, view.rank)), np.int64, name=f"{spikes.name}.rest_axes")],
                f"{spikes.name}.per_row",
                out=per_row,
                keepdims=0,
            )
        b.op("Reshape", per_row, target, out=rows, name=f"count/{neuron.name}/rows")
        counts.append(
            b.op(
                "ReduceSum",
                rows,
                b.const([len(leading)], np.int64, name=f"{name}.axis"),
                out=count,
                name=f"count/{neuron.name}/sum",
                keepdims=0,
            )
        )
    total = gs.Variable(
        name, dtype=np.float32, shape=[d.values.item() if isinstance(d, gs.Constant) else None for d in leading]
    )
    graph.outputs.append(b.op("Sum", *counts, out=total, name=f"count/{name}"))


def _lower_onsets(graph: gs.Graph, first_step) -> None:
    """Replace each Onset(x, like) by Where(first_step(rank, like), x, 0)."""
    b = GraphBuilder(graph, "onset")
    for node in [n for n in graph.nodes if n.domain == "spikec" and n.op == "Onset"]:
        data, like = node.inputs
        rank = node.attrs["rank"]
        node.op, node.domain = "Where", None
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([first_step(rank, like), data, b.const(0.0, np.float32, name=f"{node.name}.zero")])


def emit_unrolled(
    graph: gs.Graph, timesteps: int, semantics: str = MEAN, layouts: BatchLayouts | None = None
) -> gs.Graph:
    fold_time_where_the_batch_is(graph, layouts or BatchLayouts())
    _add_rate_readouts(graph, semantics)
    if any(i.shape and isinstance(i.shape[0], int) for i in graph.inputs):
        # A static batch B is written into the tensors' declared shapes, on whichever axis carries it
        # (axis 0, or merged as B*heads): with time folded in they hold T*B rows, and onnxruntime refuses
        # a declared size that contradicts the inferred one. Declare only the dtype; inference redoes the rest.
        boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
                tensor.shape = None
    for node in graph.nodes:
        if node.domain == "spikec":
            node.attrs["timesteps"] = timesteps
    b = GraphBuilder(graph, "time")
    for graph_input in graph.inputs:
        repeated = gs.Variable(f"{graph_input.name}.repeated", dtype=graph_input.dtype)
        replace_uses(graph_input, repeated)
        repeats = np.ones(len(graph_input.shape), np.int64)
        repeats[0] = timesteps
        b.op(
            "Tile",
            graph_input,
            b.const(repeats, None, name=f"{graph_input.name}.time_repeats"),
            out=repeated,
            name=time_node(graph_input.name),
        )
    final_outputs, step_outputs = [], []
    for output in graph.outputs:
        unrolled = gs.Variable(f"{output.name}.unrolled", dtype=output.dtype)
        replace_uses(output, unrolled, producer=True)
        steps = _time_major(graph, unrolled, timesteps, output.name)
        steps.shape = None if output.shape is None else [timesteps, *output.shape]
        final_outputs.append(
            b.op(
                "Gather",
                steps,
                b.const(timesteps - 1, np.int64, name=f"{output.name}.last_step"),
                out=gs.Variable(output.name, dtype=output.dtype, shape=output.shape),
                name=time_node(f"{output.name}/last"),
                axis=0,
            )
        )
        step_outputs.append(steps)
    graph.outputs = final_outputs + step_outputs
    if semantics == SUM:
        masks: dict[tuple[str, int], gs.Variable] = {}

        def first_step(rank: int, like: gs.Tensor) -> gs.Variable:
            """[rows, 1, ..] bool over ``like``'s rows: true on the first step's (the first rows/T)."""
            if (like.name, rank) in masks:
                return masks[like.name, rank]
            prefix = f"{like.name}.first_step{rank}"

            def step(op: str, *inputs, to: str, dtype=np.int64) -> gs.Variable:
                return b.op(op, *inputs, out=gs.Variable(f"{prefix}.{to}", dtype=dtype), name=f"{prefix}/{to}")

            shape = step("Shape", like, to="shape")
            count = step("Gather", shape, b.const(0, np.int64, name=f"{prefix}.axis0"), to="count")
            per_step = step("Div", count, b.const(timesteps, np.int64, name=f"{prefix}.t"), to="per_step")
            index = step(
                "Range",
                b.const(0, np.int64, name=f"{prefix}.start"),
                count,
                b.const(1, np.int64, name=f"{prefix}.step"),
                to="index",
            )
            first = step("Less", index, per_step, to="first", dtype=bool)
            masks[like.name, rank] = step(
                "Reshape",
                first,
                b.const([-1] + [1] * (rank - 1), np.int64, name=f"{prefix}.mask_shape"),
                to="mask",
                dtype=bool,
            )
            return masks[like.name, rank]

        _lower_onsets(graph, first_step)
        spikes = SPIKES_OUTPUT + STEPS_SUFFIX
        _add_spike_counts(graph, [b.const([timesteps], np.int64, name="spikec.timesteps"), _batch_size(graph)], spikes)
    graph.toposort()
    return graph


def _time_major(graph: gs.Graph, tensor: gs.Variable, timesteps: int, name: str) -> gs.Variable:
    """[T*B, ...] -> [T, B, ...] named ``<name>.steps``."""
    b = GraphBuilder(graph, name)

    def shape(suffix: str) -> gs.Variable:
        return gs.Variable(f"{name}.{suffix}", dtype=np.int64)

    unrolled = b.op("Shape", tensor, out=shape("unrolled_shape"), name=time_node(f"{name}/shape"))
    rest = b.op(
        "Slice",
        unrolled,
        b.const([1], np.int64, name=f"{name}.one"),
        b.const([2**62], np.int64, name=f"{name}.end"),
        out=shape("row_shape"),
        name=time_node(f"{name}/rows"),
    )
    target = b.op(
        "Concat",
        b.const([timesteps, -1], np.int64, name=f"{name}.time_major"),
        rest,
        out=shape("steps_shape"),
        name=time_node(f"{name}/target"),
        axis=0,
    )
    return b.op(
        "Reshape",
        tensor,
        target,
        out=gs.Variable(f"{name}{STEPS_SUFFIX}", dtype=tensor.dtype),
        name=time_node(f"{name}/steps"),
    )


def state_rank(node: gs.Node) -> int:
    shape = node.inputs[0].shape
    if shape is None:
        raise ValueError(f"spikec node {node.name}: input rank unknown, cannot declare its state")
    return len(shape) + spec.op_for(node.op).state_rank_offset


def emit_stateful(graph: gs.Graph, semantics: str = MEAN, layouts: BatchLayouts | None = None) -> gs.Graph:
    neurons = [n for n in graph.nodes if n.domain == "spikec" and n.op in NEURON_OPS]
    views = _batch_leading_views(graph, layouts or BatchLayouts(), neurons) if semantics == SUM else {}
    _add_rate_readouts(graph, semantics)
    time = gs.Variable(TIME_INPUT, dtype=np.float32, shape=[])
    if semantics == SUM:
        b = GraphBuilder(graph, "spikec")
        is_first = b.op(
            "Equal",
            time,
            b.const(1.0, np.float32, name="spikec.t1"),
            out=gs.Variable("spikec.first_step", dtype=bool, shape=[]),
            name=time_node("first_step"),
        )
        _lower_onsets(graph, lambda rank, like: is_first)
    state_inputs, state_outputs = [], []
    for node in [n for n in graph.nodes if n.domain == "spikec"]:
        op = spec.op_for(node.op)
        rank = state_rank(node)
        data, params = node.inputs[: len(op.inputs)], node.inputs[len(op.inputs) :]
        states = [
            gs.Variable(f"{STATE_PREFIX}{node.name}.{s}", dtype=np.float32, shape=[None] * rank) for s in op.states
        ]
        next_states = [
            gs.Variable(f"{NEXT_STATE_PREFIX}{node.name}.{s}", dtype=np.float32, shape=[None] * rank) for s in op.states
        ]
        node.op = op.step_name
        node.inputs.clear()
        node.inputs.extend([*data, *states, *params, time])
        node.outputs += next_states
        state_inputs += states
        state_outputs += next_states
    if semantics == SUM:  # the count output comes after the next states
        _add_spike_counts(graph, [_batch_size(graph)], SPIKES_OUTPUT, views)
    graph.inputs = list(graph.inputs) + [time] + state_inputs
    graph.outputs = list(graph.outputs) + state_outputs
    graph.toposort()
    return graph


def to_model(
    graph: gs.Graph, template: onnx.ModelProto, metadata: dict[str, str], data: weights.DataFile | None = None
) -> onnx.ModelProto:
    """Export with the spikec function bodies, the template's opsets and the given metadata. With ``data``,
    the weights are written there first, one by one (spikec.runtime.weights.externalize), and the model references
    them: no weight is held twice, and new ones (folded thresholds) are released as they are written."""
    opset = spec.default_opset(template)
    used = {n.op for n in graph.nodes if n.domain == "spikec"}
    if data is not None:
        weights.externalize(graph, data)
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend([o for o in template.opset_import if o.domain != spec.DOMAIN])
    model.opset_import.append(onnx.helper.make_opsetid(spec.DOMAIN, spec.DOMAIN_VERSION))
    model.functions.extend(spec.functions_for(used, opset) + ttfs_ops.functions_for(used, opset))
    model.ir_version = template.ir_version
    model.producer_name = "spikec"
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model
