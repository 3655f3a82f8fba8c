"""The frontend (loader, canonicalize, patterns) on real torch.onnx exports of both exporters.

Every pattern test exports a small torch module with the TorchScript exporter (dynamo=False) and
with the dynamo exporter, canonicalizes it, and checks the recognized regions exactly. The dynamo
exporter emits opset 18 at the least (it cannot down-convert LayerNormalization), so its
"pre-17" cases run at 18.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from spikec.passes.canonicalize import (
    canonicalize,
    fold_constants,
    name_nodes,
    relax_batch_shapes,
    squeeze_batch_constants,
)
from spikec.passes.loader import load_model
from spikec.passes.patterns import describe, find_regions
from spikec.runtime.session import set_default_log_severity
from torch import nn

from examples import fixtures
from spikec.errors import SpikecError

D = 16  # feature width of the toy modules


# ----------------------------------------------------------------------------- toy modules


class LayerNorm(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.ln = nn.LayerNorm(D, eps=1e-6, **kwargs)
        with torch.no_grad():  # non-trivial affine parameters, so the test sees them
            for p in self.ln.parameters():
                p.copy_(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return self.ln(x)


class HandWrittenLayerNorm(nn.Module):
    """BERT-era LayerNorm code; its 1e-12 eps is dropped by the dynamo exporter's optimizer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, D))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + 1e-12)) + self.bias


