"""One-node models of a spikec op, in the op's own signature (shared by the op and native-kernel tests)."""
import numpy as np
import onnx
from onnx import TensorProto, helper

from spikec.runtime import ops


def one_node_model(op_type: str, params: dict[str, np.ndarray], channels: int, **attrs) -> onnx.ModelProto:
    """Inputs [rows, channels], states (Step form, any 2-D shape so a single zero can start them), the
    params as initializers, and t (Step form)."""
    op = ops.op_for(op_type)
    step = op_type.endswith("Step")
    states = list(op.states) if step else []
    inputs = [*op.inputs, *states, *params, *(["t"] if step else [])]
    outputs = [*op.outputs, *(out for _, out in op.state_names())] if step else list(op.outputs)
    node = helper.make_node(op_type, inputs, outputs, domain=ops.DOMAIN, **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, channels]) for n in op.inputs]
    graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in states]
    graph_inputs += [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])] if step else []
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, channels]) for o in outputs],
                              [onnx.numpy_helper.from_array(v, k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                             functions=ops.functions_for({op_type}, 17))


# Attribute values the op tests use: MT neurons with 4 levels, compensation in sum semantics (the
# mean-semantics path is what the ECMT model tests exercise).
EXAMPLE_ATTRIBUTES = {"levels": 4, "average": 0, "signed": 1, "burst": 2}


def example_attributes(op: ops.SpikingOp) -> dict[str, int]:
    return {a: EXAMPLE_ATTRIBUTES[a] for a in op.attributes}


def example_params(op: ops.SpikingOp, rng: np.random.Generator, channels: int, per_channel: bool) -> dict[str, np.ndarray]:
    """Valid parameters of ``op``: positive thresholds, integer tracer bounds around zero."""
    shape = (channels,) if per_channel else ()
    values = {}
    for name in op.params:
        if name == "s_min":
            values[name] = -rng.integers(0, 6, shape).astype(np.float32)
        elif name == "s_max":
            values[name] = rng.integers(1, 6, shape).astype(np.float32)
        else:
            values[name] = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    return values
