"""One-node models of a spikec op, in the op's own signature (shared by the op and native-kernel tests)."""

import numpy as np
import onnx
from onnx import TensorProto, helper
from spikec.runtime import ops


def one_node_model(op_type: str, params: dict[str, np.ndarray], channels: int, **attrs) -> onnx.ModelProto:
    """Inputs [rows, channels], states (Step form, of any shape of their rank, 2 or 3 with a hidden axis,
    so that a single zero can start them), the params as initializers, and t (Step form)."""
    op = ops.op_for(op_type)
    step = op_type.endswith("Step")
    states = list(op.states) if step else []
    inputs = [*op.inputs, *states, *params, *(["t"] if step else [])]
    outputs = ops.result_names(op, step)
    node = helper.make_node(op_type, inputs, outputs, domain=ops.DOMAIN, **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, channels]) for n in op.inputs]
    state_shape = [None] * (2 + op.state_rank_offset)
    graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in states]
    graph_inputs += [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])] if step else []
    output_shapes = [[None, channels]] * len(op.outputs) + [state_shape] * len(states) + [[None]] * op.spike_count
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in zip(outputs, output_shapes)],
        [onnx.numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=ops.functions_for({op_type}, 17),
    )


# Attribute values the op tests use: MT neurons with 4 levels, compensation in sum semantics (the
# mean-semantics path is what the ECMT model tests exercise).
EXAMPLE_ATTRIBUTES = {"levels": 4, "average": 0, "signed": 1, "burst": 2, "half_even": 1}


def example_attributes(op: ops.SpikingOp) -> dict[str, int]:
    return {a: EXAMPLE_ATTRIBUTES[a] for a in op.attributes}


# Hidden units of the ops with a hidden axis (UGO): neither a power of two nor the channel count.
HIDDEN = 5


def initial_states(op: ops.SpikingOp) -> dict[str, np.ndarray]:
    """The t=1 states of a Step form: single zeros of the states' rank."""
    return {s: np.zeros([1] * (2 + op.state_rank_offset), np.float32) for s in op.states}


def example_params(
    op: ops.SpikingOp, rng: np.random.Generator, channels: int, per_channel: bool
) -> dict[str, np.ndarray]:
    """Valid parameters of ``op``: positive thresholds, integer tracer bounds around zero, weights and
    biases of both signs."""
    values = {}
    for name in op.params:
        shape = (HIDDEN,) if name in op.hidden else (channels,) if per_channel else ()
        if name in ("w1", "b1", "w2", "b2"):
            values[name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        elif name == "s_min":
            values[name] = -rng.integers(0, 6, shape).astype(np.float32)
        elif name == "s_max":
            values[name] = rng.integers(1, 6, shape).astype(np.float32)
        else:
            values[name] = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    return values
