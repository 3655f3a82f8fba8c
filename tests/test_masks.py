"""Attention masks of every form, converted by every method (issue 18: sdpa's NaN guard, masks).

A mask is built from the inputs alone, so it is time-invariant: every method must keep it exact, and a
fully masked row (an empty sequence; left padding in a causal decoder) must give what the ANN gives: 0
behind sdpa's NaN guard, uniform weights for finfo.min or a masked_fill, softmax of the scores for -1e4.
Each form is one attention block (qkv projection, scores, mask, softmax, values, output projection)
exported with torch.onnx; the data hold unpadded rows, right and left padding and, where the ANN itself
is finite there, fully masked rows. Then small transformers exported the way their users export them.

Bounds: ECMT cosine >= 0.99 at T=16 and STA >= 0.97 at T=32 in every sample, TTFS max error <= 1e-3 of
the output's scale, SpikeZIP-TF equal to its QANN (1e-4 of scale) in every sample where no quantizer input
sits on a level boundary, and every such boundary flip explained (spikec.evaluate.quantizer_agreement).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from graphs import torch_export
from spikec.passes.canonicalize import canonicalize
from spikec.passes.loader import load_model
from spikec.passes.patterns import find_regions
from spikec.runtime import InferenceSession
from torch import nn

import spikec
from examples import fixtures
from spikec.evaluate import cosine, quantizer_agreement, run_dataset

SEQ, DIM, HEADS = 6, 16, 2
FINFO_MIN = torch.finfo(torch.float32).min
INF = float("-inf")


class MaskedAttention(nn.Module):
    """One attention block; ``form`` says how the mask reaches the softmax:

    add: scores + where(allowed, 0, value) (transformers' eager attention); add_mul: scores + (1 - allowed)
    * value (BERT-era code); fill: scores.masked_fill(~allowed, value) (DeBERTa); keep: where(allowed, scores,
    value); chain: the causal part by where, then the padding mask added; alibi: ALiBi's distance bias
    (soft: part of it must stay in the potentials), then the padding mask added; sdpa / sdpa_float:
    scaled_dot_product_attention with a boolean / an additive mask. ``causal``: None, "constant" (a -inf
    buffer, folded into a constant Add) or "computed" (from the sequence length); ``window``: sliding."""

    def __init__(self, form: str, value: float = FINFO_MIN, causal: str | None = None, window: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.form, self.value, self.causal, self.window = form, value, causal, window
        self.register_buffer("causal_bias", torch.full((SEQ, SEQ), INF).triu(1))

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        allowed = attention_mask[:, None, None, :].bool()
        position = torch.arange(s)
        distance = position[:, None] - position[None, :]
        causal = (distance >= 0) & (distance < self.window) if self.window else distance >= 0
        if self.causal == "computed":
            allowed = allowed & causal
        if self.form == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        elif self.form == "sdpa_float":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(allowed, 0.0, self.value))
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS)
            if self.causal == "constant":
                scores = scores + self.causal_bias
            if self.form == "add":
                scores = scores + torch.where(allowed, 0.0, self.value)
            elif self.form == "add_mul":
                scores = scores + (1.0 - allowed.float()) * self.value
            elif self.form == "fill":
                scores = scores.masked_fill(~allowed, self.value)
            elif self.form == "keep":
                scores = torch.where(allowed, scores, self.value)
            elif self.form == "chain":
                scores = torch.where(causal, scores, self.value)
                scores = scores + torch.where(attention_mask[:, None, None, :].bool(), 0.0, self.value)
            elif self.form == "alibi":
                slopes = torch.tensor([1.5, 4.0])[:, None, None]
                bias = -slopes * distance.abs()
                scores = scores + bias + torch.where(allowed, 0.0, self.value)
            y = scores.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, DIM))


# name -> (MaskedAttention arguments, whether the ANN is finite on a fully masked row, the masks the softmax
# region takes in: a folded causal mask is a constant, ALiBi's bias a computed additive mask)
FORMS = {
    "add-finfo-min": (dict(form="add"), True, ["add"]),
    "add-1e4": (dict(form="add_mul", value=-1e4), True, ["add"]),
    "add-100": (dict(form="add_mul", value=-100.0), True, ["add"]),
    "add-inf": (dict(form="add", value=INF), False, ["add"]),
    "fill-finfo-min": (dict(form="fill"), True, ["fill"]),
    "fill-inf": (dict(form="fill", value=INF), False, ["fill"]),
    "keep-finfo-min": (dict(form="keep"), True, ["fill"]),
    "sdpa-bool": (dict(form="sdpa"), True, ["add"]),
    "sdpa-float": (dict(form="sdpa_float"), True, ["add"]),
    "causal-constant": (dict(form="add", causal="constant"), True, ["add", "add"]),
    "causal-computed": (dict(form="add", causal="computed"), True, ["add"]),
    "sliding-window": (dict(form="add", causal="computed", window=3), True, ["add"]),
    "sdpa-causal": (dict(form="sdpa", causal="computed"), True, ["add"]),
    "sdpa-sliding-window": (dict(form="sdpa", causal="computed", window=3), True, ["add"]),
    "chain": (dict(form="chain"), True, ["fill", "add"]),
    "alibi": (dict(form="alibi"), True, ["add", "add"]),
}


def padding_mask(samples: int, length: int, fully_masked: bool = True) -> np.ndarray:
    """Rows cycle through unpadded, right-padded (a third), left-padded (half) and, if asked, fully masked."""
    mask = np.ones((samples, length), np.int64)
    mask[1::4, length - length // 3 :] = 0
    mask[2::4, : length // 2] = 0
    if fully_masked:
        mask[3::4] = 0
    return mask


def attention_data(samples: int, seed: int, fully_masked: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((samples, SEQ, DIM)).astype(np.float32),
        "attention_mask": padding_mask(samples, SEQ, fully_masked),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("masks"), {}

    def export(name: str):
        if name not in cache:
            path = root / f"{name}.onnx"
            torch_export(
                MaskedAttention(**FORMS[name][0]),
                attention_data(2, 0),
                path,
                {n: {0: "batch", 1: "seq"} for n in ("x", "attention_mask", "y")},
            )
            cache[name] = path
        return cache[name]

    return export


def _sample_cosines(reference: np.ndarray, got: np.ndarray) -> list[float]:
    """Per sample; a sample the ANN gives as all zeros (a fully masked encoder input) must be zeros too."""
    scale = np.abs(reference).max()
    result = []
    for want, have in zip(reference, got):
        if not want.any():
            assert np.abs(have).max() <= 1e-6 * scale
            continue
        result.append(cosine(want[None], have[None]))
    return result


def check_method(method: str, model, calib: dict, feeds: dict, output: str) -> dict:
    """Compile ``model`` with ``method``, run it on ``feeds`` and assert the issue's bound; returns what was
    measured."""
    reference = run_dataset(model, feeds)[output]
    assert np.all(np.isfinite(reference))
    if method == "spikezip":
        qann = spikec.quantize(model, calib, levels=16, progress=False)
        snn = spikec.compile(qann, calib, method="spikezip", timesteps=48, mode="stateful", progress=False)
        agreement = quantizer_agreement(qann, snn, feeds, timesteps=48)
        want, got = run_dataset(InferenceSession(qann), feeds)[output], agreement["outputs"][output]
        exact = np.array(agreement["exact"])
        assert np.all(np.isfinite(got)) and None not in agreement["t_eq"]
        assert all(agreement["explained"]), agreement["first_mismatch"]
        # A fully masked row can be uniform: with 16 levels (scale 1/15 at a clip of 1) 1/6 and 1/2 are exact
        # level ties, which float rounding decides either way. A sample whose first token is present has none.
        if "attention_mask" in feeds:
            assert exact[feeds["attention_mask"][:, 0] == 1].all(), agreement["first_mismatch"]
        # A QANN may hold an exact level tie in every sample (HardSigmoid(0) = 1/2 is 7.5 levels at a scale of
        # 1/15, and a quantized 0 reaches it): then every sample's flips are explained and none is exact.
        error = float(np.abs(got[exact] - want[exact]).max() / np.abs(want).max()) if exact.any() else 0.0
        assert error <= 1e-4
        return {"qann_error": error, "exact_samples": float(exact.mean())}
    options = {"ecmt": dict(timesteps=16), "sta": dict(timesteps=32), "ttfs": {}}[method]
    got = run_dataset(spikec.compile(model, calib, method=method, progress=False, **options), feeds)[output]
    assert np.all(np.isfinite(got))
    if method == "ttfs":
        error = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert error <= 1e-3
        return {"error": error}
    worst = min(_sample_cosines(reference, got))
    assert worst >= {"ecmt": 0.99, "sta": 0.97}[method]
    return {"worst_sample_cosine": worst}


# every form with a stepped and the one-pass method in the edit loop, all four in the full suite
@pytest.mark.parametrize(
    "method",
    ["ecmt", pytest.param("sta", marks=pytest.mark.slow), pytest.param("spikezip", marks=pytest.mark.slow), "ttfs"],
)
@pytest.mark.parametrize("form", list(FORMS))
def test_mask_form(exported, form, method):
    path = exported(form)
    _, fully_masked, masks = FORMS[form]
    regions = find_regions(gs.import_onnx(canonicalize(load_model(path))))
    (softmax,) = [r for r in regions if r.kind == "softmax"]
    assert [m["form"] for m in softmax.attrs["masks"]] == masks
    assert softmax.attrs["nan_guard"] == (form.startswith("sdpa-") and form != "sdpa-float")  # sdpa: bool masks
    check_method(method, path, attention_data(32, 1, fully_masked), attention_data(8, 2, fully_masked), "y")


@pytest.mark.parametrize(
    "options",
    [dict(max_layer=False), dict(precision=2**20), dict(precision=2**20, max_layer=False)],
    ids=["no-max-layer", "clock", "clock-no-max-layer"],
)
@pytest.mark.parametrize("form", ["sdpa-bool", "fill-finfo-min", "add-1e4", "chain", "alibi"])
def test_ttfs_softmax_variants_take_masks(exported, form, options):
    """Without the max layer a masked softmax gets its own masked-scores layer; on a clock of precision p
    every spike time is rounded. Measured <= 6e-7 and <= 1.7e-4 (-1e4: the ANN rounds x to its grid)."""
    path = exported(form)
    calib, feeds = attention_data(32, 1), attention_data(8, 2)
    got = run_dataset(spikec.compile(path, calib, method="ttfs", progress=False, **options), feeds)["y"]
    want = run_dataset(path, feeds)["y"]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_ttfs_row_masked_everywhere_by_minus_inf_gives_zero(exported):
    """Without sdpa's guard the ANN gives NaN for a row masked everywhere by -inf; the SNN gives what the
    guard would: no attention, so the block outputs its output projection's bias."""
    path = exported("add-inf")
    snn = spikec.compile(path, attention_data(32, 1, fully_masked=False), method="ttfs", progress=False)
    feeds = attention_data(4, 2)
    got = run_dataset(snn, feeds)["y"]
    assert np.isnan(run_dataset(path, feeds)["y"][3]).all()
    bias = MaskedAttention(**FORMS["add-inf"][0]).out.bias.detach().numpy()
    np.testing.assert_allclose(got[3], np.broadcast_to(bias, got[3].shape), rtol=0, atol=1e-6)


def test_ttfs_calibration_names_the_softmax_stage(exported):
    """The calibration network's softmax stages are tensors named after their site (a calibration error
    names the construction, not an internal tap)."""
    from spikec.passes import ttfs

    graph = gs.import_onnx(canonicalize(load_model(exported("sdpa-bool"))))
    regions = find_regions(graph)
    (softmax,) = [r for r in regions if r.kind == "softmax"]
    lowering = ttfs.lower(graph, regions, ttfs.TTFSOptions(), 17)
    stages = {f"{softmax.name}.{stage}" for stage in ("max", "shifted", "logsumexp")}
    assert stages <= {site.value.name for site in lowering.sites.values()}
    assert stages <= {t.name for t in graph.tensors().values()}


@pytest.mark.parametrize("form", ["sdpa-bool", "fill-finfo-min", "add-inf"])
def test_sta_softmax_ugo_takes_masks(exported, form):
    """--softmax-ugo decomposes every softmax, sdpa's guarded ones too; a masked score is weighted 0 instead
    of meeting the exp UGO's clamp (-inf gave NaN). Measured mean cosine >= 0.9955 at T=32 (the UGOs'
    own error: the decomposition is lossy on unmasked attention too)."""
    path = exported(form)
    fully_masked = FORMS[form][1]
    calib, feeds = attention_data(32, 1, fully_masked), attention_data(8, 2, fully_masked)
    snn = spikec.compile(path, calib, method="sta", timesteps=32, softmax_ugo=True, progress=False)
    report = json.loads({p.key: p.value for p in snn.metadata_props}["spikec.report"])
    assert [u["operator"] for u in report["ugos"]] == ["softmax (exp, inverse)"]
    assert "Softmax" not in {n.op_type for n in snn.graph.node}
    got = run_dataset(snn, feeds)["y"]
    assert np.all(np.isfinite(got))
    assert cosine(run_dataset(path, feeds)["y"], got) >= 0.99


# Small transformers as their users export them: attention implementation (transformers' default sdpa, with
# its NaN guard, or eager) x exporter. Decoders take left padding, so their first rows are fully masked.
HF_MODELS = {
    "bert-sdpa-torchscript": ("BertModel", "BertConfig", dict(), "sdpa", "torchscript"),
    "bert-eager-dynamo": ("BertModel", "BertConfig", dict(), "eager", "dynamo"),
    "gpt2-sdpa-torchscript": (
        "GPT2Model",
        "GPT2Config",
        dict(n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0),
        "sdpa",
        "torchscript",
    ),
    "llama-sdpa-torchscript": (
        "LlamaModel",
        "LlamaConfig",
        dict(num_key_value_heads=2, pad_token_id=0),
        "sdpa",
        "torchscript",
    ),
    "llama-eager-torchscript": (
        "LlamaModel",
        "LlamaConfig",
        dict(num_key_value_heads=2, pad_token_id=0),
        "eager",
        "torchscript",
    ),
    "llama-sdpa-dynamo": ("LlamaModel", "LlamaConfig", dict(num_key_value_heads=2, pad_token_id=0), "sdpa", "dynamo"),
    "mistral-sdpa-torchscript": (
        "MistralModel",
        "MistralConfig",
        dict(num_key_value_heads=2, pad_token_id=0, sliding_window=4),
        "sdpa",
        "torchscript",
    ),
    "mistral-eager-dynamo": (
        "MistralModel",
        "MistralConfig",
        dict(num_key_value_heads=2, pad_token_id=0, sliding_window=4),
        "eager",
        "dynamo",
    ),
    "deberta-v2-eager-torchscript": ("DebertaV2Model", "DebertaV2Config", dict(), "eager", "torchscript"),
}
_SMALL = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    use_cache=False,
)
_TEXT_SEQ = 8


