"""Time semantics of a spiking graph: which tensors vary over time steps, and expectation compensation.

Rate-coded methods (ECMT) use *mean semantics*: the input is presented at every step, biases are
added at every step, and a tensor's value is its running mean over steps. A tensor varies over
time only downstream of a neuron; everything computed from inputs and constants alone (embeddings,
masks and their huge negative constants, shapes) is identical at every step and stays as is.

An op whose outputs are affine in its time-varying inputs commutes with the running mean and runs
unchanged on the per-step values. Any other op F gets expectation compensation (ECMT Eq. 15):
ECAccumulate turns each varying input into its running mean, F runs in float on those means, and
ECCompensate turns F's outputs back into per-step increments t*Y(t) - (t-1)*Y(t-1).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from spikec.errors import SpikecError

# Ops whose outputs are linear functions of each input, or pure data movement.
_LINEAR_IN_EVERY_INPUT = {
    "Add", "Sub", "Neg", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Concat", "Split", "Slice", "Gather", "GatherElements", "Expand", "Tile", "ReduceSum", "ReduceMean",
    "Pad", "Dropout", "SpaceToDepth", "DepthToSpace",
}
# Bilinear ops: affine as long as at most one operand varies over time.
_BILINEAR = {"Mul", "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
# Ops whose output depends on the input's shape or type only.
_SHAPE_ONLY = {"Shape", "Size", "EyeLike", "ConstantOfShape"}
# Ops that cannot be evaluated on running means: their outputs are not float or they hold control flow.
_UNCONVERTIBLE = {"If", "Loop", "Scan", "ArgMax", "ArgMin", "TopK", "NonZero", "Unique", "Equal", "Greater",
                  "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf",
                  "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                  "Bernoulli", "NonMaxSuppression", "StringNormalizer"}


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def varying_tensors(graph: gs.Graph, sources: Iterable[str]) -> set[str]:
    """Names of all tensors downstream of ``sources`` (neuron outputs), shape-only ops excepted."""
    varying = set(sources)
    for node in graph.nodes:  # graph is topologically sorted
        if node.op in _SHAPE_ONLY:
            continue
        if any(t.name in varying for t in node.inputs if not is_constant(t) and t.name):
            varying.update(t.name for t in node.outputs)
    return varying


def _varying_inputs(node: gs.Node, varying: set[str]) -> list[int]:
    return [i for i, t in enumerate(node.inputs) if t.name in varying and not is_constant(t)]


def is_affine(node: gs.Node, varying: set[str]) -> bool:
    """Whether ``node``'s outputs are affine in its time-varying inputs (so it commutes with the mean)."""
    moving = _varying_inputs(node, varying)
    if not moving or node.op in _SHAPE_ONLY:
        return True
    if node.op in _LINEAR_IN_EVERY_INPUT:
        # Gather/Slice/Pad/Expand/Tile/Reshape index operands must not vary: only the data may.
        return node.op in {"Add", "Sub", "Concat"} or moving == [0]
    if node.op == "Div":
        return moving == [0]
    if node.op == "Where":
        return 0 not in moving
    if node.op == "Cast":
        return node.attrs.get("to") in (1, 10, 11, 16)  # float types only
    if node.op in _BILINEAR:
        operand_count = 2 if node.op != "Einsum" else len(node.inputs)
        return len([i for i in moving if i < operand_count]) <= 1
    return False


def unconvertible_nodes(graph: gs.Graph, varying: set[str], allow_float: set[str]) -> list[gs.Node]:
    """Nodes with time-varying inputs that no expectation can be computed for, unless kept in float."""
    return [n for n in graph.nodes
            if n.op in _UNCONVERTIBLE and _varying_inputs(n, varying)
            and n.op not in allow_float and n.name not in allow_float]


def require_convertible(graph: gs.Graph, varying: set[str], allow_float: set[str]) -> None:
    bad = unconvertible_nodes(graph, varying, allow_float)
    if bad:
        listing = ", ".join(f"{n.name} ({n.op})" for n in bad)
        raise SpikecError(
            f"cannot convert {len(bad)} node(s) whose inputs vary over time: {listing}; "
            f"keep them in floating point with --allow-float {','.join(sorted({n.op for n in bad}))}")


def spikec_node(op: str, name: str, inputs: list, outputs: list, **attrs) -> gs.Node:
    return gs.Node(op=op, name=name, attrs=attrs, inputs=inputs, outputs=outputs, domain="spikec")


def replace_uses(tensor: gs.Tensor, replacement: gs.Tensor, *, producer: bool = False) -> None:
    """Make every consumer of ``tensor`` (and with ``producer``, the node producing it) use
    ``replacement`` instead. graphsurgeon's synchronized lists only support item assignment."""
    for node in list(tensor.outputs):
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = replacement
    if producer:
        for node in list(tensor.inputs):
            for i, t in enumerate(node.outputs):
                if t is tensor:
                    node.outputs[i] = replacement


def fresh_like(tensor: gs.Variable, suffix: str) -> gs.Variable:
    return gs.Variable(f"{tensor.name}{suffix}", dtype=tensor.dtype or np.float32, shape=tensor.shape)


def compensate_region(graph: gs.Graph, nodes: list[gs.Node], varying: set[str], name: str) -> dict:
    """Wrap ``nodes`` (a region evaluating one function F) in expectation compensation.

    Returns a description of what was inserted, for reports."""
    inside = {id(n) for n in nodes}
    produced = {t.name for n in nodes for t in n.outputs}
    entering: dict[str, gs.Variable] = {}
    for node in nodes:
        for i, tensor in enumerate(node.inputs):
            if is_constant(tensor) or tensor.name not in varying or tensor.name in produced:
                continue
            if tensor.name not in entering:
                # A tensor may enter several regions: each gets its own running mean, named after it.
                mean = fresh_like(tensor, f".ec_mean.{name}")
                graph.nodes.append(spikec_node("ECAccumulate", f"{name}/ECAccumulate{len(entering)}",
                                               [tensor], [mean]))
                entering[tensor.name] = mean
            node.inputs[i] = entering[tensor.name]
    graph_outputs = {t.name for t in graph.outputs}
    leaving = []
    for node in nodes:
        for tensor in node.outputs:
            outside = [c for c in tensor.outputs if id(c) not in inside]
            if not outside and tensor.name not in graph_outputs:
                continue
            increment = fresh_like(tensor, ".expectation")
            for consumer in outside:
                for i, t in enumerate(consumer.inputs):
                    if t is tensor:
                        consumer.inputs[i] = increment
            graph.outputs = [increment if t is tensor else t for t in graph.outputs]
            graph.nodes.append(spikec_node("ECCompensate", f"{name}/ECCompensate{len(leaving)}",
                                           [tensor], [increment]))
            # Downstream sees the compensated increments under the original name (graph outputs keep
            # theirs); F's output on the running means is the expectation.
            tensor.name, increment.name = increment.name, tensor.name
            leaving.append(increment.name)
    return {"inputs": sorted(entering), "outputs": leaving}
