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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec import weights
from spikec.passes.timing import MEAN, NEURON_OPS, SUM, replace_uses, spikec_node, varying_tensors
from spikec.runtime import ops as spec
from spikec.runtime import ttfs as ttfs_ops
from spikec.runtime.layout import NEXT_STATE_PREFIX, SPIKES_OUTPUT, STATE_PREFIX, STEPS_SUFFIX, TIME_INPUT


def _readout_sources(graph: gs.Graph) -> set[str]:
    return varying_tensors(graph, [t.name for n in graph.nodes if n.domain == "spikec" for t in n.outputs])


def _is_float(tensor: gs.Variable) -> bool:
    return tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)


def _add_rate_readouts(graph: gs.Graph, semantics: str) -> list[tuple[gs.Variable, gs.Variable]]:
    """Route each time-varying output through a running mean (or sum); returns (readout, original output) pairs."""
    varying = _readout_sources(graph)
    pairs = []
    for output in list(graph.outputs):
        # Outputs that cannot be averaged (indices from an op kept in float) report their last step.
        if output.name not in varying or not _is_float(output):
            continue
        per_step = gs.Variable(f"{output.name}.per_step", dtype=output.dtype, shape=output.shape)
        replace_uses(output, per_step, producer=True)
        graph.nodes.append(spikec_node("ECAccumulate", f"readout/{output.name}", [per_step], [output],
                                       average=int(semantics == MEAN)))
        pairs.append((output, per_step))
    return pairs


def _const(name: str, value, dtype=np.int64) -> gs.Constant:
    return gs.Constant(name, np.array(value, dtype))


def _batch_size(graph: gs.Graph) -> gs.Variable:
    """[1] int64: the batch size B of the first batched graph input (before time folding)."""
    source = next((i for i in graph.inputs if i.shape), None)
    if source is None:
        raise ValueError("the model has no batched input to count spikes per sample")
    shape, batch = gs.Variable("spikec.batch_shape", dtype=np.int64), gs.Variable("spikec.batch", dtype=np.int64)
    graph.nodes += [gs.Node("Shape", "time/batch_shape", inputs=[source], outputs=[shape]),
                    gs.Node("Slice", "time/batch", inputs=[shape, _const("spikec.zero1", [0]), _const("spikec.one1", [1])],
                            outputs=[batch])]
    return batch


def _add_spike_counts(graph: gs.Graph, leading: list, name: str) -> None:
    """Output ``name``: spikes fired per row of ``leading`` + [B] (a shape prefix of constants and tensors),
    from each neuron's count output (its spikes per row of their leading axis: per sample and step, or
    per head of one; fused into the neuron's pass by the native kernels)."""
    neurons = [n for n in graph.nodes if n.domain == "spikec" and spec.base_name(n.op) in NEURON_OPS]
    if not neurons:
        return
    target = gs.Variable(f"{name}.shape", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", f"count/{name}/shape", attrs={"axis": 0},
                               inputs=[*leading, _const(f"{name}.rest", [-1])], outputs=[target]))
    counts = []
    for neuron in neurons:
        if not spec.op_for(neuron.op).spike_count:
            raise ValueError(f"spikec node {neuron.name}: {neuron.op} has no spike count output")
        spikes = neuron.outputs[0]
        per_row, rows, count = (gs.Variable(f"{spikes.name}.{s}", dtype=np.float32) for s in ("count", "rows", "total"))
        neuron.outputs.append(per_row)
        graph.nodes += [
            gs.Node("Reshape", f"count/{neuron.name}/rows", inputs=[per_row, target], outputs=[rows]),
            gs.Node("ReduceSum", f"count/{neuron.name}/sum", attrs={"keepdims": 0},
                    inputs=[rows, _const(f"{name}.axis", [len(leading)])], outputs=[count]),
        ]
        counts.append(count)
    total = gs.Variable(name, dtype=np.float32, shape=[d.values.item() if isinstance(d, gs.Constant) else None
                                                      for d in leading])
    graph.nodes.append(gs.Node("Sum", f"count/{name}", inputs=counts, outputs=[total]))
    graph.outputs.append(total)


def _lower_onsets(graph: gs.Graph, first_step) -> None:
    """Replace each Onset(x, like) by Where(first_step(rank, like), x, 0)."""
    for node in [n for n in graph.nodes if n.domain == "spikec" and n.op == "Onset"]:
        data, like = node.inputs
        rank = node.attrs["rank"]
        node.op, node.domain = "Where", None
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([first_step(rank, like), data,
                            _const(f"{node.name}.zero", 0.0, np.float32)])


