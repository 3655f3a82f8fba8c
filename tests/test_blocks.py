"""Transformer blocks beyond LayerNorm/GELU/softmax, converted by every method (issue 18, items 4-6).

Each class is a tiny torch module exported with torch.onnx (TorchScript, opset 17) or an onnx.helper graph:
RMSNorm and L2 normalization, activations written as elementwise graphs (BLOOM's GELU, quick_gelu, SiLU,
HardSwish), gated MLPs, BatchNorm between linear layers, sequence-first attention (torch.nn.MultiheadAttention),
GELU inputs near 0 (STA's UGO), and the mask forms tests/test_masks.py does not cover (Sub, OPT's clamp, Swin's
reshaped window mask). Bounds as tests/test_masks.py's check_method: ECMT cosine >= 0.99 at T=16, STA >= 0.97 at
T=32, TTFS max error <= 1e-3 of scale, SpikeZIP-TF equal to its QANN (1e-4 of scale) with boundary flips explained.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from graphs import torch_export
from onnx import TensorProto, helper, numpy_helper
from spikec.passes.canonicalize import canonicalize
from spikec.passes.emit import Layout
from spikec.passes.loader import load_model
from spikec.passes.patterns import find_regions
from test_masks import check_method
from torch import nn

import spikec
from spikec import compiler
from spikec.compiler import check_time_folding
from spikec.evaluate import cosine, run_dataset

METHODS = ["ecmt", "sta", "spikezip", "ttfs"]
DIM, SEQ = 16, 6


def _export(module: nn.Module, example: dict[str, np.ndarray], path, opset: int = 17) -> str:
    return torch_export(module, example, path, {n: {0: "batch"} for n in [*example, "y"]}, opset)


def _tokens(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, SEQ, DIM)).astype(np.float32)}


def _regions(path) -> list:
    return find_regions(gs.import_onnx(canonicalize(load_model(path))))


def _report(snn: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in snn.metadata_props}["spikec.report"])


# ----------------------------------------------------------------------------- normalizations


class Norm(nn.Module):
    """Linear -> normalization -> Linear. llama: x * rsqrt(mean(x^2) + eps) * w (LLaMA, Mistral, Qwen2, T5);
    gemma: ... * (1 + w); divide: x / sqrt(mean(x^2) + eps) * w; l2: F.normalize(x, dim=-1) * w."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.inner, self.outer = form, nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.weight = nn.Parameter(torch.rand(DIM) + 0.5)

    def forward(self, x):
        h = self.inner(x)
        if self.form == "l2":
            return self.outer(F.normalize(h, dim=-1) * self.weight)
        variance = h.float().pow(2).mean(-1, keepdim=True)
        if self.form == "divide":
            return self.outer(h / torch.sqrt(variance + 1e-6) * self.weight)
        normed = h * torch.rsqrt(variance + 1e-6)
        return self.outer(normed * (1.0 + self.weight) if self.form == "gemma" else self.weight * normed)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["llama", "gemma", "divide", "l2"])
def test_normalizations(tmp_path, form, method):
    path = _export(Norm(form), _tokens(2, 0), tmp_path / f"{form}.onnx")
    (norm,) = [r for r in _regions(path) if r.kind == "layernorm"]
    assert (norm.attrs["center"], norm.attrs["reduction"], norm.attrs["form"]) == (
        False,
        "sum" if form == "l2" else "mean",
        "l2" if form == "l2" else "rms",
    )
    assert norm.attrs["scale"] is not None
    check_method(method, path, _tokens(32, 1), _tokens(8, 2), "y")