class Gelu(nn.Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.act = nn.GELU(approximate=approximate)

    def forward(self, x):
        return self.act(x)


class NewGelu(nn.Module):
    """GPT-2's gelu_new, written out as in transformers.activations.NewGELUActivation."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class HalfXGelu(nn.Module):
    """The erf GELU as some model code writes it: 0.5 * x first, Mul by 1/sqrt(2) inside."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))


class NotGelu(nn.Module):
    """GELU's shape with the wrong constant: must not be recognized."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / 1.5))


class MaskedSoftmax(nn.Module):
    """BERT eager attention scores: q @ k^T / sqrt(d) + (1 - mask) * finfo.min -> softmax -> @ v."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores + (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        return scores.softmax(-1) @ v


class CausalSoftmax(nn.Module):
    """A causal mask buffer (0 / -inf), which constant folding turns into a constant Add."""

    def __init__(self, seq=5, bias=None):
        super().__init__()
        causal = torch.full((seq, seq), float("-inf")).triu(1) if bias is None else bias
        self.register_buffer("bias", causal)

    def forward(self, q, k):
        return (q @ k.transpose(-1, -2) + self.bias).softmax(-1)


class FilledSoftmax(nn.Module):
    """DeBERTa's masked_fill(~mask, finfo.min) (``keep``: torch.where(mask, scores, finfo.min) instead),
    then a padding mask added on top of a causal fill (``chain``)."""

    def __init__(self, style="fill"):
        super().__init__()
        self.style = style

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        allowed = mask[:, None, None, :].bool()
        low = torch.finfo(torch.float32).min
        if self.style == "fill":
            scores = scores.masked_fill(~allowed, low)
        elif self.style == "keep":
            scores = torch.where(allowed, scores, low)
        else:
            causal = torch.ones(5, 5, dtype=torch.bool).tril()
            scores = torch.where(causal, scores, low) + torch.where(allowed, 0.0, low)
        return scores.softmax(-1) @ v


class Sdpa(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 8)

    def forward(self, x):
        return self.fc(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(x)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _attention_inputs(with_mask=True):
    q, k, v = _x(2, 4, 5, 8), _x(2, 4, 5, 8) * 0.5, _x(2, 4, 5, 8) * 2
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    return (q, k, v, mask) if with_mask else (q, k)


def _sdpa_inputs():
    q, k, v, mask = _attention_inputs()
    # A full [B, 1, S, S] mask: onnxruntime's Attention op rejects a [B, 1, 1, S] one.
    return q, k, v, mask.bool()[:, None, None, :].expand(2, 1, 5, 5)


CASES = {
    "layernorm": (LayerNorm, lambda: (_x(2, 5, D),)),
    "layernorm_noaffine": (lambda: LayerNorm(elementwise_affine=False), lambda: (_x(2, 5, D),)),
    "layernorm_handwritten": (HandWrittenLayerNorm, lambda: (_x(2, 5, D),)),
    "gelu": (Gelu, lambda: (_x(2, 5, D),)),
    "gelu_tanh": (lambda: Gelu("tanh"), lambda: (_x(2, 5, D),)),
    "newgelu": (NewGelu, lambda: (_x(2, 5, D),)),
    "halfx_gelu": (HalfXGelu, lambda: (_x(2, 5, D),)),
    "notgelu": (NotGelu, lambda: (_x(2, 5, D),)),
    "masked_softmax": (MaskedSoftmax, _attention_inputs),
    "causal_softmax": (CausalSoftmax, lambda: _attention_inputs(with_mask=False)),
    "biased_softmax": (lambda: CausalSoftmax(bias=_x(5, 5)), lambda: _attention_inputs(with_mask=False)),
    "filled_softmax": (FilledSoftmax, _attention_inputs),
    "kept_softmax": (lambda: FilledSoftmax("keep"), _attention_inputs),
    "chained_softmax": (lambda: FilledSoftmax("chain"), _attention_inputs),
    "sdpa": (Sdpa, _sdpa_inputs),
    "linear3d": (Linear, lambda: (_x(2, 5, D),)),
    "linear2d": (Linear, lambda: (_x(2, D),)),
    "residual": (Residual, lambda: (_x(2, 5, D),)),
}


# ----------------------------------------------------------------------------- export cache


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """export(case, exporter, opset) -> path of the cached .onnx file."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple, Path] = {}

    def _export(case: str, exporter: str, opset: int) -> Path:
        key = (case, exporter, opset)
        if key not in cache:
            make_module, make_inputs = CASES[case]
            module, args = make_module().eval(), make_inputs()
            path = root / f"{case}-{exporter}-{opset}.onnx"
            names = [f"in{i}" for i in range(len(args))]
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, args, str(path), dynamo=exporter == "dynamo", opset_version=opset, input_names=names
                )
            cache[key] = path
        return cache[key]

    return _export


def _regions(path: Path) -> tuple[gs.Graph, list]:
    """Canonicalize and find regions, checking the invariants every result must satisfy."""
    graph = gs.import_onnx(canonicalize(load_model(path)))
    regions = find_regions(graph)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    seen: set[int] = set()
    for region in regions:
        ids = [id(n) for n in region.nodes]
        assert ids == sorted(ids, key=order.__getitem__), f"{region.name}: nodes not in topological order"
        assert not seen & set(ids), f"{region.name}: node in two regions"
        seen |= set(ids)
        assert all(isinstance(t, gs.Variable) for t in region.inputs + region.outputs)
        assert region.outputs, region.name
    json.dumps(describe(regions))
    return graph, regions


def _kinds(regions) -> Counter:
    return Counter(r.kind for r in regions)


def _only(regions, kind):
    (region,) = [r for r in regions if r.kind == kind]
    return region


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(case: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    args = CASES[case][1]()
    names = [i.name for i in model.graph.input]
    return {n: a.numpy().astype(np.bool_ if a.dtype == torch.bool else np.float32) for n, a in zip(names, args)}


# ----------------------------------------------------------------------------- layer norm

DECOMPOSED_LN = ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]


def test_layernorm_decomposed_below_opset_17(export):
    graph, regions = _regions(export("layernorm", "torchscript", 14))
    assert _kinds(regions) == {"layernorm": 1}
    ln = regions[0]
    assert [n.op for n in ln.nodes] == DECOMPOSED_LN
    assert ln.attrs["form"] == "decomposed" and ln.attrs["axis"] == -1
    assert ln.attrs["epsilon"] == pytest.approx(1e-6, rel=1e-6)
    np.testing.assert_allclose(ln.attrs["scale"].values, np.linspace(0.5, 1.5, D), rtol=1e-6)
    np.testing.assert_allclose(ln.attrs["bias"].values, np.linspace(0.5, 1.5, D), rtol=1e-6)
    assert ln.inputs == graph.inputs and ln.outputs == graph.outputs


def test_layernorm_decomposed_without_affine(export):
    _, regions = _regions(export("layernorm_noaffine", "torchscript", 14))
    ln = _only(regions, "layernorm")
    assert [n.op for n in ln.nodes] == DECOMPOSED_LN[:-2]
    assert ln.attrs["scale"] is None and ln.attrs["bias"] is None


@pytest.mark.parametrize(
    ("exporter", "expected"), [("torchscript", DECOMPOSED_LN), ("dynamo", [*DECOMPOSED_LN[:4], *DECOMPOSED_LN[5:]])]
)
def test_layernorm_handwritten(export, exporter, expected):
    """TorchScript CSEs the repeated (x - u); dynamo also drops the Add of eps=1e-12."""
    _, regions = _regions(export("layernorm_handwritten", exporter, 14 if exporter == "torchscript" else 18))
    ln = _only(regions, "layernorm")
    assert [n.op for n in ln.nodes] == expected
    assert ln.attrs["epsilon"] == (pytest.approx(1e-12, rel=1e-6) if exporter == "torchscript" else 0.0)
    np.testing.assert_allclose(ln.attrs["bias"].values, np.linspace(-1.0, 1.0, D), rtol=1e-6)


def test_layernorm_decomposed_with_two_subs():
    """(x - u) computed twice, as an export without common-subexpression elimination writes it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])
    consts = [onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("two", 2.0), ("eps", 1e-5))]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["u"], axes=[-1]),
        helper.make_node("Sub", ["x", "u"], ["d1"]),
        helper.make_node("Sub", ["x", "u"], ["d2"]),
        helper.make_node("Pow", ["d1", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d2", "std"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "ln", [x], [y], consts), opset_imports=[helper.make_opsetid("", 14)]
    )
    regions = find_regions(gs.import_onnx(canonicalize(model)))
    assert [(r.kind, len(r.nodes)) for r in regions] == [("layernorm", 8)]
    assert regions[0].attrs["epsilon"] == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_layernorm_op(export, exporter, opset):
    _, regions = _regions(export("layernorm", exporter, opset))
    ln = _only(regions, "layernorm")
    assert [n.op for n in ln.nodes] == ["LayerNormalization"]
    assert ln.attrs["form"] == "op" and ln.attrs["axis"] == -1
    assert ln.attrs["epsilon"] == pytest.approx(1e-6, rel=1e-6)
    np.testing.assert_allclose(ln.attrs["scale"].values, np.linspace(0.5, 1.5, D), rtol=1e-6)


# ----------------------------------------------------------------------------- GELU

GELU_CASES = [
    # case, exporter, opset, form, approximate, op sequence observed in the export
    ("gelu", "torchscript", 17, "erf", "none", ["Div", "Erf", "Add", "Mul", "Mul"]),  # (x*(1+erf))*0.5
    ("gelu", "dynamo", 18, "erf", "none", ["Div", "Erf", "Add", "Mul", "Mul"]),  # x*(0.5*(1+erf))
    ("gelu_tanh", "torchscript", 17, "tanh", "tanh", ["Mul", "Mul", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]),
    ("gelu_tanh", "dynamo", 18, "tanh", "tanh", ["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]),
    ("newgelu", "torchscript", 17, "tanh", "tanh", ["Mul", "Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul"]),
    ("newgelu", "dynamo", 18, "tanh", "tanh", ["Mul", "Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul"]),
    ("halfx_gelu", "torchscript", 17, "erf", "none", ["Mul", "Mul", "Erf", "Add", "Mul"]),
    ("halfx_gelu", "dynamo", 18, "erf", "none", ["Mul", "Mul", "Erf", "Add", "Mul"]),
    ("gelu", "torchscript", 20, "op", "none", ["Gelu"]),
    ("gelu", "dynamo", 20, "op", "none", ["Gelu"]),
    ("gelu_tanh", "torchscript", 20, "op", "tanh", ["Gelu"]),
    ("gelu_tanh", "dynamo", 20, "op", "tanh", ["Gelu"]),
]


@pytest.mark.parametrize(("case", "exporter", "opset", "form", "approximate", "ops"), GELU_CASES)
def test_gelu(export, case, exporter, opset, form, approximate, ops):
    graph, regions = _regions(export(case, exporter, opset))
    assert _kinds(regions) == {"gelu": 1}
    gelu = regions[0]
    assert [n.op for n in gelu.nodes] == ops
    assert gelu.attrs == {"form": form, "approximate": approximate}
    assert gelu.inputs == graph.inputs and gelu.outputs == graph.outputs


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gelu_with_wrong_constant_is_not_gelu(export, exporter):
    _, regions = _regions(export("notgelu", exporter, 18))
    assert "gelu" not in _kinds(regions)


# ----------------------------------------------------------------------------- softmax / attention


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_softmax_with_mask_add(export, exporter, opset):
    graph, regions = _regions(export("masked_softmax", exporter, opset))
    assert _kinds(regions) == {"act_matmul": 2, "softmax": 1}
    softmax = _only(regions, "softmax")
    assert [n.op for n in softmax.nodes] == ["Add", "Softmax"]
    assert softmax.attrs["axis"] == -1 and softmax.attrs["nan_guard"] is False
    (step,) = softmax.attrs["masks"]
    mask = step["mask"]
    assert step["form"] == "add" and isinstance(mask, gs.Variable) and mask in softmax.inputs
    assert softmax.attrs["scores"] is softmax.nodes[0].inputs[0] and len(softmax.inputs) == 2
    assert mask.inputs[0].op == "Mul"  # (1 - mask) * finfo.min, built outside the region
    qk, pv = [r for r in regions if r.kind == "act_matmul"]
    assert qk.attrs == {"transposed_b": True} and pv.attrs == {"transposed_b": False}
    claimed = {id(n) for r in regions for n in r.nodes}
    assert any(n.op == "Div" and id(n) not in claimed for n in graph.nodes), "the 1/sqrt(d) scale stays outside"


@pytest.mark.parametrize(("case", "when"), [("filled_softmax", True), ("kept_softmax", False)])
@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_softmax_with_masked_fill(export, exporter, opset, case, when):
    """Where(condition, finfo.min, scores) replaces masked scores: the Where belongs to the region, so every
    method sees the fill applied to its averaged (summed) scores, never to per-step ones."""
    _, regions = _regions(export(case, exporter, opset))
    softmax = _only(regions, "softmax")
    assert [n.op for n in softmax.nodes] == ["Where", "Softmax"]
    (step,) = softmax.attrs["masks"]
    assert step["form"] == "fill" and step["fill_when"] is when
    assert step["fill_value"] == pytest.approx(float(np.finfo(np.float32).min))
    assert step["mask"].dtype == np.bool_ and step["mask"] in softmax.inputs
    assert softmax.attrs["scores"].inputs[0].op == "MatMul"


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_softmax_with_a_chain_of_masks(export, exporter, opset):
    _, regions = _regions(export("chained_softmax", exporter, opset))
    softmax = _only(regions, "softmax")
    assert [m["form"] for m in softmax.attrs["masks"]] == ["fill", "add"]
    assert [n.op for n in softmax.nodes] == ["Where", "Add", "Softmax"]
    assert softmax.attrs["scores"].inputs[0].op == "MatMul"


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_softmax_with_constant_causal_mask(export, exporter):
    _, regions = _regions(export("causal_softmax", exporter, 18 if exporter == "dynamo" else 17))
    softmax = _only(regions, "softmax")
    assert [n.op for n in softmax.nodes] == ["Add", "Softmax"]
    assert [m["form"] for m in softmax.attrs["masks"]] == ["add"]
    assert isinstance(softmax.attrs["masks"][0]["mask"], gs.Constant)
    assert softmax.inputs == [softmax.nodes[0].inputs[0]]  # constants are not region inputs


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_softmax_with_constant_bias_keeps_the_add_out(export, exporter):
    _, regions = _regions(export("biased_softmax", exporter, 18 if exporter == "dynamo" else 17))
    softmax = _only(regions, "softmax")
    assert [n.op for n in softmax.nodes] == ["Softmax"] and softmax.attrs["masks"] == []


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_sdpa_decomposition(export, exporter, opset):
    """sdpa: Q and K^T each Mul'd by d^-1/4 (outside), Add(mask) -> Softmax -> IsNaN/Where guard."""
    graph, regions = _regions(export("sdpa", exporter, opset))
    assert _kinds(regions) == {"act_matmul": 2, "softmax": 1}
    softmax = _only(regions, "softmax")
    assert [n.op for n in softmax.nodes] == ["Add", "Softmax", "IsNaN", "Where"]
    assert softmax.attrs["nan_guard"] is True and isinstance(softmax.attrs["masks"][0]["mask"], gs.Variable)
    assert softmax.outputs == [softmax.nodes[-1].outputs[0]]
    assert [r.attrs["transposed_b"] for r in regions if r.kind == "act_matmul"] == [True, False]
    claimed = {id(n) for r in regions for n in r.nodes}
    scales = [n for n in graph.nodes if n.op == "Mul" and id(n) not in claimed]
    assert len(scales) == 2
    assert all(n.inputs[1].values.item() == pytest.approx(8**-0.25, rel=1e-6) for n in scales)


def test_attention_op_at_opset_23(export):
    try:
        path = export("sdpa", "dynamo", 23)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means torch cannot emit it
        pytest.skip(f"torch {torch.__version__} cannot export sdpa as opset-23 Attention: {exc}")
    graph, regions = _regions(path)
    assert _kinds(regions) == {"attention": 1}
    attention = regions[0]
    assert attention.attrs == {"op": "Attention", "is_causal": False, "scale": None}
    assert attention.inputs[:3] == graph.inputs[:3] and len(attention.inputs) == 4
    model = load_model(path)
    feeds = _feeds("sdpa", model)
    np.testing.assert_allclose(_run(canonicalize(model), feeds)[0], _run(model, feeds)[0], atol=1e-5)


# ----------------------------------------------------------------------------- matmuls and adds


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize(("case", "ops"), [("linear3d", ["MatMul", "Add"]), ("linear2d", ["Gemm"])])
def test_linear(export, exporter, case, ops):
    graph, regions = _regions(export(case, exporter, 18 if exporter == "dynamo" else 17))
    assert _kinds(regions) == {"weight_matmul": 1}
    linear = regions[0]
    assert [n.op for n in linear.nodes] == ops
    assert linear.attrs["op"] == ops[0] and linear.attrs["weight_input_index"] == 1
    assert isinstance(linear.attrs["weight"], gs.Constant) and linear.attrs["weight"].values.size == 8 * D
    assert linear.attrs["bias"].values.shape == (8,)
    assert linear.inputs == graph.inputs and linear.outputs == graph.outputs


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_residual_add(export, exporter):
    graph, regions = _regions(export("residual", exporter, 18 if exporter == "dynamo" else 17))
    assert _kinds(regions) == {"weight_matmul": 1, "residual_add": 1}
    add = _only(regions, "residual_add")
    assert graph.inputs[0] in add.inputs and add.outputs == graph.outputs


def test_describe_is_json_and_names_tensors(export):
    _, regions = _regions(export("sdpa", "torchscript", 17))
    summary = json.loads(json.dumps(describe(regions)))
    softmax = next(s for s in summary if s["kind"] == "softmax")
    assert softmax["ops"] == ["Add", "Softmax", "IsNaN", "Where"]
    assert softmax["attrs"]["masks"][0]["mask"] in softmax["inputs"]
    assert softmax["attrs"]["scores"] in softmax["inputs"]
    assert softmax["name"] in softmax["nodes"]


# ----------------------------------------------------------------------------- canonicalize

CANONICAL_CASES = [
    ("layernorm", "torchscript", 14),
    ("gelu_tanh", "torchscript", 17),
    ("masked_softmax", "dynamo", 18),
    ("sdpa", "torchscript", 17),
    ("sdpa", "dynamo", 18),
    ("linear3d", "dynamo", 18),
]


@pytest.mark.parametrize(("case", "exporter", "opset"), CANONICAL_CASES)
def test_canonicalize_is_deterministic_and_exact(export, case, exporter, opset):
    model = load_model(export(case, exporter, opset))
    before = model.SerializeToString()
    first, second = canonicalize(model), canonicalize(model)
    assert model.SerializeToString() == before, "canonicalize modified its input"
    assert first.SerializeToString() == second.SerializeToString()
    onnx.checker.check_model(first)
    names = [n.name for n in first.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert not any(n.op_type == "Constant" for n in first.graph.node)
    feeds = _feeds(case, model)
    for got, want in zip(_run(first, feeds), _run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_constants_folds_static_shape_chains(export):
    """TorchScript sdpa computes its scale as Shape -> Slice -> Cast -> Sqrt -> Div -> Sqrt."""
    model = load_model(export("sdpa", "torchscript", 17))
    ops = Counter(n.op_type for n in fold_constants(model).graph.node)
    assert ops["Shape"] == ops["Slice"] == ops["Sqrt"] == ops["Constant"] == 0


def _unsqueeze_of_a_constant() -> onnx.ModelProto:
    """y = x + Unsqueeze(c): folding the Unsqueeze runs it in an onnxruntime session of default options, whose
    optimizer warns that it cannot remove a node whose output the session returns."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["c", "axes"], ["u"], name="unsqueeze"),
            helper.make_node("Add", ["x", "u"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "c"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_constants_keeps_onnxruntime_quiet_and_restores_its_logger(capfd):
    model = _unsqueeze_of_a_constant()
    set_default_log_severity(2)
    folded = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert capfd.readouterr().err == ""
    # the default logger is back at Warning: the same session outside spikec warns
    ort.InferenceSession(gs.export_onnx(gs.import_onnx(_lone_unsqueeze())).SerializeToString())
    assert "UnsqueezeElimination cannot remove node" in capfd.readouterr().err


def _lone_unsqueeze() -> onnx.ModelProto:
    """The subgraph onnx-graphsurgeon folds: the Unsqueeze of a constant, its output the graph's."""
    model = _unsqueeze_of_a_constant()
    del model.graph.node[1]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 3]))
    del model.graph.input[0]
    return model


def test_fold_constants_keeps_dynamic_batch(export):
    path = export("sdpa", "torchscript", 17)
    dynamic = {f"in{i}": ["batch", 4, 5, 8] for i in range(3)} | {"in3": ["batch", 1, 5, 5]}
    canonical = canonicalize(load_model(path, input_shapes=dynamic))
    assert gs.import_onnx(canonical).outputs[0].shape[0] == "batch"
    feeds = _feeds("sdpa", load_model(path))
    reference = _run(load_model(path), feeds)[0]
    got = _run(canonical, {k: np.concatenate([v] * 3) for k, v in feeds.items()})[0]
    np.testing.assert_allclose(got, np.concatenate([reference] * 3), atol=1e-5)


def test_name_nodes_fills_and_deduplicates():
    graph = gs.Graph(nodes=[gs.Node("Relu", name=name) for name in ["", "a", "a", "", "Relu", "a_1"]])
    assert [n.name for n in name_nodes(graph).nodes] == ["Relu_1", "a", "a_2", "Relu_2", "Relu", "a_1"]


def _reshape_graph(batch, shape, target, allowzero=0):
    """Reshape(data, target) where data has `shape` and the graph input sets the batch."""
    x = gs.Variable("x", np.float32, [batch, 3])
    data, y = gs.Variable("data", np.float32, shape), gs.Variable("y", np.float32)
    target = gs.Constant("target", np.array(target, np.int64))
    reshape = gs.Node("Reshape", "r", attrs={"allowzero": allowzero}, inputs=[data, target], outputs=[y])
    nodes = [gs.Node("Identity", "stand_in", inputs=[x], outputs=[data]), reshape]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y]), reshape