def text_data(samples: int, seed: int, empty: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1, 1000, (samples, _TEXT_SEQ)).astype(np.int64),
        "attention_mask": padding_mask(samples, _TEXT_SEQ, empty),
    }


@pytest.fixture(scope="module")
def hf_exported(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root, cache = tmp_path_factory.mktemp("hf"), {}

    def export(name: str):
        if name not in cache:
            model_class, config_class, config, attention, exporter = HF_MODELS[name]
            settings = {**_SMALL, **config} if model_class != "GPT2Model" else {"vocab_size": 1000, **config}
            torch.manual_seed(0)
            model = getattr(transformers, model_class)(
                getattr(transformers, config_class)(**settings, attn_implementation=attention)
            ).eval()
            names = ("input_ids", "attention_mask")
            axes = {n: {0: "batch", 1: "seq"} for n in (*names, "last_hidden_state")}
            path = root / f"{name}.onnx"
            fixtures._export_onnx(
                fixtures._named_io_module(model, names, ("last_hidden_state",)),
                {k: torch.from_numpy(v) for k, v in text_data(4, 0).items()},
                ("last_hidden_state",),
                axes,
                17 if exporter == "torchscript" else 18,
                exporter,
                path,
            )
            cache[name] = path
        return cache[name]

    return export


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ecmt", "sta", "spikezip", "ttfs"])
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_exported_transformer(hf_exported, name, method):
    # DeBERTa zeroes the embeddings of masked tokens: an empty sequence's rows reach LayerNorm constant, and
    # the normalization of a constant row magnifies any approximation without bound (STA's GELU UGO is not 0
    # at 0). Its padded queries' rows are fully masked all the same.
    empty = not name.startswith("deberta")
    check_method(method, hf_exported(name), text_data(16, 1, empty), text_data(8, 2, empty), "last_hidden_state")
