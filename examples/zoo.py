"""The conformance zoo: tiny random-init transformers of many architectures, exported the ways their users
export them (benchmarks/conformance.py runs every method on every export).

An architecture (``ARCHS``) is a transformers config (or a plain ``torch.nn.TransformerEncoder``), an input
kind that says how realistic batches look (right padding for encoders, left padding for decoders, as
tokenizers and generation pad them), and the outputs to export. A route (``ROUTES``) is one way to get
an ONNX file from it: the TorchScript exporter at opset 14 or 17, with the model's default attention
(sdpa where transformers has it) or eager attention, the dynamo exporter at its default opset,
onnxruntime's transformer optimizer on the TorchScript export, and optimum's exporter.

Every export is cached under ``SPIKEC_CACHE`` like the fixtures' (same helpers, keys that change with the
config, the route, torch and this file's export revision); an export that fails is cached as its reason,
so a matrix run does not pay for it twice and reports it as a cell, not a crash.

optimum pins transformers < 4.58, which cannot share a venv with this project's transformers: it runs
from its own venv, named by ``SPIKEC_OPTIMUM_PYTHON`` (that venv's python; see docs/conformance.md).
Without it the route's cells read "export failed (optimum not installed ...)".

``python examples/zoo.py [--only NAME] [--routes R,...]`` builds (or finds) every export and prints a
line per export; ``python examples/zoo.py optimum-export NAME OUT`` is what the optimum venv runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script (also from optimum's venv, where examples is no package)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.fixtures import (
    _atomic_write,
    _cache_path,
    _cached,
    _digest,
    _export_key,
    _export_onnx,
    _named_io_module,  # noqa: E402
)

# Bump when a builder or the post-processing below changes what an export contains.
ZOO_REV = 1
SEQ, VOCAB = 16, 1000
# Sample counts: calibration (thresholds, ranges) and a held-out evaluation set of other samples.
CALIBRATION_SAMPLES, EVALUATION_SAMPLES = 32, 8
CALIBRATION_SEED, EVALUATION_SEED, EXPORT_SEED, STATS_SEED = 1, 2, 0, 3


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of the zoo. ``config`` is hashable so that it keys the cache."""

    name: str
    family: str  # text encoder, decoder, encoder-decoder, vision, audio, torch
    model_cls: str  # a transformers class, or "TransformerEncoder" (torch.nn)
    config_cls: str
    config: tuple[tuple[str, object], ...]
    inputs: str  # text-right, text-left, image, mel, wave, embeddings (see sample_inputs)
    outputs: tuple[str, ...]
    ort_model_type: str = "bert"  # onnxruntime.transformers.optimizer's model_type (its default: bert)
    submodule: str | None = None  # export this attribute of the model (Whisper's encoder)
    optimum_task: str = "feature-extraction"
    optimum_file: str = "model.onnx"  # the file of optimum's output directory that holds this model
    optimum_shapes: tuple[tuple[str, int], ...] = ()  # main_export's dummy input shapes where its defaults misfit
    # random init leaves BatchNorm's running statistics at mean 0, variance 1, which no trained model has: each
    # stage then shrinks the activations (MobileViT's outputs underflow to exact zeros), so these are measured
    # on sample inputs first, as training would have set them
    batchnorm_stats: bool = False

    @property
    def model_key(self) -> str:
        """Digest of what the torch model and its exports are made of (not of other tools' settings)."""
        parts = (self.model_cls, self.config_cls, self.config, self.inputs, self.outputs, self.submodule)
        # appended only where set, so the other architectures keep their cached exports
        return _digest(parts + (("batchnorm_stats",) if self.batchnorm_stats else ()))

    @property
    def settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config}

    def setting(self, *keys: str, default=None):
        settings = self.settings
        return next((settings[k] for k in keys if k in settings), default)

    @property
    def has_sdpa(self) -> bool:
        """Whether transformers gives this model sdpa attention by default (then eager is another route)."""
        if self.model_cls == "TransformerEncoder":
            return False
        import transformers

        return bool(getattr(getattr(transformers, self.model_cls), "_supports_sdpa", False))


def _cfg(**settings) -> tuple[tuple[str, object], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items()))