@pytest.mark.parametrize(
    ("batch", "shape", "target", "allowzero", "relaxed"),
    [
        (2, [2, 16, 64], [2, 16, 4, 16], 0, [0, 16, 4, 16]),  # batch kept in axis 0
        (2, [2, 16, 64], [2, 16, -1, 16], 1, [0, 16, -1, 16]),  # dynamo's allowzero=1, no 0 in shape
        (2, [8, 5, 8], [2, 4, 5, 8], 0, [-1, 4, 5, 8]),  # [B*H, S, d] -> [B, H, S, d]
        (2, [2, 4, 5, 8], [8, 5, 8], 0, [-1, 5, 8]),  # [B, H, S, d] -> [B*H, S, d]
        (2, [2, 4, 5, 8], [-1, 5, 8], 0, [-1, 5, 8]),  # already free
        (2, [2, 15], [3, 10], 0, [3, 10]),  # 3 is not a multiple of the batch
        (2, [8, 5, 8], [2, -1, 5, 8], 0, [2, -1, 5, 8]),  # a second -1 is not possible
        ("batch", ["batch", 16, 64], [2, 16, 64], 0, [2, 16, 64]),  # dynamic batch: nothing to relax
    ],
)
def test_relax_batch_shapes(batch, shape, target, allowzero, relaxed):
    graph, node = _reshape_graph(batch, shape, target, allowzero)
    relax_batch_shapes(graph)
    assert node.inputs[1].values.tolist() == relaxed
    if relaxed != target:
        assert node.attrs["allowzero"] == 0