def _rms_op_model(path) -> str:
    """x -> MatMul -> RMSNormalization (opset 23) -> MatMul."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((DIM, DIM)).astype(np.float32) / 4, f"w{i}") for i in (1, 2)]
    scale = numpy_helper.from_array(rng.uniform(0.5, 1.5, DIM).astype(np.float32), "scale")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "scale"], ["n"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, DIM])],
        [*weights, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_rms_normalization_op(tmp_path, method):
    path = _rms_op_model(tmp_path / "rms.onnx")
    (norm,) = [r for r in _regions(path) if r.kind == "layernorm"]
    assert (norm.attrs["form"], norm.attrs["center"], norm.attrs["epsilon"]) == ("op", False, pytest.approx(1e-6))
    check_method(method, path, _tokens(32, 1), _tokens(8, 2), "y")


# ----------------------------------------------------------------------------- activations

ACTIVATIONS = {  # name -> (the activation as torch writes it, region kind, attrs it must carry)
    "bloom-gelu": (
        lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
        "gelu",
        {"approximate": "tanh"},
    ),
    "quick-gelu": (lambda x: x * torch.sigmoid(1.702 * x), "activation", {"function": "quick_gelu"}),
    "silu": (F.silu, "activation", {"function": "silu"}),
    "hardswish-op": (F.hardswish, "activation", {"function": "hardswish"}),
    "hardswish-relu6": (lambda x: x * F.relu6(x + 3) / 6, "activation", {"function": "hardswish"}),
    "hardsigmoid": (F.hardsigmoid, "activation", {"function": "hardsigmoid"}),
    "sigmoid": (torch.sigmoid, "activation", {"function": "sigmoid"}),
    "tanh": (torch.tanh, "activation", {"function": "tanh"}),
}


class MLP(nn.Module):
    def __init__(self, activation, gated: bool = False, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.gate = nn.Linear(DIM, 4 * DIM) if gated else None
        self.activation = activation
        with torch.no_grad():
            self.up.weight.mul_(scale)
            self.up.bias.mul_(scale)

    def forward(self, x):
        if self.gate is None:
            return self.down(self.activation(self.up(x)))
        return self.down(self.activation(self.gate(x)) * self.up(x))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_by_function(tmp_path, name, method):
    function, kind, attrs = ACTIVATIONS[name]
    path = _export(MLP(function, scale=3.0), _tokens(2, 0), tmp_path / f"{name}.onnx")
    (region,) = [r for r in _regions(path) if r.kind in ("gelu", "activation")]
    assert region.kind == kind and attrs.items() <= region.attrs.items()
    check_method(method, path, _tokens(32, 1), _tokens(8, 2), "y")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gating", ["swiglu", "geglu"])
def test_gated_mlp(tmp_path, gating, method):
    """act(gate) * up: ECMT neurons on both operands, SpikeZIP-TF quantizers on them (and SESA), STA's TCSA,
    TTFS's product construction. A product of two activations is heavy-tailed: STA's encoder thresholds (at most
    the calibration maximum) need 128 calibration samples to cover the evaluation's (at 32 one sample's worst
    cosine was 0.967, its mean 0.989)."""
    activation = F.silu if gating == "swiglu" else (lambda x: F.gelu(x, approximate="tanh"))
    path = _export(MLP(activation, gated=True), _tokens(2, 0), tmp_path / f"{gating}.onnx")
    kinds = sorted(r.kind for r in _regions(path) if r.kind not in ("weight_matmul",))
    assert kinds == ["act_mul", "activation" if gating == "swiglu" else "gelu"]
    check_method(method, path, _tokens(128, 1), _tokens(8, 2), "y")


def test_each_method_converts_the_blocks(tmp_path):
    """What each method does with them (README's table): ECMT puts MT neurons on both operands of the gated
    product; STA gives SiLU a UGO and RMSNorm the rsqrt UGO; TTFS builds one neuron for SiLU and the product."""
    norm = Norm("llama")
    mlp = MLP(F.silu, gated=True)
    path = _export(nn.Sequential(norm, mlp), _tokens(2, 0), tmp_path / "llama-block.onnx")
    calib = _tokens(32, 1)
    ecmt = _report(spikec.compile(path, calib, method="ecmt", timesteps=4, verify=False, progress=False))
    product = next(c for c in ecmt["compensated"] if c["kind"] == "act_mul")
    assert len(product["inputs"]) == 2
    assert {n["consumers"][0] for n in ecmt["neurons"]} >= {product["region"]}
    sta = _report(spikec.compile(path, calib, method="sta", timesteps=4, verify=False, progress=False))
    assert sorted(u["operator"] for u in sta["ugos"]) == ["rsqrt", "silu"]
    ttfs = _report(spikec.compile(path, calib, method="ttfs", verify=False, progress=False))["ttfs"]
    assert sorted(c["kind"] for c in ttfs["constructions"]) == ["activation", "layernorm", "product"]
    assert ttfs["float_nodes"] == []


class LeViTStage(nn.Module):
    """LeViT's Linear -> BatchNorm1d (over the flattened tokens) -> HardSwish: BatchNorm is affine in inference,
    so it runs as it is (mean semantics) or as a scaling per step and a shift counted once (sum semantics)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.norm, self.out = nn.Linear(DIM, DIM, bias=False), nn.BatchNorm1d(DIM), nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_(0, 0.5)
            self.norm.running_mean.normal_(0, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.linear(x)
        return self.out(F.hardswish(self.norm(h.flatten(0, 1)).reshape_as(h)))


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_between_linear_layers(tmp_path, method):
    path = _export(LeViTStage(), _tokens(2, 0), tmp_path / "levit.onnx")
    assert "BatchNormalization" in {n.op_type for n in onnx.load(path).graph.node}
    check_method(method, path, _tokens(32, 1), _tokens(8, 2), "y")
    if method == "ecmt":
        report = _report(spikec.compile(path, _tokens(32, 1), method="ecmt", timesteps=4, verify=False, progress=False))
        assert "BatchNormalization" not in {op for c in report["compensated"] for op in c["ops"]}


class Upsampled(nn.Module):
    """MobileViT folds patches back into a feature map and resizes it: Resize is linear in its data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        h = F.interpolate(self.inner(x).transpose(1, 2), scale_factor=2.0, mode="linear")
        return self.outer(F.gelu(h.transpose(1, 2)))


@pytest.mark.parametrize("method", METHODS)
def test_resize_is_linear(tmp_path, method):
    path = _export(Upsampled(), _tokens(2, 0), tmp_path / "resize.onnx")
    check_method(method, path, _tokens(32, 1), _tokens(8, 2), "y")
    snn = spikec.compile(path, _tokens(32, 1), method=method, verify=False, progress=False)
    report = _report(snn)
    kept = report["ttfs"]["float_nodes"] if method == "ttfs" else report["compensated"]
    assert "Resize" not in {op for entry in kept for op in entry.get("ops", [entry.get("op")])}


def test_sta_gelu_near_zero(tmp_path):
    """GELU inputs within a few tenths of 0 (small-init models: Swin-v2, Starcoder2): the GELU UGO's fit had no
    slope between its innermost hinges and erred by as much as GELU itself there (STA cosine 0.88 on a tiny
    Swin-v2). Measured 0.9997 at T=32, 0.9999 with exact GELU."""
    path = _export(MLP(nn.GELU(), scale=0.1), _tokens(2, 0), tmp_path / "small.onnx")
    calib, feeds = _tokens(32, 1), _tokens(8, 2)
    reference = run_dataset(path, feeds)["y"]
    snn = spikec.compile(path, calib, method="sta", timesteps=32, progress=False)
    assert [u["operator"] for u in _report(snn)["ugos"]] == ["gelu"]
    assert cosine(reference, run_dataset(snn, feeds)["y"]) >= 0.999


# ----------------------------------------------------------------------------- layouts


class Encoder(nn.Module):
    """torch.nn.TransformerEncoder; batch_first False runs on [seq, batch, dim] (transposed at the module's
    boundaries: graph inputs and outputs keep the batch first). ``seq_first_output`` leaves the output as it is."""

    def __init__(self, batch_first: bool, seq_first_output: bool = False):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.batch_first, self.seq_first_output = batch_first, seq_first_output

    def forward(self, x):
        if self.batch_first:
            return self.encoder(x)
        y = self.encoder(x.transpose(0, 1))
        return y if self.seq_first_output else y.transpose(0, 1)


class PoolingHead(nn.Module):
    """SigLIP's head: a learned probe attends to the tokens through nn.MultiheadAttention(batch_first=True)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.probe = nn.Parameter(torch.randn(1, 1, DIM))
        self.attention = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        probe = self.probe.repeat(x.shape[0], 1, 1)
        return self.out(self.attention(probe, x, x, need_weights=False)[0][:, 0])


@pytest.fixture(scope="module")
def layout_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    torch.backends.mha.set_fastpath_enabled(False)  # the fast path's fused op has no ONNX export
    try:
        return {
            "seq-first": _export(Encoder(False), _tokens(2, 0), root / "seq_first.onnx"),
            "batch-first": _export(Encoder(True), _tokens(2, 0), root / "batch_first.onnx"),
            "pooling-head": _export(PoolingHead(), _tokens(2, 0), root / "head.onnx"),
        }
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.slow
def test_batch_layouts_of_multihead_attention(layout_models, monkeypatch):
    """check_time_folding finds where every tensor holds the batch: [seq, batch, dim] on axis 1, the output
    projection's [seq * batch, dim] on axis 0 behind seq blocks."""
    ann = canonicalize(load_model(layout_models["seq-first"]))
    layouts = check_time_folding(ann, _tokens(4, 1), "unrolled")
    by_op = {}
    for node in ann.graph.node:
        for layout in layouts.nodes[node.name]:
            if layout is not None:
                by_op.setdefault(node.op_type, set()).add(layout)
    assert Layout(1, 1, 3) in by_op["LayerNormalization"]
    assert Layout(0, SEQ, 2) in by_op["Gemm"]  # the output projection of [seq * batch, dim]
    assert Layout(0, 1, 4) in by_op["Softmax"]  # the heads: [batch, heads, seq, seq]
    # fetched in parts (each tensor its own session, as a large graph's are): the same layouts
    monkeypatch.setattr(compiler, "_CHECK_PART_BYTES", 1)
    assert check_time_folding(ann, _tokens(4, 1), "unrolled") == layouts


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["seq-first", "batch-first", "pooling-head"])
def test_sequence_first_attention(layout_models, model, method):
    """torch.nn.MultiheadAttention runs sequence-first inside; the unrolled form folds time where the batch is.
    SpikeZIP-TF's SNN crashed, ECMT's and STA's degraded silently (ECMT cosine 0.89 on a 2-layer encoder). The
    pooling head sees one pooled token per sample: 128 calibration samples cover its range."""
    check_method(method, layout_models[model], _tokens(128, 1), _tokens(8, 2), "y")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ecmt", "spikezip"])
def test_unrolled_equals_stateful_where_the_batch_is_not_first(layout_models, method):
    path = layout_models["pooling-head" if method == "spikezip" else "seq-first"]
    calib, feeds = _tokens(32, 1), _tokens(4, 2)
    if method == "spikezip":
        path = spikec.quantize(path, calib, progress=False)
    options = dict(method=method, timesteps=8, verify=False, progress=False)  # the same SNN, not its fidelity
    unrolled = run_dataset(spikec.compile(path, calib, **options), feeds)
    stateful = run_dataset(spikec.compile(path, calib, mode="stateful", **options), feeds, timesteps=8)
    np.testing.assert_allclose(unrolled["y.steps"], stateful["y.steps"], rtol=1e-4, atol=1e-5)


def test_a_model_that_fails_at_a_batch_of_one_folds_time():
    """The dynamo exporter's Squeeze without axes drops a batch axis of size 1 (mBART's dynamo export then
    fails at batch 1 and runs at any other): the time-folding check runs groups of two samples, so the
    unrolled compile does not refuse a model its user runs at every batch but one."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["x", "one"], ["x1"]),
        helper.make_node("Squeeze", ["x1"], ["x2"]),  # no axes: a batch of one goes too
        helper.make_node("Unsqueeze", ["x2", "two"], ["x3"]),  # axis 2 of a rank-1 tensor: fails at batch 1
        helper.make_node("Squeeze", ["x3", "two"], ["x4"]),
        helper.make_node("MatMul", ["x4", "w"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((64, 4)).astype(np.float32)}
    feeds = {"x": rng.standard_normal((8, 4)).astype(np.float32)}
    snn = spikec.compile(model, calib, method="ecmt", timesteps=16, progress=False)
    assert cosine(run_dataset(model, feeds)["y"], run_dataset(snn, feeds)["y"]) > 0.99  # measured 0.9985


def test_output_not_batch_first_is_refused_unrolled(tmp_path):
    path = _export(Encoder(False, seq_first_output=True), _tokens(2, 0), tmp_path / "seq_out.onnx")
    with pytest.raises(
        spikec.SpikecError,
        match=r"--mode stateful \(output 'y' keeps the samples' rows on axis 1, "
        r"not on axis 0\)",
    ):
        spikec.compile(path, _tokens(16, 1), method="ecmt", timesteps=4, progress=False)
    snn = spikec.compile(path, _tokens(16, 1), method="ecmt", timesteps=4, mode="stateful", progress=False)
    assert np.isfinite(run_dataset(snn, _tokens(2, 2), timesteps=4)["y"]).all()


# ----------------------------------------------------------------------------- masks


class Masked(nn.Module):
    """One attention block over [batch, seq, dim] whose mask reaches the softmax as: sub, scores - (1 - m) * 1e4;
    opt, scores + mask then max(., finfo.min) (OPT); window, Swin's mask added to the scores viewed per window
    [batch, windows, heads, n, n] and viewed back (windows of 3 tokens, the mask a constant 0 / -100)."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.qkv, self.out = form, nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        window = torch.zeros(SEQ // 3, 3, 3)
        window[1, 0, 2] = window[1, 2, 0] = -100.0
        self.register_buffer("window", window)

    def forward(self, x, attention_mask=None):
        b, s, _ = x.shape
        n = 3 if self.form == "window" else s
        windows = s // n
        q, k, v = self.qkv(x).reshape(b * windows, n, 3, 2, DIM // 2).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM // 2)
        if self.form == "sub":
            scores = scores - (1.0 - attention_mask[:, None, None, :].float()) * 1e4
        elif self.form == "opt":
            padding = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            scores = torch.max(scores + padding, torch.tensor(torch.finfo(torch.float32).min))
        else:
            scores = (scores.view(b, windows, 2, n, n) + self.window[None, :, None]).view(-1, 2, n, n)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, DIM)
        return self.out(y)


MASKS = {"sub": ["sub"], "opt": ["add", "clamp"], "window": ["add", "reshape"]}


def _masked_data(form: str, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Tokens and, where the form takes one, a padding mask: unpadded, right- and left-padded rows."""
    if form == "window":
        return _tokens(samples, seed)
    mask = np.ones((samples, SEQ), np.int64)
    mask[1::3, SEQ - 2 :] = 0
    mask[2::3, : SEQ // 2] = 0
    return {**_tokens(samples, seed), "attention_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", list(MASKS))
def test_mask_forms(tmp_path, form, method):
    path = _export(Masked(form), _masked_data(form, 2, 0), tmp_path / f"{form}.onnx")
    (softmax,) = [r for r in _regions(path) if r.kind == "softmax"]
    assert [m["form"] for m in softmax.attrs["masks"]] == MASKS[form]
    check_method(method, path, _masked_data(form, 32, 1), _masked_data(form, 8, 2), "y")
