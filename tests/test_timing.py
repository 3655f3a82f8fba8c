"""passes/timing.py's graph-level steps on their own."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from spikec.passes.builder import spikec_attributes
from spikec.passes.timing import (
    hoist_accumulations,
    sink_compensations,
    unconvertible_nodes,
    varying_tensors,
)
from spikec.runtime import InferenceSession, ops

import spikec
from spikec.errors import SpikecError
from spikec.evaluate import cosine, run_dataset

T, B = 3, 2


def spikec_node(op: str, name: str, inputs: list, outputs: list, **attrs) -> gs.Node:
    return gs.Node(op, name, attrs=spikec_attributes(op, attrs), inputs=inputs, outputs=outputs, domain="spikec")


def _accumulated(perm: list[int], extra_reader: bool = False) -> gs.Graph:
    """x [T*B, 4, 6] -> Reshape [T*B, 4, 2, 3] -> Transpose(perm) -> ECAccumulate (-> y), optionally
    with the transposed tensor read by a second node too."""
    x = gs.Variable("x", np.float32, [T * B, 4, 6])
    heads, moved, y = (gs.Variable(n, np.float32) for n in ("heads", "moved", "y"))
    nodes = [
        gs.Node(
            "Reshape", "split", inputs=[x, gs.Constant("shape", np.array([T * B, 4, 2, 3], np.int64))], outputs=[heads]
        ),
        gs.Node("Transpose", "heads_first", attrs={"perm": perm}, inputs=[heads], outputs=[moved]),
        spikec_node("ECAccumulate", "acc", [moved], [y], average=1, timesteps=T),
    ]
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


@pytest.mark.parametrize(
    "perm, extra_reader",
    [([1, 0, 2, 3], False), ([0, 2, 1, 3], True)],
    ids=["transpose_moves_the_steps", "moved_tensor_read_elsewhere"],
)
def test_accumulation_stays_where_moving_it_would_change_something(perm, extra_reader):
    graph = _accumulated(perm, extra_reader)
    assert hoist_accumulations(graph) == 0
    assert next(n for n in graph.nodes if n.op == "ECAccumulate").inputs[0].name == "moved"


def test_compensation_moves_below_data_movement_with_the_same_bits():
    """x -> ECCompensate -> Transpose -> Reshape -> y becomes x -> Transpose -> Reshape -> ECCompensate."""

    def graph() -> gs.Graph:
        x = gs.Variable("x", np.float32, [T * B, 2, 4, 3])
        increments, moved, y = (gs.Variable(n, np.float32) for n in ("increments", "moved", "y"))
        return gs.Graph(
            nodes=[
                spikec_node("ECCompensate", "comp", [x], [increments], average=1, timesteps=T),
                gs.Node("Transpose", "heads_back", attrs={"perm": [0, 2, 1, 3]}, inputs=[increments], outputs=[moved]),
                gs.Node(
                    "Reshape",
                    "merge",
                    inputs=[moved, gs.Constant("shape", np.array([T * B, 4, 6], np.int64))],
                    outputs=[y],
                ),
            ],
            inputs=[x],
            outputs=[y],
            opset=17,
        )

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


# ----------------------------------------------------------------------------- convertibility, --allow-float


def _guarded_attention() -> onnx.ModelProto:
    """x [b, 4, 8] -> q = x W; p = Softmax(q q^T + where(keep, 0, -inf)) behind sdpa's guard
    Where(IsNaN(p), 0, p); y = p q."""
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 3, "W")
    zero = onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")
    low = onnx.numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")
    nodes = [
        helper.make_node("Where", ["keep", "zero", "minus_inf"], ["mask"], name="mask_values"),
        helper.make_node("MatMul", ["x", "W"], ["q"], name="query"),
        helper.make_node("Transpose", ["q"], ["k"], name="keys", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"], name="guard_test"),
        helper.make_node("Where", ["nan", "zero", "p"], ["probs"], name="guard"),
        helper.make_node("MatMul", ["probs", "q"], ["y"], name="values"),
    ]
    graph = helper.make_graph(
        nodes,
        "guarded",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4, 8]),
            helper.make_tensor_value_info("keep", onnx.TensorProto.BOOL, ["b", 1, 4]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4, 8])],
        [weight, zero, low],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _attention_feeds(samples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = np.ones((samples, 1, 4), np.bool_)
    keep[1::3, :, 3:] = False  # padded
    keep[2::3] = False  # fully masked: NaN, which the guard turns into 0
    return {"x": rng.standard_normal((samples, 4, 8)).astype(np.float32), "keep": keep}


def test_a_region_is_judged_as_it_is_converted():
    """The IsNaN of sdpa's guard cannot take per-step values on its own, but inside the softmax region it
    is part of a function compensation evaluates on running means; only non-float outputs leaving a
    region cannot be averaged."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(_guarded_attention()))
    graph.toposort()
    nodes = {n.name: n for n in graph.nodes}
    softmax = [nodes[n] for n in ("mask", "softmax", "guard_test", "guard")]
    varying = varying_tensors(graph, ["q"])
    assert unconvertible_nodes([("softmax", "softmax", softmax)], varying, set()) == []
    alone = [(n.name, "node", [n]) for n in softmax]
    assert unconvertible_nodes(alone, varying, set()) == [nodes["guard_test"]]
    assert unconvertible_nodes(alone, varying, {"IsNaN"}) == []
    leaking = [("test", "softmax", [nodes["softmax"], nodes["guard_test"]])]  # its bool output leaves it
    assert unconvertible_nodes(leaking, varying, set()) == [nodes["guard_test"]]


@pytest.mark.parametrize("method", ["ecmt", "sta", "spikezip"])
def test_sdpa_guard_converts_and_allow_float_cannot_split_a_region(method):
    calib, feeds = _attention_feeds(30, 1), _attention_feeds(6, 2)
    model = _guarded_attention()
    source = spikec.quantize(model, calib, progress=False) if method == "spikezip" else model
    snn = spikec.compile(source, calib, method=method, timesteps=64, progress=False)
    want = run_dataset(InferenceSession(source) if method == "spikezip" else source, feeds)["y"]
    got = run_dataset(snn, feeds)["y"]
    assert np.all(want[2::3] == 0) and np.all(got[2::3] == 0)  # the guard's zeros, exactly
    if method == "spikezip":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    else:
        attended = np.arange(len(want)) % 3 != 2
        assert cosine(want[attended], got[attended]) > 0.99
    for entry in ("IsNaN", "guard_test", "Softmax"):
        with pytest.raises(SpikecError) as error:
            spikec.compile(source, calib, method=method, timesteps=8, allow_float=(entry,), progress=False)
        message = str(error.value)
        assert "\n" not in message and f"'{entry}'" in message and "softmax region softmax" in message