def test_relax_batch_shapes_expand():
    x = gs.Variable("x", np.float32, [2, 1, 4, 4])
    y = gs.Variable("y", np.float32, [2, 1, 4, 4])
    expand = gs.Node("Expand", "e", inputs=[x, gs.Constant("s", np.array([2, 1, 4, 4], np.int64))], outputs=[y])
    relax_batch_shapes(gs.Graph(nodes=[expand], inputs=[x], outputs=[y]))
    assert expand.inputs[1].values.tolist() == [1, 1, 4, 4]


def test_squeeze_batch_constants():
    x = gs.Variable("x", np.float32, [2, 3])
    rows = gs.Constant("rows", np.array([[1, 2, 3], [1, 2, 3]], np.float32))
    distinct = gs.Constant("distinct", np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    y, z = gs.Variable("y", np.float32, [2, 3]), gs.Variable("z", np.float32, [2, 3])
    nodes = [gs.Node("Add", "a", inputs=[x, rows], outputs=[y]), gs.Node("Mul", "m", inputs=[y, distinct], outputs=[z])]
    graph = squeeze_batch_constants(gs.Graph(nodes=nodes, inputs=[x], outputs=[z]))
    assert graph.nodes[0].inputs[1].values.tolist() == [[1, 2, 3]]
    assert graph.nodes[1].inputs[1] is distinct


@pytest.mark.parametrize(
    ("case", "exporter", "opset"),
    [("sdpa", "dynamo", 18), ("masked_softmax", "torchscript", 17), ("layernorm", "dynamo", 18)],
)
def test_canonical_static_batch_model_runs_at_a_multiple_of_the_batch(export, case, exporter, opset):
    """What time folding needs: the static-batch model still computes row by row at T*batch."""
    model = load_model(export(case, exporter, opset))
    canonical = canonicalize(model)
    feeds = _feeds(case, model)
    reference = _run(canonical, feeds)
    grown = onnx.ModelProto()
    grown.CopyFrom(canonical)
    grown.graph.ClearField("value_info")
    for tensor in grown.graph.input:
        tensor.type.tensor_type.shape.dim[0].dim_value *= 3
    for tensor in grown.graph.output:
        tensor.type.tensor_type.ClearField("shape")
    got = _run(grown, {k: np.concatenate([v] * 3) for k, v in feeds.items()})
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, np.concatenate([r] * 3), atol=1e-6)