_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
_DECODER = dict(_TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
_VIT = dict(
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
)
_SWIN = dict(
    image_size=32,
    patch_size=2,
    num_channels=3,
    embed_dim=32,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=4,
    mlp_ratio=2.0,
)
_LAST, _POOLED = ("last_hidden_state",), ("last_hidden_state", "pooler_output")


# two stages of spatial-reduction attention (SegFormer's Mix Transformer, PVT-v2)
_MIX_TRANSFORMER = dict(
    image_size=64,
    num_channels=3,
    num_encoder_blocks=2,
    depths=[2, 2],
    sr_ratios=[4, 2],
    hidden_sizes=[32, 64],
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
)


def _decoder(name: str, prefix: str, ort_model_type: str = "bert", **config) -> Arch:
    """A decoder of transformers' ``<prefix>Model``/``<prefix>Config`` on the shared decoder config, left-padded,
    read at its last hidden state."""
    return Arch(
        name,
        "decoder",
        f"{prefix}Model",
        f"{prefix}Config",
        _cfg(**_DECODER, **config),
        "text-left",
        _LAST,
        ort_model_type=ort_model_type,
    )


_ARCH_LIST = [
    # text encoders, right padding
    Arch("bert", "text encoder", "BertModel", "BertConfig", _cfg(**_TEXT), "text-right", _POOLED),
    Arch(
        "roberta",
        "text encoder",
        "RobertaModel",
        "RobertaConfig",
        _cfg(**_TEXT, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "text-right",
        _POOLED,
    ),
    Arch(
        "distilbert",
        "text encoder",
        "DistilBertModel",
        "DistilBertConfig",
        _cfg(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64),
        "text-right",
        _LAST,
    ),
    Arch(
        "albert", "text encoder", "AlbertModel", "AlbertConfig", _cfg(**_TEXT, embedding_size=32), "text-right", _POOLED
    ),
    Arch(
        "electra",
        "text encoder",
        "ElectraModel",
        "ElectraConfig",
        _cfg(**_TEXT, embedding_size=32),
        "text-right",
        _LAST,
    ),
    # relative position buckets (log of the distance, cast to int) added to every layer's scores: the
    # architecture of all-mpnet-base-v2, sentence-transformers' default model
    Arch(
        "mpnet",
        "text encoder",
        "MPNetModel",
        "MPNetConfig",
        _cfg(**_TEXT, pad_token_id=1, bos_token_id=0, eos_token_id=2, relative_attention_num_buckets=32),
        "text-right",
        _POOLED,
    ),
    # NoNorm (an elementwise affine in place of LayerNorm), bottlenecks, ReLU
    Arch(
        "mobilebert",
        "text encoder",
        "MobileBertModel",
        "MobileBertConfig",
        _cfg(
            **dict(_TEXT, intermediate_size=64),
            embedding_size=32,
            intra_bottleneck_size=32,
            true_hidden_size=32,
            num_feedforward_networks=2,
        ),
        "text-right",
        _POOLED,
    ),
    # disentangled relative attention, masked_fill masks (as DeBERTa-v3 is configured)
    Arch(
        "deberta-v2",
        "text encoder",
        "DebertaV2Model",
        "DebertaV2Config",
        _cfg(
            **_TEXT,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
        ),
        "text-right",
        _LAST,
    ),
    # rotary, GeGLU, no biases, alternating global and sliding-window (local) attention
    Arch(
        "modernbert",
        "text encoder",
        "ModernBertModel",
        "ModernBertConfig",
        _cfg(
            **dict(_TEXT, num_hidden_layers=3),
            local_attention=8,
            global_attn_every_n_layers=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "text-right",
        _LAST,
    ),
    # RoBERTa's architecture under XLM-R's class (multilingual encoders, e5 / bge-m3 style embedders)
    Arch(
        "xlm-roberta",
        "text encoder",
        "XLMRobertaModel",
        "XLMRobertaConfig",
        _cfg(**_TEXT, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "text-right",
        _POOLED,
    ),
    # DeBERTa v1: disentangled relative attention (c2p, p2c) without buckets, DeBERTa's own LayerNorm
    Arch(
        "deberta",
        "text encoder",
        "DebertaModel",
        "DebertaConfig",
        _cfg(
            **_TEXT,
            relative_attention=True,
            max_relative_positions=-1,
            pos_att_type=["c2p", "p2c"],
            position_biased_input=False,
            type_vocab_size=0,
        ),
        "text-right",
        _LAST,
    ),
    # span-based dynamic convolution heads (depthwise Conv1d, a softmax over kernel weights) beside attention
    Arch(
        "convbert",
        "text encoder",
        "ConvBertModel",
        "ConvBertConfig",
        _cfg(**_TEXT, embedding_size=64, head_ratio=2, conv_kernel_size=9, num_groups=1, pad_token_id=0),
        "text-right",
        _LAST,
    ),
    # ESM-2: rotary, pre-LayerNorm, token-dropout rescaling of the embeddings by the mask's length
    Arch(
        "esm",
        "text encoder",
        "EsmModel",
        "EsmConfig",
        _cfg(
            **_TEXT,
            position_embedding_type="rotary",
            emb_layer_norm_before=False,
            token_dropout=True,
            pad_token_id=1,
            mask_token_id=32,
        ),
        "text-right",
        _POOLED,
    ),
    # causal mask and padding mask together, quick_gelu; pooled at the EOS token (ArgMax over input ids)
    Arch(
        "clip-text",
        "text encoder",
        "CLIPTextModel",
        "CLIPTextConfig",
        _cfg(**dict(_TEXT, max_position_embeddings=32), pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "text-right",
        _POOLED,
        ort_model_type="clip",
    ),
    # decoders, left padding (the layout of generation batches)
    Arch(
        "gpt2",
        "decoder",
        "GPT2Model",
        "GPT2Config",
        _cfg(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "text-left",
        _LAST,
        ort_model_type="gpt2",
    ),
    # learned positions offset by the mask's cumulative sum (left padding aware), ReLU
    Arch(
        "opt",
        "decoder",
        "OPTModel",
        "OPTConfig",
        _cfg(**{k: v for k, v in _DECODER.items() if k != "intermediate_size"}, ffn_dim=128, word_embed_proj_dim=64),
        "text-left",
        _LAST,
    ),
    # parallel residual, partial rotary
    _decoder("gpt-neox", "GPTNeoX", rotary_pct=0.25, use_parallel_residual=True, ort_model_type="gpt_neox"),
    Arch(
        "gptj",
        "decoder",
        "GPTJModel",
        "GPTJConfig",
        _cfg(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            rotary_dim=8,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "text-left",
        _LAST,
    ),
    # parallel attention and MLP, multi-query attention, no biases
    Arch(
        "falcon",
        "decoder",
        "FalconModel",
        "FalconConfig",
        _cfg(
            **{k: v for k, v in _DECODER.items() if k not in ("intermediate_size", "max_position_embeddings")},
            new_decoder_architecture=False,
            parallel_attn=True,
            multi_query=True,
            alibi=False,
            bias=False,
        ),
        "text-left",
        _LAST,
    ),
    # parallel residual, partial rotary, gelu_new (the optimizer's model_type "phi" takes dynamo exports only)
    _decoder("phi", "Phi", partial_rotary_factor=0.5),
    # RMSNorm, SwiGLU, grouped-query attention, rotary
    _decoder("qwen2", "Qwen2", num_key_value_heads=2),
    # RMSNorm with (1 + w), GeGLU (tanh GELU), multi-query, scaled embeddings
    _decoder("gemma", "Gemma", num_key_value_heads=1, head_dim=16),
    # attention logits soft-capped (cap x tanh(scores / cap)) before the mask, sliding-window layers, RMSNorm
    # before and after each block
    _decoder("gemma2", "Gemma2", num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0, sliding_window=8),
    # RMSNorm on every head's queries and keys before rotary, grouped-query attention
    _decoder("qwen3", "Qwen3", num_key_value_heads=2, head_dim=16, ort_model_type="qwen3"),
    # per-head q/k RMSNorm (1 + w), a sliding-window layer and a global one with their own rotary bases,
    # RMSNorm before and after each block
    _decoder(
        "gemma3",
        "Gemma3Text",
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # fused qkv and gate_up projections (split by Slice), grouped-query attention
    _decoder("phi3", "Phi3", num_key_value_heads=2),
    # RMSNorm over all of q and k (before the head split), norms after attention and MLP (no pre-norm)
    _decoder("olmo2", "Olmo2", num_key_value_heads=2),
    # parallel attention and MLP off one bias-free LayerNorm, interleaved rotary, per-head q/k LayerNorm
    _decoder("cohere", "Cohere", num_key_value_heads=2, use_qk_norm=True),
    # Llama with scalar multipliers on the embeddings, the residual branches and the attention scores
    _decoder(
        "granite",
        "Granite",
        num_key_value_heads=2,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0625,
    ),
    # grouped-query attention with rotary on some layers only (NoPE on the others)
    _decoder("smollm3", "SmolLM3", num_key_value_heads=2, no_rope_layer_interval=2),
    # LayerNorm with SwiGLU, partial rotary
    _decoder("stablelm", "StableLm", partial_rotary_factor=0.25, num_key_value_heads=4),
    # LayerNorm with biases, tanh GELU MLP, sliding window
    _decoder("starcoder2", "Starcoder2", num_key_value_heads=2, sliding_window=8),
    _decoder("mistral", "Mistral", num_key_value_heads=2, sliding_window=8),
    _decoder("llama", "Llama"),
    # ALiBi position biases, BLOOM's own tanh GELU form
    Arch(
        "bloom",
        "decoder",
        "BloomModel",
        "BloomConfig",
        _cfg(
            vocab_size=VOCAB,
            hidden_size=64,
            n_layer=2,
            n_head=4,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "text-left",
        _LAST,
    ),
    # encoder-decoder: the decoder reads the shifted input ids (teacher forcing), cross-attends the encoder
    Arch(
        "bart",
        "encoder-decoder",
        "BartModel",
        "BartConfig",
        _cfg(
            vocab_size=VOCAB,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            use_cache=False,
        ),
        "text-right",
        ("last_hidden_state", "encoder_last_hidden_state"),
        ort_model_type="bart",
    ),
    # pre-LayerNorm BART
    Arch(
        "mbart",
        "encoder-decoder",
        "MBartModel",
        "MBartConfig",
        _cfg(
            vocab_size=VOCAB,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            use_cache=False,
        ),
        "text-right",
        ("last_hidden_state", "encoder_last_hidden_state"),
        ort_model_type="bart",
    ),
    # RMSNorm (T5LayerNorm), gated GELU (T5 v1.1 / Flan-T5), bucketed relative position bias
    Arch(
        "t5-encoder",
        "encoder-decoder",
        "T5EncoderModel",
        "T5Config",
        _cfg(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            use_cache=False,
        ),
        "text-right",
        _LAST,
        ort_model_type="t5",
    ),
    # vision
    Arch("vit", "vision", "ViTModel", "ViTConfig", _cfg(**_VIT), "image", _POOLED, ort_model_type="vit"),
    Arch("deit", "vision", "DeiTModel", "DeiTConfig", _cfg(**_VIT), "image", _POOLED, ort_model_type="vit"),
    # layer scale, class token and interpolated position embeddings
    Arch("dinov2", "vision", "Dinov2Model", "Dinov2Config", _cfg(**_VIT), "image", _POOLED, ort_model_type="vit"),
    # windows, shifted windows (roll + additive mask), patch merging
    Arch("swin", "vision", "SwinModel", "SwinConfig", _cfg(**_SWIN), "image", _POOLED, ort_model_type="swin"),
    # scaled cosine attention, log-spaced continuous position bias (an MLP), post-norm
    Arch("swinv2", "vision", "Swinv2Model", "Swinv2Config", _cfg(**_SWIN), "image", _POOLED, ort_model_type="swin"),
    # relative position bias, layer scale, mean pooling
    Arch(
        "beit",
        "vision",
        "BeitModel",
        "BeitConfig",
        _cfg(**_VIT, use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1),
        "image",
        _POOLED,
        ort_model_type="vit",
    ),
    # conv stem, BatchNorm after every linear, HardSwish, attention biases, subsampling attention
    Arch(
        "levit",
        "vision",
        "LevitModel",
        "LevitConfig",
        _cfg(
            image_size=64,
            num_channels=3,
            hidden_sizes=[32, 48, 64],
            num_attention_heads=[2, 2, 2],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            drop_path_rate=0,
            mlp_ratio=[2, 2, 2],
            attention_ratio=[2, 2, 2],
        ),
        "image",
        _POOLED,
        batchnorm_stats=True,
    ),
    # MobileNetV2 blocks (BatchNorm, SiLU) around transformer blocks on unfolded patches
    Arch(
        "mobilevit",
        "vision",
        "MobileViTModel",
        "MobileViTConfig",
        _cfg(
            image_size=64,
            num_channels=3,
            hidden_sizes=[32, 48, 64],
            neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96],
            num_attention_heads=2,
            patch_size=2,
            mlp_ratio=2.0,
        ),
        "image",
        _POOLED,
        batchnorm_stats=True,
    ),
    # Mix Transformer: overlapping conv patch embeddings, spatial-reduction attention (keys and values from a
    # strided conv + LayerNorm), depthwise conv in the MLP; a [batch, channels, h, w] output
    Arch(
        "segformer",
        "vision",
        "SegformerModel",
        "SegformerConfig",
        _cfg(**_MIX_TRANSFORMER, drop_path_rate=0.0),
        "image",
        _LAST,
    ),
    # PVT-v2: the same spatial-reduction attention and conv MLP, four stages
    Arch(
        "pvt-v2",
        "vision",
        "PvtV2Model",
        "PvtV2Config",
        _cfg(**_MIX_TRANSFORMER),
        "image",
        _LAST,
    ),
    # hierarchical ViT without convolutions: mask-unit (local) attention, max-pooled queries between stages,
    # unrolled token order, mean pooling
    Arch(
        "hiera",
        "vision",
        "HieraModel",
        "HieraConfig",
        _cfg(
            image_size=[64, 64],
            num_channels=3,
            embed_dim=16,
            depths=[1, 2, 1],
            num_heads=[1, 2, 4],
            num_query_pool=2,
            masked_unit_attention=[True, True, False],
            patch_size=[7, 7],
            patch_stride=[4, 4],
            patch_padding=[3, 3],
            masked_unit_size=[8, 8],
            mlp_ratio=2.0,
        ),
        "image",
        _POOLED,
    ),
    # attention-pooling head: torch.nn.MultiheadAttention (sequence-first inside)
    Arch(
        "siglip-vision",
        "vision",
        "SiglipVisionModel",
        "SiglipVisionConfig",
        _cfg(**_VIT),
        "image",
        _POOLED,
        ort_model_type="clip",
    ),
    # pre-LayerNorm, quick_gelu
    Arch(
        "clip-vision",
        "vision",
        "CLIPVisionModel",
        "CLIPVisionConfig",
        _cfg(**_VIT),
        "image",
        _POOLED,
        ort_model_type="clip",
    ),
    # audio: Whisper's encoder (Conv1d stem, GELU) on log-mel features; wav2vec2 on raw waveforms
    Arch(
        "whisper-encoder",
        "audio",
        "WhisperModel",
        "WhisperConfig",
        _cfg(
            vocab_size=VOCAB,
            d_model=64,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            use_cache=False,
        ),
        "mel",
        _LAST,
        ort_model_type="bart",
        submodule="encoder",
        optimum_file="encoder_model.onnx",
        optimum_shapes=(("nb_max_frames", 32),),
    ),
    # conv feature encoder with GroupNorm, grouped positional convolution (weight norm)
    Arch(
        "wav2vec2",
        "audio",
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        _cfg(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=[32, 32, 32],
            conv_stride=[5, 2, 2],
            conv_kernel=[10, 3, 3],
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            feat_extract_norm="group",
            do_stable_layer_norm=False,
            mask_time_prob=0.0,
        ),
        "wave",
        _LAST,
    ),
    # plain torch: nn.TransformerEncoder over given embeddings with a key padding mask
    Arch(
        "torch-encoder",
        "torch",
        "TransformerEncoder",
        "TransformerEncoderLayer",
        _cfg(
            d_model=64, nhead=4, dim_feedforward=128, num_layers=2, batch_first=True, norm_first=True, activation="gelu"
        ),
        "embeddings",
        ("hidden",),
    ),
    Arch(
        "torch-encoder-seqfirst",
        "torch",
        "TransformerEncoder",
        "TransformerEncoderLayer",
        _cfg(
            d_model=64,
            nhead=4,
            dim_feedforward=128,
            num_layers=2,
            batch_first=False,
            norm_first=False,
            activation="relu",
        ),
        "embeddings",
        ("hidden",),
    ),
]
ARCHS: dict[str, Arch] = {a.name: a for a in _ARCH_LIST}


@dataclasses.dataclass(frozen=True)
class Route:
    """One way to get an ONNX file: an exporter at an opset with an attention implementation, or a tool
    applied to another route's export."""

    name: str
    exporter: str  # torchscript, dynamo, ort-optimizer, optimum
    opset: int | None = None  # None: the exporter's default
    attention: str = "default"  # default (what transformers picks: sdpa where supported) or eager
    base: str | None = None  # the route whose export a tool rewrites

    def describe(self) -> str:
        if self.exporter == "ort-optimizer":
            return f"onnxruntime.transformers.optimizer on the {self.base} export"
        if self.exporter == "optimum":
            return "optimum-onnx main_export (its own venv, transformers < 4.58)"
        opset = self.opset or "default"
        return f"{self.exporter} exporter, opset {opset}, {self.attention} attention"


ROUTES: dict[str, Route] = {
    r.name: r
    for r in [
        Route("ts14", "torchscript", 14),
        Route("ts17", "torchscript", 17),
        Route("ts17-eager", "torchscript", 17, attention="eager"),
        Route("dynamo", "dynamo"),
        Route("ort-opt", "ort-optimizer", base="ts17"),
        Route("optimum", "optimum"),
    ]
}


class ExportFailed(Exception):
    """The route could not produce an ONNX file for the architecture (its message is the reason)."""


def applies(arch: Arch, route: Route) -> str | None:
    """Why ``route`` does not apply to ``arch`` (None when it does)."""
    if route.attention == "eager" and not arch.has_sdpa:
        return "no sdpa: the default export is eager already"
    if route.exporter == "optimum" and arch.model_cls == "TransformerEncoder":
        return "optimum exports transformers models"
    return None


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _lengths(rng: np.random.Generator, count: int) -> np.ndarray:
    """Sequence lengths: the first sample unpadded, the others between half and all of SEQ."""
    return np.concatenate([[SEQ], rng.integers(SEQ // 2, SEQ + 1, size=count - 1)])[:count]


def sample_inputs(arch: Arch, count: int, seed: int) -> dict[str, np.ndarray]:
    """A batch of ``count`` realistic samples for ``arch``'s model: token ids with right (encoders) or left
    (decoders) padding and the matching attention mask, images, log-mel features, waveforms, or
    embeddings with a key padding mask."""
    rng = np.random.default_rng(seed)
    if arch.inputs in ("text-right", "text-left"):
        pad = int(arch.setting("pad_token_id", default=0))
        lengths = _lengths(rng, count)
        positions = np.arange(SEQ)[None, :]
        mask = positions < lengths[:, None] if arch.inputs == "text-right" else positions >= SEQ - lengths[:, None]
        ids = rng.integers(3, VOCAB, size=(count, SEQ), dtype=np.int64)  # 0-2: pad/bos/eos
        if arch.model_cls == "CLIPTextModel":  # CLIP pools at the EOS token: end every text with one
            ids[np.arange(count), lengths - 1] = int(arch.setting("eos_token_id"))
        return {"input_ids": np.where(mask, ids, pad).astype(np.int64), "attention_mask": mask.astype(np.int64)}
    if arch.inputs == "image":
        size, channels = arch.setting("image_size"), arch.setting("num_channels", default=3)
        height, width = (size, size) if isinstance(size, int) else size  # Hiera's is [height, width]
        return {"pixel_values": rng.standard_normal((count, channels, height, width), dtype=np.float32)}
    if arch.inputs == "mel":  # Whisper's encoder takes exactly 2 x max_source_positions frames
        shape = (count, arch.setting("num_mel_bins"), 2 * arch.setting("max_source_positions"))
        return {"input_features": (0.5 * rng.standard_normal(shape)).astype(np.float32)}
    if arch.inputs == "wave":
        return {"input_values": (0.1 * rng.standard_normal((count, 1600))).astype(np.float32)}
    if arch.inputs == "embeddings":
        lengths = _lengths(rng, count)
        return {
            "embeddings": rng.standard_normal((count, SEQ, arch.setting("d_model")), dtype=np.float32),
            "attention_mask": (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64),
        }
    raise ValueError(f"unknown input kind {arch.inputs!r}")


def feeds_for(arch: Arch, input_names, count: int, seed: int) -> dict[str, np.ndarray]:
    """``sample_inputs`` for the inputs a model really has: an export by another tool may also take
    token_type_ids (zeros, one segment) or position_ids (counted over the unpadded tokens, as generation
    does), and may lack inputs the model ignores."""
    samples = sample_inputs(arch, count, seed)
    if "token_type_ids" in input_names:
        samples["token_type_ids"] = np.zeros_like(samples["input_ids"])
    if "position_ids" in input_names:
        mask = samples["attention_mask"]
        samples["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
    unknown = set(input_names) - set(samples)
    if unknown:
        raise ExportFailed(f"the export takes input(s) the zoo cannot fill: {', '.join(sorted(unknown))}")
    return {name: samples[name] for name in input_names}


# --------------------------------------------------------------------------
# Models and exports
# --------------------------------------------------------------------------


def _torch_encoder(arch: Arch):
    """nn.TransformerEncoder over embeddings [batch, seq, d] with an attention mask (1 = token), as a model
    takes them at its boundary; a sequence-first encoder gets them transposed, as its users feed it."""
    import torch

    settings = arch.settings
    layers = settings.pop("num_layers")
    batch_first = settings["batch_first"]

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(**settings, dropout=0.0), layers, enable_nested_tensor=False
            )

        def forward(self, embeddings, attention_mask):
            x = embeddings if batch_first else embeddings.transpose(0, 1)
            hidden = self.encoder(x, src_key_padding_mask=attention_mask == 0)
            return hidden if batch_first else hidden.transpose(0, 1)

    return Encoder().eval()


def build_model(arch: Arch, attention: str = "default"):
    """The random-init (seed 0) torch module of ``arch``, taking its inputs positionally and returning
    its outputs as a tuple."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch.model_cls == "TransformerEncoder":
            return _torch_encoder(arch)
        import transformers

        extra = {} if attention == "default" else {"attn_implementation": attention}
        config = getattr(transformers, arch.config_cls)(**arch.settings, **extra)
        model = getattr(transformers, arch.model_cls)(config).eval()
    if arch.submodule:
        model = getattr(model, arch.submodule)
    if arch.batchnorm_stats:
        _measure_batchnorm_stats(model, arch)
    return _named_io_module(model, list(sample_inputs(arch, 1, 0)), arch.outputs)


def _measure_batchnorm_stats(model, arch: Arch) -> None:
    """Running statistics of every BatchNorm from a pass over samples of a seed no evaluation uses (only the
    BatchNorms run in training mode: dropout and the rest stay as evaluated)."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the pass
        norm.train()
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in sample_inputs(arch, 64, STATS_SEED).items()})
    for norm in norms:
        norm.eval()


def _dynamic_axes(arch: Arch, names) -> dict[str, dict[int, str]]:
    """Batch axes everywhere; text keeps its sequence axis dynamic too (every output with a sequence axis
    has the input's length: the encoder-decoders' decoders read the shifted input ids)."""
    text = arch.inputs.startswith("text") or arch.inputs == "embeddings"
    axes = {}
    for name in names:
        sequence = text and (
            name in ("input_ids", "attention_mask", "embeddings") or name.endswith("hidden_state") or name == "hidden"
        )
        axes[name] = {0: "batch", 1: "seq"} if sequence else {0: "batch"}
    return axes


def _default_dynamo_opset() -> int:
    # torch.onnx.export(dynamo=True) without opset_version uses this; the export checks it got it.
    from torch.onnx import _constants

    return _constants.ONNX_DEFAULT_OPSET


def _export_path(arch: Arch, route: Route) -> Path:
    key = dict(cfg=arch.model_key, route=route.name, rev=ZOO_REV, torch=_export_key())
    if route.exporter == "ort-optimizer":
        import onnxruntime

        key.update(ort=onnxruntime.__version__, type=arch.ort_model_type)
    if route.exporter == "optimum":
        key.update(optimum=_optimum_version(), opt=_digest((arch.optimum_task, arch.optimum_file, arch.optimum_shapes)))
    return _cache_path(f"zoo-{arch.name}", ".onnx", **key)


def _torch_export(arch: Arch, route: Route, path: Path) -> None:
    import torch

    example = {k: torch.from_numpy(v) for k, v in sample_inputs(arch, 2, EXPORT_SEED).items()}
    opset = route.opset or _default_dynamo_opset()
    axes = _dynamic_axes(arch, [*example, *arch.outputs])
    # nn.TransformerEncoderLayer's eval fast path is one fused aten op no ONNX exporter knows; its users
    # export with the fast path off, as the exporter's error leads them to.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_onnx(build_model(arch, route.attention), example, arch.outputs, axes, opset, route.exporter, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _num_heads_and_hidden(arch: Arch) -> tuple[int, int]:
    """What the optimizer's attention fusion needs (0 = let it detect, where heads differ per stage)."""
    heads = arch.setting(
        "num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "num_heads", "nhead", default=0
    )
    hidden = arch.setting("hidden_size", "n_embd", "d_model", "dim", "embed_dim", default=0)
    return (heads, hidden) if isinstance(heads, int) and isinstance(hidden, int) and heads and hidden else (0, 0)


def _ort_optimize(arch: Arch, route: Route, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _num_heads_and_hidden(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(
            str(export(arch, ROUTES[route.base])), model_type=arch.ort_model_type, num_heads=heads, hidden_size=hidden
        )
    onnx.save_model(optimized.model, str(path))


@functools.lru_cache(maxsize=1)
def _optimum_python() -> str | None:
    python = os.environ.get("SPIKEC_OPTIMUM_PYTHON")
    return python if python and Path(python).is_file() else None


@functools.lru_cache(maxsize=1)
def _optimum_version() -> str:
    python = _optimum_python()
    if python is None:
        return "none"
    probe = "import importlib.metadata as m; print(m.version('optimum-onnx') + '-tf' + m.version('transformers'))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() if done.returncode == 0 else "none"


def _optimum_export(arch: Arch, route: Route, path: Path) -> None:
    python = _optimum_python()
    if python is None or _optimum_version() == "none":
        raise ExportFailed(
            "optimum not installed: set SPIKEC_OPTIMUM_PYTHON to the python of a venv with "
            "optimum-onnx (docs/conformance.md)"
        )
    done = subprocess.run(
        [python, str(Path(__file__).resolve()), "optimum-export", arch.name, str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise ExportFailed(f"optimum: {lines[-1] if lines else f'exit {done.returncode}'}")


def optimum_export(arch: Arch, output: Path) -> None:
    """Runs in optimum's venv: the architecture built from the same config and seed (by that venv's
    transformers), saved, and exported by optimum's main_export for its task."""
    import shutil

    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as work:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = getattr(transformers, arch.config_cls)(**arch.settings)
            getattr(transformers, arch.model_cls)(config).save_pretrained(f"{work}/model")
        main_export(
            f"{work}/model",
            f"{work}/onnx",
            task=arch.optimum_task,
            device="cpu",
            do_validation=False,
            no_post_process=True,
            **dict(arch.optimum_shapes),
        )
        shutil.copyfile(f"{work}/onnx/{arch.optimum_file}", output)


_EXPORTERS = {
    "torchscript": _torch_export,
    "dynamo": _torch_export,
    "ort-optimizer": _ort_optimize,
    "optimum": _optimum_export,
}


def export(arch: Arch, route: Route) -> Path:
    """The cached ONNX file of ``arch`` by ``route``; ExportFailed (with the reason) when the route cannot
    export it, now or on an earlier run."""
    reason = applies(arch, route)
    if reason:
        raise ExportFailed(f"not applicable: {reason}")
    path = _export_path(arch, route)
    failure = path.with_suffix(".failed.json")
    if failure.exists():
        raise ExportFailed(json.loads(failure.read_text())["reason"])
    try:
        return _cached(path, lambda tmp: _EXPORTERS[route.exporter](arch, route, tmp))
    except Exception as exc:  # any exporter error is the cell's finding, kept so the next run need not retry
        text = " ".join(str(exc).split()) or type(exc).__name__
        reason = text if isinstance(exc, ExportFailed) else f"{type(exc).__name__}: {text}"
        reason = reason[:400]
        if not (isinstance(exc, ExportFailed) and reason.startswith("optimum not installed")):
            _atomic_write(failure, lambda tmp: tmp.write_text(json.dumps({"reason": reason})))
        raise ExportFailed(reason) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "optimum-export"])
    parser.add_argument("args", nargs="*", help="optimum-export: NAME OUT")
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    parser.add_argument("--routes", help=f"comma-separated routes (default: all of {', '.join(ROUTES)})")
    args = parser.parse_args(argv)
    if args.command == "optimum-export":
        name, output = args.args
        optimum_export(ARCHS[name], Path(output))
        return 0
    names = args.only.split(",") if args.only else list(ARCHS)
    routes = args.routes.split(",") if args.routes else list(ROUTES)
    for name in names:
        for route in routes:
            try:
                result = str(export(ARCHS[name], ROUTES[route]))
            except ExportFailed as exc:
                result = f"export failed ({exc})"
            print(f"{name:24s} {route:11s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
