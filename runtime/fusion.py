"""Chains of spikec ops fused into one op each, in a session's copy of a model.

A compensated function's increments feed a neuron (ECCompensate -> neuron), and a neuron's spike value
is accumulated for the compensated function or product it feeds (MTNeuron -> Mul(theta_pos) ->
ECAccumulate, STBIFNeuron -> Mul(theta) -> ECAccumulate; a neuron's spike count comes out of the fused op).
Each pair streams its whole [T*B, ...] tensor out and back in; runtime/ops.py ``compose`` defines the
pair as one op with the same float operations in the same order (the same bits), which the native
kernels implement in one pass. Saved models keep the separate ops: reports and graph views read the
tensors between them, and a chain whose middle tensor is a graph output is left alone.

Products of a ternary neuron's spike codes with a weight matrix become SpikeMatMul nodes
(``spike_matmuls``): the same MatMul as a function, while the native kernel's cost follows the firing
rate (SpikeZIP-TF's codes are mostly zeros).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from spikec.runtime import ops


def _split(node: onnx.NodeProto, op: ops.SpikingOp) -> tuple[list[str], list[str], list[str], list[str]]:
    """(data, states, params, time) inputs of a spikec node in either form."""
    inputs = list(node.input)
    data, rest = inputs[: len(op.inputs)], inputs[len(op.inputs) :]
    if not node.op_type.endswith("Step"):
        return data, [], rest, []
    states, rest = rest[: len(op.states)], rest[len(op.states) :]
    return data, states, rest[: len(op.params)], rest[len(op.params) :]


def _split_outputs(node: onnx.NodeProto, op: ops.SpikingOp) -> tuple[list[str], list[str], list[str]]:
    """(outputs, next states, count if the node has it) of a spikec node in either form."""
    outputs = list(node.output)
    known = len(op.outputs) + (len(op.states) if node.op_type.endswith("Step") else 0)
    return outputs[: len(op.outputs)], outputs[len(op.outputs) : known], outputs[known:]


def _spikec_op(node: onnx.NodeProto) -> ops.SpikingOp | None:
    if node.domain != ops.DOMAIN:
        return None
    return ops.OPS.get(ops.base_name(node.op_type))


def fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every chain of ``ops.COMPOSITES`` fused, or ``model`` itself if none."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    # The fused node takes the first node's place: everything it reads (the first's input, states,
    # parameters, t) exists there, and everything that read the chain's tensors comes later.
    replaced: dict[int, onnx.NodeProto] = {}  # id(first node) -> fused node
    removed: set[int] = set()
    rewired: dict[str, str] = {}  # a Shape's input: the chain's middle tensor -> its output (same shape)

    def only_read_by(name: str, node: onnx.NodeProto, shapes_ok: bool) -> bool:
        others = [r for r in readers.get(name, []) if r is not node]
        return name not in outputs and all(shapes_ok and r.op_type == "Shape" for r in others)

    for composite in ops.COMPOSITES:
        first_name, second_name = composite.chain
        for second in graph.node:
            op2 = _spikec_op(second)
            if op2 is None or op2.name != second_name or id(second) in removed or id(second) in replaced:
                continue
            middle = second.input[0]
            scale = producer.get(middle) if composite.chain_scale else None
            if composite.chain_scale:
                if scale is None or scale.op_type != "Mul" or not only_read_by(middle, second, False):
                    continue
                middle = scale.input[0]
            first = producer.get(middle)
            if first is None:
                continue
            op1 = _spikec_op(first)
            if (
                op1 is None
                or op1.name != first_name
                or id(first) in removed
                or id(first) in replaced
                or first.op_type.endswith("Step") != second.op_type.endswith("Step")
                or not only_read_by(middle, scale or second, shapes_ok=scale is None)
            ):
                continue
            data1, states1, params1, time1 = _split(first, op1)
            data2, states2, params2, _ = _split(second, op2)
            (_, next1, count1), (outputs2, next2, count2) = _split_outputs(first, op1), _split_outputs(second, op2)
            # a function's node names all its outputs: "" for a count no one asked for
            count = (count1 or count2 or [""]) if composite.spike_count else []
            if scale is not None and list(scale.input[1:]) != [params1[op1.params.index(composite.chain_scale)]]:
                continue
            attributes = {a.name: a for a in first.attribute}
            if any(a.name in attributes and a != attributes[a.name] for a in second.attribute):
                continue  # e.g. different timesteps
            attributes.update({a.name: a for a in second.attribute})
            step = first.op_type.endswith("Step")
            fused = onnx.helper.make_node(
                composite.step_name if step else composite.name,
                [*data1, *states1, *states2, *params1, *params2, *time1],
                [*outputs2, *next1, *next2, *count],
                name=second.name,
                domain=ops.DOMAIN,
            )
            fused.attribute.extend(attributes.values())
            replaced[id(first)] = fused
            removed.add(id(second))
            if scale is not None:
                removed.add(id(scale))
            else:
                rewired[first.output[0]] = second.output[0]
    if not replaced:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    for node in graph.node:
        if id(node) in removed:
            continue
        result.graph.node.append(replaced.get(id(node), node))  # appending copies
    for node in result.graph.node:
        if node.op_type == "Shape" and node.input[0] in rewired:
            node.input[0] = rewired[node.input[0]]
    needed = {n.op_type for n in replaced.values()} - {f.name for f in model.functions}
    result.functions.extend(ops.functions_for(needed, ops.default_opset(model)))
    return fuse(result)  # composites chain further (ECCompensate_MTNeuron -> Mul -> ECAccumulate)


def spike_matmuls(model: onnx.ModelProto, pays: Callable[[int, int], bool]) -> onnx.ModelProto:
    """A copy of ``model`` whose MatMuls of ternary spike codes (``SpikingOp.ternary``) with a 2-D float
    initializer W [K, N] for which ``pays(K, N)`` are SpikeMatMul nodes, or ``model`` itself if it has none."""
    graph = model.graph
    weights = {
        t.name: list(t.dims) for t in graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
    }
    ternary = set()
    for node in graph.node:
        op = _spikec_op(node)
        if op is not None and op.ternary:
            ternary.add(node.output[0])
    chosen = [
        i
        for i, n in enumerate(graph.node)
        if n.op_type == "MatMul"
        and n.domain in ("", "ai.onnx")
        and n.input[0] in ternary
        and n.input[1] in weights
        and pays(*weights[n.input[1]])
    ]
    if not chosen:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for i in chosen:
        node = result.graph.node[i]
        node.op_type, node.domain = ops.SPIKE_MATMUL, ops.DOMAIN
    if ops.SPIKE_MATMUL not in {f.name for f in model.functions}:
        result.functions.extend(ops.functions_for({ops.SPIKE_MATMUL}, ops.default_opset(model)))
    return result
