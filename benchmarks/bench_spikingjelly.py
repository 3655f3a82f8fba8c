"""spikec against SpikingJelly 2.0 on the digits ViT: fidelity, T_eq and simulation time, in one run.

The same trained weights (fixtures.digits_vit_torch(); spikec compiles its ONNX export,
fixtures.digits_vit()), the same 256 training images for calibration, the 540 test images for fidelity
and one batch of them for the times, 2 threads on both sides (torch.set_num_threads, onnxruntime
intra_op_num_threads). Three pairs:

* SpikeZIP-TF (issue 21 §5): SpikingJelly's ``SpikeZIPTFQANNRecipe`` against ``--method spikezip``, both at
  ``--levels`` levels and ``--spikezip-timesteps`` steps; each SNN against its own QANN (max abs error of
  the logits, samples equal to it, T_eq: the last step at which any neuron of the sample fired), and
  accuracy of QANN and SNN.
* STA (issue 23): ``STATransformerRecipe(mode="spiking_encoder")`` against ``--method sta`` at
  ``--timesteps``; accuracy and logit cosine against the float ANN.
* ECMT: SpikingJelly has no ECMT. Its ``TransformerTDEquivalentRecipe`` (every op on the inputs
  accumulated so far, emitting the difference of its outputs: no spikes, exact from the first step) is
  the stand-in issue 23 compared against; spikec ``--method ecmt`` at ``--timesteps``.

Times: ms per sample on the timing batch, spikec with its native kernels and with the portable ONNX
functions, SpikingJelly in both step modes (multi-step: the whole [T, B, ...] sequence in one call;
single-step: T calls), all four timed interleaved (bench_ecmt.measure); ratios are the median of each
repetition's ratio, against SpikingJelly's faster mode. Fidelity is measured in multi-step mode.

What SpikingJelly needs that it does not take from the digits ViT as defined (the adaptations, exact
rewrites of the same function unless said otherwise, are in ``fx_vit`` and ``QViT``):

* its FX recipes (STA, TD-equivalent) support attention only as ``nn.MultiheadAttention`` or
  ``F.scaled_dot_product_attention`` (a ``q @ k`` matmul is rejected), no integer indexing (``x[:, 0]``)
  and no ``expand`` of a parameter by the batch size: the attention becomes an ``nn.MultiheadAttention``
  holding the same q/k/v/proj weights, the class token is taken as ``[:, :1]``, and class token plus
  position embedding are one constant added to a zero row concatenated in front of the patches;
* ``TransformerTDEquivalentRecipe`` adds graph constants at every step (T times the position
  embedding; STA's recipe handles them): for it the constant is a second input, fed like the image,
  in the first step only;
* ``SpikeZIPTFQANNRecipe`` quantizes nothing: it converts a PyTorch QANN whose quantizer modules expose
  ``s``, ``pos_max``, ``neg_min``, and ViT attention as a fused ``qkv`` with named quantizers. SpikingJelly
  ships no PTQ for it, so ``QViT`` is that QANN, calibrated here per tensor (levels split by the
  calibration range, scale by MMSE), quantizers where the paper puts them. The recipe leaves ``nn.GELU``
  as it is, which applied to per-step increments is not the QANN's GELU; it is replaced by
  SpikingJelly's own ``TDGELU`` after the conversion.

SpikingJelly is not a dependency of spikec. Its metadata requires torchvision and torchaudio, which this
script does not use (a registry torchvision beside the pinned CPU torch breaks it): install it with

    pip install -c constraints.txt --no-deps spikingjelly==2.0.0 && pip install loguru requests tqdm scipy

    python benchmarks/bench_spikingjelly.py [--reps N] [--timesteps 16] [--spikezip-timesteps 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

# Before torch loads libgomp: idle OpenMP threads sleep, as the onnxruntime sessions' do
# (allow_spinning 0). With torch's default (spinning) and another job on one of the 2 cores, the same
# SpikingJelly call measured anywhere from 1 s to 55 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnxruntime as ort
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spikec.runtime import InferenceSession, equilibrium_steps, native, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.bench_ecmt import measure, median_ratio  # noqa: E402
from benchmarks.bench_native import session_options, session_pair  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine, run_dataset  # noqa: E402

THREADS = 2
# A per-sample output equals its reference when it is within this fraction of the reference's scale
# (bench_spikezip.agreement's criterion)
EXACT = 1e-4


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------------------------------
# The digits ViT as SpikingJelly's recipes take it
# --------------------------------------------------------------------------------------------------


def fx_vit(vit, tokens_as_input: bool):
    """The digits ViT rewritten for SpikingJelly's FX recipes (see the module docstring), same weights.
    With ``tokens_as_input`` the class/position constant is the forward's second argument."""
    torch = _torch()
    from torch import nn

    class Block(nn.Module):
        def __init__(self, block) -> None:
            super().__init__()
            attn = block.attn
            dim = attn.q.in_features
            self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
            self.attn = nn.MultiheadAttention(dim, attn.heads, batch_first=True)
            with torch.no_grad():
                self.attn.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
                self.attn.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
                self.attn.out_proj.weight.copy_(attn.proj.weight)
                self.attn.out_proj.bias.copy_(attn.proj.bias)

        def forward(self, x):
            h = self.norm1(x)
            # unpacked: the recipes accept an attention call only when its weights output is unused
            a, _ = self.attn(h, h, h, need_weights=False)
            x = x + a
            return x + self.mlp(self.norm2(x))

    class FxViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = vit.patch_embed
            with torch.no_grad():
                tokens = vit.pos_embed.clone()
                tokens[:, :1] += vit.cls_token
            self.tokens = nn.Parameter(tokens)
            self.blocks = nn.Sequential(*(Block(b) for b in vit.blocks))
            self.norm, self.head = vit.norm, vit.head

        def embed(self, pixels, tokens):
            x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
            return torch.cat([x[:, :1] * 0.0, x], dim=1) + tokens

        def classify(self, x):
            return self.head(self.norm(self.blocks(x))[:, :1].flatten(1))

    class ConstantViT(FxViT):
        def forward(self, pixels):
            return self.classify(self.embed(pixels, self.tokens))

    class TokensInputViT(FxViT):
        def forward(self, pixels, tokens):
            return self.classify(self.embed(pixels, tokens))

    return (TokensInputViT if tokens_as_input else ConstantViT)().eval()


