"""passes/timing.py's graph-level steps on their own."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from spikec.passes.timing import hoist_accumulations, sink_compensations, spikec_node
from spikec.runtime import InferenceSession, ops

T, B = 3, 2


def _accumulated(perm: list[int], extra_reader: bool = False) -> gs.Graph:
    """x [T*B, 4, 6] -> Reshape [T*B, 4, 2, 3] -> Transpose(perm) -> ECAccumulate (-> y), optionally
    with the transposed tensor read by a second node too."""
    x = gs.Variable("x", np.float32, [T * B, 4, 6])
    heads, moved, y = (gs.Variable(n, np.float32) for n in ("heads", "moved", "y"))
    nodes = [gs.Node("Reshape", "split", inputs=[x, gs.Constant("shape", np.array([T * B, 4, 2, 3], np.int64))],
                     outputs=[heads]),
             gs.Node("Transpose", "heads_first", attrs={"perm": perm}, inputs=[heads], outputs=[moved]),
             spikec_node("ECAccumulate", "acc", [moved], [y], average=1, timesteps=T)]
    outputs = [y]
    if extra_reader:
        doubled = gs.Variable("doubled", np.float32)
        nodes.append(gs.Node("Add", "double", inputs=[moved, moved], outputs=[doubled]))
        outputs.append(doubled)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17)


def _run(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION))
    model.functions.extend(ops.functions_for({"ECAccumulate"}, 17))
    return InferenceSession(model, native=False).run(["y"], {"x": x})[0]


def test_accumulation_moves_above_data_movement_with_the_same_bits():
    x = np.random.default_rng(0).standard_normal((T * B, 4, 6)).astype(np.float32)
    want = _run(_accumulated([0, 2, 1, 3]), x)
    graph = _accumulated([0, 2, 1, 3])
    assert hoist_accumulations(graph) == 2
    accumulate = next(n for n in graph.nodes if n.op == "ECAccumulate")
    assert accumulate.inputs[0].name == "x"  # now right where its input is computed
    got = _run(graph, x)
    assert got.shape == (T * B, 2, 4, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("perm, extra_reader", [([1, 0, 2, 3], False), ([0, 2, 1, 3], True)],
                         ids=["transpose_moves_the_steps", "moved_tensor_read_elsewhere"])
def test_accumulation_stays_where_moving_it_would_change_something(perm, extra_reader):
    graph = _accumulated(perm, extra_reader)
    assert hoist_accumulations(graph) == 0
    assert next(n for n in graph.nodes if n.op == "ECAccumulate").inputs[0].name == "moved"


def test_compensation_moves_below_data_movement_with_the_same_bits():
    """x -> ECCompensate -> Transpose -> Reshape -> y becomes x -> Transpose -> Reshape -> ECCompensate."""
    def graph() -> gs.Graph:
        x = gs.Variable("x", np.float32, [T * B, 2, 4, 3])
        increments, moved, y = (gs.Variable(n, np.float32) for n in ("increments", "moved", "y"))
        return gs.Graph(nodes=[
            spikec_node("ECCompensate", "comp", [x], [increments], average=1, timesteps=T),
            gs.Node("Transpose", "heads_back", attrs={"perm": [0, 2, 1, 3]}, inputs=[increments], outputs=[moved]),
            gs.Node("Reshape", "merge", inputs=[moved, gs.Constant("shape", np.array([T * B, 4, 6], np.int64))],
                    outputs=[y])], inputs=[x], outputs=[y], opset=17)

    values = np.random.default_rng(1).standard_normal((T * B, 2, 4, 3)).astype(np.float32)
    want = _run_compensated(graph(), values)
    sunk = graph()
    assert sink_compensations(sunk) == 2
    assert next(n for n in sunk.nodes if n.op == "ECCompensate").outputs[0].name == "y"
    np.testing.assert_array_equal(_run_compensated(sunk, values), want)


def _run_compensated(graph: gs.Graph, x: np.ndarray) -> np.ndarray:
    graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION))
    model.functions.extend(ops.functions_for({"ECCompensate"}, 17))
    return InferenceSession(model, native=False).run(["y"], {"x": x})[0]
