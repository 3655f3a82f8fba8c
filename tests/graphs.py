"""Small hand-built models the tests share: each builds in microseconds and converts with every method."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

FEATURES, HIDDEN = 16, 64


def mlp(
    *,
    dropout_training: bool = False,
    batch: int | str = "batch",
    dtype: int = TensorProto.FLOAT,
    passthrough: bool = False,
    scale2: float = 0.3,
) -> onnx.ModelProto:
    """x [batch, 16] -> MatMul -> Add -> Relu [-> Dropout] -> MatMul -> y [batch, 16] (fixed weights)."""
    rng = np.random.default_rng(5)
    numpy_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(numpy_type), name)
        for name, shape, scale in (
            ("w1", (FEATURES, HIDDEN), 0.3),
            ("b1", (HIDDEN,), 0.1),
            ("w2", (HIDDEN, FEATURES), scale2),
        )
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
    ]
    hidden = "h"
    if dropout_training:
        nodes.append(helper.make_node("Dropout", ["h", "ratio", "training"], ["hd"], name="drop"))
        inits += [
            onnx.numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
            onnx.numpy_helper.from_array(np.array(True), "training"),
        ]
        hidden = "hd"
    nodes.append(helper.make_node("MatMul", [hidden, "w2"], ["y"], name="fc2"))
    outputs = [helper.make_tensor_value_info("y", dtype, [batch, FEATURES])]
    if passthrough:
        outputs.append(helper.make_tensor_value_info("x", dtype, [batch, FEATURES]))
    graph = helper.make_graph(
        nodes, "main_graph", [helper.make_tensor_value_info("x", dtype, [batch, FEATURES])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def silu_mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [b, K] -> MatMul w1 -> SiLU (x * Sigmoid(x), as exporters write it) -> MatMul w2 -> y [b, N]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Mul", ["h", "s"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "silu_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w2.shape[1]])],
        [onnx.numpy_helper.from_array(w.astype(np.float32), n) for w, n in ((w1, "w1"), (w2, "w2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reshaped_gemm_mlp(w1: np.ndarray, w2: np.ndarray, tokens: int = 4) -> onnx.ModelProto:
    """x [b, tokens, K] -> Gemm w1 + b1 on its rows -> Relu on [b, tokens, H] -> Gemm w2 on its rows -> y [b*tokens,
    N], as GPT-2's exports run Conv1D (2-D Gemms with Reshapes around them)."""
    hidden = w1.shape[1]
    nodes = [
        helper.make_node("Reshape", ["x", "rows_in"], ["x_rows"]),
        helper.make_node("Gemm", ["x_rows", "w1", "b1"], ["h_rows"]),
        helper.make_node("Reshape", ["h_rows", "tokens_hidden"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Reshape", ["a", "rows_hidden"], ["a_rows"]),
        helper.make_node("Gemm", ["a_rows", "w2"], ["y"]),
    ]
    constants = {
        "w1": w1.astype(np.float32),
        "b1": np.linspace(-0.2, 0.2, hidden).astype(np.float32),
        "w2": w2.astype(np.float32),
        "rows_in": np.array([-1, w1.shape[0]], np.int64),
        "tokens_hidden": np.array([-1, tokens, hidden], np.int64),
        "rows_hidden": np.array([-1, hidden], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "reshaped_gemm_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", tokens, w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", w2.shape[1]])],
        [onnx.numpy_helper.from_array(v, n) for n, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def attention_block(rng: np.random.Generator, *, projection_bias: bool, qkv_bias: bool = False) -> onnx.ModelProto:
    """x [batch, 5, 8] -> LayerNorm -> q, k, v [+ biases] -> softmax(q k^T / 2) v -> projection [+ bias] -> + x."""

    def init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    projected = "pb" if projection_bias else "proj"
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        *[helper.make_node("MatMul", ["h", f"w{n}"], [f"{n}w" if qkv_bias else n]) for n in "qkv"],
        *[helper.make_node("Add", [f"{n}w", f"b{n}"], [n]) for n in ("qkv" if qkv_bias else "")],
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "half"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["proj"]),
        *([helper.make_node("Add", ["proj", "bo"], ["pb"])] if projection_bias else []),
        helper.make_node("Add", [projected, "x"], ["y"]),
    ]
    inits = [
        init("gamma", 8, scale=1.0),
        init("beta", 8),
        *[init(f"w{n}", 8, 8) for n in "qkvo"],
        *([init("bo", 8)] if projection_bias else []),
        *[init(f"b{n}", 8) for n in ("qkv" if qkv_bias else "")],
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def torch_export(
    module, example: Mapping[str, np.ndarray], path, dynamic_axes: Mapping[str, dict], opset: int = 17
) -> str:
    """``module`` (a torch module, evaluated with ``example``'s arrays in order) exported by the TorchScript
    exporter with those inputs' names and one output ``y``, its tracer warnings silenced; returns the path."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            tuple(torch.from_numpy(a) for a in example.values()),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(example),
            output_names=["y"],
            dynamic_axes=dict(dynamic_axes),
        )
    return str(path)