def _quantizer_class():
    torch = _torch()
    from torch import nn

    class Quantizer(nn.Module):
        """SpikeZIP-TF's quantizer as SpikingJelly's recipe reads it (``s``, ``sym``, ``pos_max``,
        ``neg_min``, ``level``): round half up, as its ST-BIF neuron's 0.5 initial residue does. While
        ``observed`` is a list the module passes its input through and records it for calibration."""

        def __init__(self, levels: int) -> None:
            super().__init__()
            self.level = levels
            self.sym = True
            self.s = nn.Parameter(torch.tensor(1.0))
            self.register_buffer("pos_max", torch.tensor(float(levels // 2 - 1)))
            self.register_buffer("neg_min", torch.tensor(float(-(levels // 2))))
            self.observed: list | None = None

        def forward(self, x):
            if self.observed is not None:
                self.observed.append(x.detach().flatten())
                return x
            return torch.clamp(torch.floor(x / self.s + 0.5), float(self.neg_min), float(self.pos_max)) * self.s

        def calibrate(self) -> None:
            """Levels split between the signs in proportion to the observed range, then the scale of
            least squared error over a grid of clips of the range."""
            x = torch.cat(self.observed)
            self.observed = None
            lo, hi = float(x.min()), float(x.max())
            x = x[:: max(1, len(x) // 65536)]  # the error of a clip: a strided sample of the values suffices
            negative = 0 if lo >= 0 else min(self.level - 1, max(1, round(self.level * -lo / (hi - lo))))
            self.sym = negative == self.level // 2
            self.neg_min.fill_(-negative)
            high = self.level - 1 - negative
            self.pos_max.fill_(high)
            full = max(hi / max(high, 1), -lo / negative if negative else 0.0, 1e-8)

            def error(scale: float) -> float:
                return float(torch.mean((torch.clamp(torch.floor(x / scale + 0.5), -negative, high) * scale - x) ** 2))

            with torch.no_grad():
                self.s.fill_(min((full * c for c in np.linspace(0.1, 1.0, 46)), key=error))

    return Quantizer


def qvit(vit, levels: int, calibration: np.ndarray):
    """The digits ViT as SpikeZIP-TF's QANN in the module layout ``SpikeZIPTFQANNRecipe(model_family="vit")``
    converts: fused ``qkv``, quantizers after every LayerNorm and weight product and around the GELU
    (the paper's placement, GELU kept), calibrated per tensor on ``calibration``."""
    torch = _torch()
    from torch import nn

    Quantizer = _quantizer_class()

    class Attention(nn.Module):
        def __init__(self, attn) -> None:
            super().__init__()
            dim = attn.q.in_features
            self.num_heads, self.head_dim, self.scale = attn.heads, dim // attn.heads, attn.scale
            self.qkv = nn.Linear(dim, 3 * dim)
            with torch.no_grad():
                self.qkv.weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
                self.qkv.bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
            self.proj = attn.proj
            self.quan_q, self.quan_k, self.quan_v = Quantizer(levels), Quantizer(levels), Quantizer(levels)
            self.attn_quan, self.after_attn_quan, self.quan_proj = (
                Quantizer(levels),
                Quantizer(levels),
                Quantizer(levels),
            )
            self.attn_drop, self.proj_drop = nn.Identity(), nn.Identity()

        def forward(self, x):
            # the order of SpikeZIPViTSelfAttention: quantize q, k, v, then scale q
            b, n, c = x.shape
            q, k, v = (
                self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).movedim(-3, 0).transpose(-3, -2).unbind(0)
            )
            q, k, v = self.quan_q(q), self.quan_k(k), self.quan_v(v)
            attention = self.attn_quan(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            context = self.after_attn_quan(attention @ v).transpose(-3, -2).reshape(b, n, c)
            return self.quan_proj(self.proj(context))

    class Block(nn.Module):
        def __init__(self, block) -> None:
            super().__init__()
            fc1, gelu, fc2 = block.mlp
            self.norm1, self.quan_norm1, self.attn = block.norm1, Quantizer(levels), Attention(block.attn)
            self.norm2, self.quan_norm2 = block.norm2, Quantizer(levels)
            self.mlp = nn.Sequential(fc1, Quantizer(levels), gelu, Quantizer(levels), fc2, Quantizer(levels))

        def forward(self, x):
            x = x + self.attn(self.quan_norm1(self.norm1(x)))
            return x + self.mlp(self.quan_norm2(self.norm2(x)))

    class QViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
            self.blocks = nn.Sequential(*(Block(b) for b in vit.blocks))
            self.norm, self.head = vit.norm, vit.head

        def forward(self, pixels):
            x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    # shares the ViT's modules: calibration sets only the quantizers, and the recipe converts a copy
    model = QViT().eval()
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    for m in quantizers:
        m.observed = []
    with torch.no_grad():
        model(torch.from_numpy(calibration))
    for m in quantizers:
        m.calibrate()
    return model


# --------------------------------------------------------------------------------------------------
# Running SpikingJelly's SNNs
# --------------------------------------------------------------------------------------------------


def _first_step_only(x, timesteps: int):
    """The input as SpikingJelly's examples feed a converted model: real at step 0, zero after."""
    torch = _torch()
    seq = torch.zeros((timesteps, *x.shape), dtype=x.dtype)
    seq[0] = x
    return seq


class SJModel:
    """A converted SpikingJelly model: ``steps(pixels)`` the [T, B, classes] outputs of each step in
    multi-step mode, ``__call__`` their sum (the SNN's output), ``single`` the same sum from T calls
    in single-step mode (a step's tensors only; faster than multi-step for some recipes on CPU)."""

    def __init__(self, converted, timesteps: int, tokens=None) -> None:
        from spikingjelly.activation_based import functional

        self.model, self.timesteps, self.tokens, self.functional = converted.eval(), timesteps, tokens, functional

    def _inputs(self, pixels: np.ndarray) -> list:
        x = _torch().from_numpy(pixels)
        return [x] if self.tokens is None else [x, self.tokens.expand(len(x), -1, -1)]

    def steps(self, pixels: np.ndarray):
        torch = _torch()
        self.functional.set_step_mode(self.model, "m")
        self.functional.reset_net(self.model)
        with torch.no_grad():
            return self.model(*(_first_step_only(x, self.timesteps) for x in self._inputs(pixels)))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.steps(pixels).sum(0).numpy()

    def single(self, pixels: np.ndarray) -> np.ndarray:
        torch = _torch()
        self.functional.set_step_mode(self.model, "s")
        self.functional.reset_net(self.model)
        first = self._inputs(pixels)
        rest = [torch.zeros_like(x) for x in first]
        with torch.no_grad():
            out = self.model(*first)
            for _ in range(self.timesteps - 1):
                out = out + self.model(*rest)
        return out.numpy()


def sj_spikezip(qann, timesteps: int) -> tuple[SJModel, list]:
    """SpikeZIPTFQANNRecipe's SNN of ``qann`` (GELU swapped for TDGELU) and its ST-BIF neurons."""
    from spikingjelly.activation_based.ann2snn import ModuleConverter, SpikeZIPTFQANNRecipe
    from spikingjelly.activation_based.ann2snn.operators import TDGELU
    from spikingjelly.activation_based.neuron import STBIFNode
    from torch import nn

    converted = ModuleConverter(
        recipe=SpikeZIPTFQANNRecipe(time_steps=timesteps, model_family="vit"), device="cpu"
    ).convert(qann)
    for block in converted.blocks:
        block.mlp[2] = TDGELU(approximate=block.mlp[2].approximate)
    assert not any(isinstance(m, nn.GELU) for m in converted.modules())
    return SJModel(converted, timesteps), [m for m in converted.modules() if isinstance(m, STBIFNode)]


def sj_equilibrium(model: SJModel, neurons: list, pixels: np.ndarray) -> tuple[np.ndarray, list[int | None]]:
    """The SNN's output and T_eq per sample, as spikec's equilibrium_steps counts it: the last step at
    which any ST-BIF neuron of the sample fired (None: still firing at the last step)."""
    torch = _torch()
    fired = torch.zeros(model.timesteps, len(pixels), dtype=torch.bool)

    def hook(module, inputs, output):
        nonlocal fired
        fired |= output.reshape(output.shape[0], output.shape[1], -1).ne(0).any(-1)

    handles = [m.register_forward_hook(hook) for m in neurons]
    try:
        out = model.steps(pixels).sum(0).numpy()
    finally:
        for h in handles:
            h.remove()
    return out, equilibrium_steps(fired.numpy().astype(np.int64))


def in_batches(fn: Callable[[np.ndarray], object], x: np.ndarray, size: int) -> list:
    return [fn(x[i : i + size]) for i in range(0, len(x), size)]


# --------------------------------------------------------------------------------------------------
# spikec
# --------------------------------------------------------------------------------------------------


def spikec_sessions(model) -> dict[str, InferenceSession]:
    # pool threads that sleep between ops: spinning ones of one session would take the 2 cores from the
    # next call interleaved
    portable, native = session_pair(model, THREADS, "never")
    return {"native": native, "portable": portable}


# --------------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------------


def against(reference: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict:
    per_sample = np.abs(out - reference).max(axis=1)
    scale = float(np.abs(reference).max())
    return {
        "accuracy": fixtures.accuracy(out, labels),
        "top1_agreement": float(np.mean(out.argmax(1) == reference.argmax(1))),
        "cosine": cosine(reference, out),
        "max_abs_error": float(per_sample.max()),
        "equal_samples": int(np.sum(per_sample <= EXACT * scale)),
    }


def timing(sj: SJModel, sessions: Mapping[str, InferenceSession], batch: np.ndarray, reps: int) -> dict:
    """Interleaved times of SpikingJelly (both step modes) and spikec (native, portable); the ratios
    are against SpikingJelly's faster mode here."""
    feeds = {"pixels": batch}
    calls = {
        "sj_multi": lambda: sj(batch),
        "sj_single": lambda: sj.single(batch),
        "native": lambda: run(sessions["native"], feeds),
        "portable": lambda: run(sessions["portable"], feeds),
    }
    samples = measure(calls, reps=reps, warmup=1, min_sample_ms=30.0)
    fast = min(("sj_multi", "sj_single"), key=lambda name: statistics.median(samples[name]))
    ms = {name: statistics.median(v) / len(batch) for name, v in samples.items()}
    return {
        **{f"{name}_ms_per_sample": v for name, v in ms.items()},
        "sj_mode": "multi-step" if fast == "sj_multi" else "single-step",
        "native_over_sj": median_ratio(samples, "native", fast),
        "portable_over_sj": median_ratio(samples, "portable", fast),
        "portable_over_native": median_ratio(samples, "portable", "native"),
    }


def spikezip(data: dict, vit, ann_onnx, args, log: Console) -> dict:
    torch = _torch()
    t, x, y = args.spikezip_timesteps, data["x_test"], data["y_test"]
    calibration = data["x_train"][: args.calibration]
    log.print(f"[dim]SpikeZIP-TF: SpikingJelly QANN + recipe, T={t}[/dim]")
    qann = qvit(vit, args.levels, calibration)
    with torch.no_grad():
        sj_qann_out = np.concatenate(in_batches(lambda b: qann(torch.from_numpy(b)).numpy(), x, 135))
    sj_snn, neurons = sj_spikezip(qann, t)
    runs = in_batches(lambda b: sj_equilibrium(sj_snn, neurons, b), x, 135)
    sj_out = np.concatenate([r[0] for r in runs])
    sj_teq = [v for r in runs for v in r[1]]

    log.print(f"[dim]SpikeZIP-TF: spikec quantize + compile, T={t}[/dim]")
    spikec_qann = spikec.quantize(ann_onnx, {"pixels": calibration}, levels=args.levels, progress=False)
    snn_model = spikec.compile(spikec_qann, {"pixels": calibration}, method="spikezip", timesteps=t, progress=False)
    qann_session = InferenceSession(spikec_qann, session_options(THREADS, "never"), native=False)
    spikec_qann_out = run_dataset(qann_session, {"pixels": x}, batch_size=135)["logits"]
    sessions = spikec_sessions(snn_model)
    out = run_dataset(sessions["native"], {"pixels": x}, batch_size=135)
    spikec_teq = equilibrium_steps(out["spikec.spikes.steps"])

    def side(qann_out, snn_out, teq):
        reached = [v for v in teq or [] if v is not None]
        return {
            "qann_accuracy": fixtures.accuracy(qann_out, y),
            "snn_vs_qann": against(qann_out, snn_out, y),
            "t_eq_reached": None if teq is None else len(reached),
            "t_eq_max": max(reached, default=None),
            "t_eq_mean": float(np.mean(reached)) if reached else None,
        }

    batch = x[: args.batch]
    feeds = {"pixels": batch}
    portable_diff = float(
        np.abs(run(sessions["portable"], feeds)["logits"] - run(sessions["native"], feeds)["logits"]).max()
    )
    log.print("[dim]SpikeZIP-TF: timing[/dim]")
    times = timing(sj_snn, sessions, batch, args.reps)
    return {
        "method": "SpikeZIP-TF",
        "T": t,
        "levels": args.levels,
        "samples": len(x),
        "spikingjelly": side(sj_qann_out, sj_out, sj_teq),
        # T_eq is read from the multi-step run's neurons only
        "spikingjelly_single": side(sj_qann_out, np.concatenate(in_batches(sj_snn.single, x, 135)), None),
        "spikec": side(spikec_qann_out, out["logits"], spikec_teq),
        "spikec_native_vs_portable_max_abs": portable_diff,
        **times,
    }


def mean_semantics(method: str, data: dict, vit, ann_onnx, float_out: np.ndarray, args, log: Console) -> dict:
    """STA or ECMT against SpikingJelly's STA or TD-equivalent recipe at --timesteps, both against the
    float ANN."""
    torch = _torch()
    from spikingjelly.activation_based.ann2snn import Converter, STATransformerRecipe, TransformerTDEquivalentRecipe

    t, x, y = args.timesteps, data["x_test"], data["y_test"]
    calibration = data["x_train"][: args.calibration]
    log.print(f"[dim]{method}: SpikingJelly recipe, T={t}[/dim]")
    if method == "sta":
        recipe = STATransformerRecipe(
            dataloader=[torch.from_numpy(calibration)], time_steps=t, mode="spiking_encoder", show_progress=False
        )
        fx_model, tokens = fx_vit(vit, tokens_as_input=False), None
    else:
        recipe = TransformerTDEquivalentRecipe(time_steps=t)
        fx_model = fx_vit(vit, tokens_as_input=True)
        tokens = fx_model.tokens.detach()
    with torch.no_grad():
        args_ = (torch.from_numpy(x),) if tokens is None else (torch.from_numpy(x), tokens.expand(len(x), -1, -1))
        rewrite_error = float(np.abs(fx_model(*args_).numpy() - float_out).max())
    sj_snn = SJModel(Converter(recipe=recipe, device="cpu").convert(fx_model), t, tokens)
    sj_out = np.concatenate(in_batches(sj_snn, x, 135))

    log.print(f"[dim]{method}: spikec compile, T={t}[/dim]")
    model = spikec.compile(ann_onnx, {"pixels": calibration}, method=method, timesteps=t, progress=False)
    sessions = spikec_sessions(model)
    out = run_dataset(sessions["native"], {"pixels": x}, batch_size=135)["logits"]
    batch = x[: args.batch]
    feeds = {"pixels": batch}
    portable_diff = float(
        np.abs(run(sessions["portable"], feeds)["logits"] - run(sessions["native"], feeds)["logits"]).max()
    )
    log.print(f"[dim]{method}: timing[/dim]")
    times = timing(sj_snn, sessions, batch, args.reps)
    return {
        "method": "STA" if method == "sta" else "ECMT (SJ: TD-equivalent stand-in)",
        "T": t,
        "spikingjelly_recipe": "STATransformerRecipe(spiking_encoder)"
        if method == "sta"
        else "TransformerTDEquivalentRecipe",
        "sj_rewrite_max_abs": rewrite_error,
        "spikingjelly": against(float_out, sj_out, y),
        "spikingjelly_single": against(float_out, np.concatenate(in_batches(sj_snn.single, x, 135)), y),
        "spikec": against(float_out, out, y),
        "spikec_native_vs_portable_max_abs": portable_diff,
        **times,
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def fidelity_tables(rows: list[dict], ann_accuracy: float) -> list[Table]:
    tables = [spikezip_table(r) for r in rows if r["method"] == "SpikeZIP-TF"]
    if any(r["method"] != "SpikeZIP-TF" for r in rows):
        tables.append(mean_table(rows, ann_accuracy))
    return tables


def spikezip_table(z: dict) -> Table:
    sz = Table(box=box.MARKDOWN, title=f"SpikeZIP-TF, {z['levels']} levels, T={z['T']}: SNN against its own QANN")
    for h in ("", "QANN acc", "SNN acc", "SNN = QANN (samples)", "max |SNN-QANN|", "T_eq reached", "T_eq max / mean"):
        sz.add_column(h, justify="left" if not h else "right", no_wrap=True)
    for name in ("spikec", "spikingjelly", "spikingjelly_single"):
        s = z[name]
        sz.add_row(
            {"spikingjelly": "SJ multi-step", "spikingjelly_single": "SJ single-step"}.get(name, name),
            f"{100 * s['qann_accuracy']:.2f} %",
            f"{100 * s['snn_vs_qann']['accuracy']:.2f} %",
            f"{s['snn_vs_qann']['equal_samples']} / {z['samples']}",
            f"{s['snn_vs_qann']['max_abs_error']:.1e}",
            "-" if s["t_eq_reached"] is None else f"{s['t_eq_reached']} / {z['samples']}",
            "-" if s["t_eq_max"] is None else f"{s['t_eq_max']} / {s['t_eq_mean']:.1f}",
        )
    return sz


def mean_table(rows: list[dict], ann_accuracy: float) -> Table:
    mean = Table(box=box.MARKDOWN, title=f"against the float ANN ({100 * ann_accuracy:.2f} %)")
    for h in ("method", "T", "side", "accuracy", "top-1 = ANN", "logit cosine"):
        mean.add_column(h, justify="left" if h in ("method", "side") else "right", no_wrap=True)
    for r in rows:
        if r["method"] == "SpikeZIP-TF":
            continue
        for name in ("spikec", "spikingjelly", "spikingjelly_single"):
            s = r[name]
            mean.add_row(
                r["method"] if name == "spikec" else r["spikingjelly_recipe"],
                str(r["T"]),
                {"spikingjelly": "SJ multi-step", "spikingjelly_single": "SJ single-step"}.get(name, name),
                f"{100 * s['accuracy']:.2f} %",
                f"{100 * s['top1_agreement']:.1f} %",
                f"{s['cosine']:.5f}",
            )
    return mean


def time_table(rows: list[dict], batch: int, reps: int) -> Table:
    t = Table(
        box=box.MARKDOWN,
        title=f"ms per sample (batch {batch}, median of {reps} interleaved repetitions); SJ = SpikingJelly's "
        "faster step mode",
    )
    for h in (
        "method",
        "T",
        "SJ multi-step",
        "SJ single-step",
        "spikec native",
        "spikec portable",
        "native / SJ",
        "portable / SJ",
        "portable / native",
    ):
        t.add_column(h, justify="left" if h == "method" else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["method"],
            str(r["T"]),
            f"{r['sj_multi_ms_per_sample']:.2f}",
            f"{r['sj_single_ms_per_sample']:.2f}",
            f"{r['native_ms_per_sample']:.2f}",
            f"{r['portable_ms_per_sample']:.2f}",
            f"{r['native_over_sj']:.2f}",
            f"{r['portable_over_sj']:.2f}",
            f"{r['portable_over_native']:.2f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=16, help="T of STA and ECMT")
    parser.add_argument("--spikezip-timesteps", type=int, default=32, help="T of SpikeZIP-TF (>= T_eq)")
    parser.add_argument("--levels", type=int, default=16, help="SpikeZIP-TF quantization levels")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64, help="test images per timed call")
    parser.add_argument("--calibration", type=int, default=256, help="training images to calibrate on")
    parser.add_argument("--method", nargs="+", choices=["spikezip", "sta", "ecmt"], default=["spikezip", "sta", "ecmt"])
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    out, log = Console(soft_wrap=True, highlight=False, width=220), Console(stderr=True)
    try:
        import spikingjelly
    except ImportError:
        log.print("spikingjelly not installed: see this script's docstring")
        return 1
    if not native.available():
        log.print("native library not built: run `make native`")
        return 1
    torch = _torch()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    data = fixtures.digits_data()
    vit, ann_onnx = fixtures.digits_vit_torch(), fixtures.digits_vit()
    with torch.no_grad():
        float_out = vit(torch.from_numpy(data["x_test"])).numpy()
    ann_accuracy = fixtures.accuracy(float_out, data["y_test"])
    rows = []
    for method in args.method:
        rows.append(
            spikezip(data, vit, ann_onnx, args, log)
            if method == "spikezip"
            else mean_semantics(method, data, vit, ann_onnx, float_out, args, log)
        )
        gc.collect()
    out.print(
        f"spikec vs SpikingJelly {spikingjelly.__version__ if hasattr(spikingjelly, '__version__') else '2.0'} "
        f"on the digits ViT: torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads each "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, onnxruntime spinning off), "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load {os.getloadavg()[0]:.2f} at the end"
    )
    for table in [*fidelity_tables(rows, ann_accuracy), time_table(rows, args.batch, args.reps)]:
        out.print()
        out.print(table)
    for r in rows:
        out.print(
            f"{r['method']}: max |native - portable| logits {r['spikec_native_vs_portable_max_abs']:.1e}"
            + (f"; SJ rewrite vs the ViT {r['sj_rewrite_max_abs']:.1e}" if "sj_rewrite_max_abs" in r else "")
        )
    out.print(f"wall {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ann_accuracy": ann_accuracy, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