# ----------------------------------------------------------------------------- loader


@pytest.fixture()
def model_file(export, tmp_path):
    """A private copy of a small export (tests may damage it)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(export("linear3d", "torchscript", 17).read_bytes())
    return path


def _raises(src, match: str, **kwargs) -> str:
    with pytest.raises(SpikecError) as info:
        load_model(src, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_load_missing_file(tmp_path):
    assert str(tmp_path / "nope.onnx") in _raises(tmp_path / "nope.onnx", "no such file")


def test_load_directory(tmp_path):
    _raises(tmp_path, "not a file")


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: np.random.default_rng(0).bytes(1000), lambda b: b"", lambda b: b"hello\n"],
    ids=["truncated", "random", "empty", "text"],
)
def test_load_non_onnx(model_file, damage):
    model_file.write_bytes(damage(model_file.read_bytes()))
    assert _raises(model_file, "not an ONNX model").startswith(f"{model_file}: ")


def test_load_checker_rejection(model_file):
    model = onnx.load(model_file)
    model.graph.node[0].input[0] = "dangling"
    onnx.save(model, model_file)
    message = _raises(model_file, "rejected by onnx.checker")
    assert message.startswith(f"{model_file}: ") and model.graph.node[0].name in message


def test_load_old_opset(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    )
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    assert _raises(path, "opset 11").startswith(f"{path}: ")


def test_load_input_shapes(model_file):
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    model = load_model(model_file, input_shapes={"in0": ["batch", 5, D]})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 5, D]
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest, "the source file was modified"
    assert str(model_file) in _raises(model_file, "unknown input 'input_ids'", input_shapes={"input_ids": [1, 5, D]})
    _raises(model_file, "has rank 2", input_shapes={"in0": [1, 5]})
    _raises(model_file, "neither a positive int nor a name", input_shapes={"in0": [1, -5, D]})


def test_load_in_memory_model_is_not_modified(model_file):
    source = onnx.load(model_file)
    before = source.SerializeToString()
    loaded = load_model(source, input_shapes={"in0": [3, 5, D]})
    assert source.SerializeToString() == before
    assert loaded.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    _raises(source, "<in-memory model>: input_shapes names unknown input 'x'", input_shapes={"x": [1]})


def test_load_external_data(model_file, tmp_path):
    model = onnx.load(model_file)
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(model_file), external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (external.parent / "weights.bin").exists()
    loaded = load_model(external)
    for tensor in loaded.graph.initializer:
        assert not onnx.external_data_helper.uses_external_data(tensor)
    feeds = {"in0": np.ones((2, 5, D), np.float32)}
    np.testing.assert_array_equal(_run(loaded, feeds)[0], _run(model, feeds)[0])
    os.remove(external.parent / "weights.bin")
    assert str(external) in _raises(external, "weights.bin")


# ----------------------------------------------------------------------------- fixture models

# LayerNorm epsilon: 1e-5 is torch's and GPT-2/Swin's default, 1e-12 BERT's and ViT's.
VIT4 = {"layernorm": 9, "gelu": 4, "softmax": 4, "act_matmul": 8, "weight_matmul": 25, "residual_add": 8}
# Embedding sums count as residual adds: word+token_type (token_type_ids is built with
# zeros_like(input_ids), dynamic in batch) and, in TorchScript exports only, +position.
# MiniLM's last "layernorm" is the sentence embedding's L2 normalization; BERT-family models' pooler Tanh is an
# activation.
MINILM = {
    "layernorm": 14,
    "gelu": 6,
    "softmax": 6,
    "act_matmul": 12,
    "weight_matmul": 36,
    "residual_add": 14,
    "activation": 1,
}
TINY_BERT = {
    "layernorm": 5,
    "gelu": 2,
    "softmax": 2,
    "act_matmul": 4,
    "weight_matmul": 13,
    "residual_add": 6,
    "activation": 1,
}
TINY_VIT = {
    "layernorm": 5,
    "gelu": 2,
    "softmax": 2,
    "act_matmul": 4,
    "weight_matmul": 13,
    "residual_add": 4,
    "activation": 1,
}
TINY_GPT2 = {"layernorm": 5, "gelu": 2, "softmax": 2, "act_matmul": 4, "weight_matmul": 8, "residual_add": 4}
TINY_SWIN = {"layernorm": 11, "gelu": 4, "softmax": 4, "act_matmul": 8, "weight_matmul": 25, "residual_add": 8}


def _minilm_feeds(seq_len: int = 16) -> dict[str, np.ndarray]:
    return fixtures.minilm_inputs(["A short sentence.", "A somewhat longer sentence, padded less."], seq_len)


FIXTURE_CASES = {  # case: (build, region counts, LayerNorm epsilon, input_shapes)
    "digits_vit-torchscript-14": (lambda: fixtures.digits_vit(14, "torchscript"), VIT4, 1e-5, None),
    "digits_vit-torchscript-17": (lambda: fixtures.digits_vit(17, "torchscript"), VIT4, 1e-5, None),
    "digits_vit-dynamo-18": (lambda: fixtures.digits_vit(18, "dynamo"), VIT4, 1e-5, None),
    "minilm-torchscript-14-eager": (lambda: fixtures.minilm(14, "torchscript"), MINILM, 1e-12, None),
    "minilm-torchscript-17-sdpa": (lambda: fixtures.minilm(17, "torchscript", attn="sdpa"), MINILM, 1e-12, None),
    "minilm-dynamo-18-eager": (
        lambda: fixtures.minilm(18, "dynamo", attn="eager"),
        MINILM | {"residual_add": 13},
        1e-12,
        None,
    ),
    "minilm-dynamo-18-sdpa": (
        lambda: fixtures.minilm(18, "dynamo", attn="sdpa"),
        MINILM | {"residual_add": 13},
        1e-12,
        None,
    ),
    "minilm-dynamo-23-sdpa": (
        lambda: fixtures.minilm(23, "dynamo", attn="sdpa"),
        {"layernorm": 14, "gelu": 6, "attention": 6, "weight_matmul": 36, "residual_add": 13, "activation": 1},
        1e-12,
        None,
    ),
    # Static shapes fold the token_type and position embeddings into constants.
    "minilm-torchscript-17-static": (
        lambda: fixtures.minilm(17, "torchscript"),
        MINILM | {"residual_add": 12},
        1e-12,
        {"input_ids": [2, 16], "attention_mask": [2, 16]},
    ),
    **{
        f"{name}-torchscript-17": (
            lambda name=name: fixtures.random_transformer(name, 17, "torchscript"),
            counts,
            eps,
            None,
        )
        for name, counts, eps in [
            ("bert", TINY_BERT, 1e-12),
            ("vit", TINY_VIT, 1e-12),
            ("deit", TINY_VIT, 1e-12),
            ("gpt2", TINY_GPT2, 1e-5),
            ("swin", TINY_SWIN, 1e-5),
        ]
    },
}


def _fixture_feeds(case: str) -> dict[str, np.ndarray]:
    name = case.split("-")[0]
    if name == "digits_vit":
        return {"pixels": fixtures.digits_data()["x_test"][:2]}
    if name == "minilm":
        return _minilm_feeds()
    return fixtures.random_inputs(name, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixture_models(case):
    build, expected, epsilon, input_shapes = FIXTURE_CASES[case]
    model = load_model(build(), input_shapes=input_shapes)
    canonical = canonicalize(model)
    regions = find_regions(gs.import_onnx(canonical))
    assert _kinds(regions) == expected
    if "softmax" in expected:  # every Q K^T product sees a transposed K
        assert sum(r.attrs["transposed_b"] for r in regions if r.kind == "act_matmul") == expected["softmax"]
    for r in regions:
        if r.kind == "layernorm" and r.attrs["form"] != "l2":
            assert r.attrs["epsilon"] == pytest.approx(epsilon, rel=1e-6), r.name
    feeds = _fixture_feeds(case)
    for got, want in zip(_run(canonical, feeds), _run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