def emit_unrolled(graph: gs.Graph, timesteps: int, semantics: str = MEAN) -> gs.Graph:
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
    for graph_input in graph.inputs:
        repeated = gs.Variable(f"{graph_input.name}.repeated", dtype=graph_input.dtype)
        replace_uses(graph_input, repeated)
        repeats = np.ones(len(graph_input.shape), np.int64)
        repeats[0] = timesteps
        graph.nodes.append(gs.Node("Tile", f"time/{graph_input.name}",
                                   inputs=[graph_input, gs.Constant(f"{graph_input.name}.time_repeats", repeats)],
                                   outputs=[repeated]))
    final_outputs, step_outputs = [], []
    for output in graph.outputs:
        unrolled = gs.Variable(f"{output.name}.unrolled", dtype=output.dtype)
        replace_uses(output, unrolled, producer=True)
        steps = _time_major(graph, unrolled, timesteps, output.name)
        steps.shape = None if output.shape is None else [timesteps, *output.shape]
        final = gs.Variable(output.name, dtype=output.dtype, shape=output.shape)
        graph.nodes.append(gs.Node("Gather", f"time/{output.name}/last",
                                   attrs={"axis": 0},
                                   inputs=[steps, gs.Constant(f"{output.name}.last_step", np.array(timesteps - 1, np.int64))],
                                   outputs=[final]))
        final_outputs.append(final)
        step_outputs.append(steps)
    graph.outputs = final_outputs + step_outputs
    if semantics == SUM:
        masks: dict[tuple[str, int], gs.Variable] = {}

        def first_step(rank: int, like: gs.Tensor) -> gs.Variable:
            """[rows, 1, ..] bool over ``like``'s rows: true on the first step's (the first rows/T)."""
            if (like.name, rank) in masks:
                return masks[like.name, rank]
            prefix = f"{like.name}.first_step{rank}"
            shape, count, per_step, index, first, mask = (gs.Variable(f"{prefix}.{s}", dtype=d) for s, d in (
                ("shape", np.int64), ("count", np.int64), ("per_step", np.int64), ("index", np.int64),
                ("first", bool), ("mask", bool)))
            graph.nodes += [
                gs.Node("Shape", f"{prefix}/shape", inputs=[like], outputs=[shape]),
                gs.Node("Gather", f"{prefix}/count", inputs=[shape, _const(f"{prefix}.axis0", 0)], outputs=[count]),
                gs.Node("Div", f"{prefix}/per_step", inputs=[count, _const(f"{prefix}.t", timesteps)],
                        outputs=[per_step]),
                gs.Node("Range", f"{prefix}/index", inputs=[_const(f"{prefix}.start", 0), count,
                                                           _const(f"{prefix}.step", 1)], outputs=[index]),
                gs.Node("Less", f"{prefix}/first", inputs=[index, per_step], outputs=[first]),
                gs.Node("Reshape", f"{prefix}/mask", inputs=[first, _const(f"{prefix}.mask_shape", [-1] + [1] * (rank - 1))],
                        outputs=[mask]),
            ]
            masks[like.name, rank] = mask
            return mask
        _lower_onsets(graph, first_step)
        spikes = SPIKES_OUTPUT + STEPS_SUFFIX
        _add_spike_counts(graph, [_const("spikec.timesteps", [timesteps]), _batch_size(graph)], spikes)
    graph.toposort()
    return graph


def _time_major(graph: gs.Graph, tensor: gs.Variable, timesteps: int, name: str) -> gs.Variable:
    """[T*B, ...] -> [T, B, ...] named ``<name>.steps``."""
    shape = gs.Variable(f"{name}.unrolled_shape", dtype=np.int64)
    rest = gs.Variable(f"{name}.row_shape", dtype=np.int64)
    target = gs.Variable(f"{name}.steps_shape", dtype=np.int64)
    steps = gs.Variable(f"{name}{STEPS_SUFFIX}", dtype=tensor.dtype)
    graph.nodes += [
        gs.Node("Shape", f"time/{name}/shape", inputs=[tensor], outputs=[shape]),
        gs.Node("Slice", f"time/{name}/rows", inputs=[shape, gs.Constant(f"{name}.one", np.array([1], np.int64)),
                                                    gs.Constant(f"{name}.end", np.array([2**62], np.int64))],
                outputs=[rest]),
        gs.Node("Concat", f"time/{name}/target", attrs={"axis": 0},
                inputs=[gs.Constant(f"{name}.time_major", np.array([timesteps, -1], np.int64)), rest],
                outputs=[target]),
        gs.Node("Reshape", f"time/{name}/steps", inputs=[tensor, target], outputs=[steps]),
    ]
    return steps


def state_rank(node: gs.Node) -> int:
    shape = node.inputs[0].shape
    if shape is None:
        raise ValueError(f"spikec node {node.name}: input rank unknown, cannot declare its state")
    return len(shape) + spec.op_for(node.op).state_rank_offset


def emit_stateful(graph: gs.Graph, semantics: str = MEAN) -> gs.Graph:
    _add_rate_readouts(graph, semantics)
    time = gs.Variable(TIME_INPUT, dtype=np.float32, shape=[])
    if semantics == SUM:
        is_first = gs.Variable("spikec.first_step", dtype=bool, shape=[])
        graph.nodes.append(gs.Node("Equal", "time/first_step", inputs=[time, _const("spikec.t1", 1.0, np.float32)],
                                   outputs=[is_first]))
        _lower_onsets(graph, lambda rank, like: is_first)
    state_inputs, state_outputs = [], []
    for node in [n for n in graph.nodes if n.domain == "spikec"]:
        op = spec.op_for(node.op)
        rank = state_rank(node)
        data, params = node.inputs[:len(op.inputs)], node.inputs[len(op.inputs):]
        states = [gs.Variable(f"{STATE_PREFIX}{node.name}.{s}", dtype=np.float32, shape=[None] * rank)
                  for s in op.states]
        next_states = [gs.Variable(f"{NEXT_STATE_PREFIX}{node.name}.{s}", dtype=np.float32,
                                   shape=[None] * rank) for s in op.states]
        node.op = op.step_name
        node.inputs.clear()
        node.inputs.extend([*data, *states, *params, time])
        node.outputs += next_states
        state_inputs += states
        state_outputs += next_states
    if semantics == SUM:  # the count output comes after the next states
        _add_spike_counts(graph, [_batch_size(graph)], SPIKES_OUTPUT)
    graph.inputs = list(graph.inputs) + [time] + state_inputs
    graph.outputs = list(graph.outputs) + state_outputs
    graph.toposort()
    return graph


def to_model(graph: gs.Graph, template: onnx.ModelProto, metadata: dict[str, str],
             data: weights.DataFile | None = None) -> onnx.ModelProto:
    """Export with the spikec function bodies, the template's opsets and the given metadata. With ``data``,
    the weights are written there first, one by one (spikec.weights.externalize), and the model references
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
