"""Tests for the offline model/data zoo (examples/fixtures.py).

First run on a fresh cache trains the digits ViT (~20 s on 2 idle cores) and
exports MiniLM (~5 s); later runs hit the cache.
"""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from examples import fixtures

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _signature(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*graph.input, *graph.output]
    }


def test_digits_split():
    data = fixtures.digits_data()
    assert data["x_train"].shape == (1257, 1, 8, 8) and data["x_test"].shape == (540, 1, 8, 8)
    assert data["x_train"].dtype == np.float32 and data["y_test"].dtype == np.int64
    # Standardised with train statistics.
    assert abs(data["x_train"].mean()) < 1e-4 and abs(data["x_train"].std() - 1) < 1e-4
    # Stratified: every class present in the test split in near-equal numbers.
    assert np.bincount(data["y_test"]).min() >= 50


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("torchscript", 14), ("dynamo", 17)])
def test_digits_vit_onnx_accuracy(exporter, opset):
    path = fixtures.digits_vit(opset=opset, exporter=exporter)
    assert _signature(path) == {"pixels": ["batch", 1, 8, 8], "logits": ["batch", 10]}
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    # opset 17 keeps LayerNormalization fused; opset 14 decomposes it.
    assert ("LayerNormalization" in ops) == (opset >= 17)
    data = fixtures.digits_data()
    (logits,) = _run(path, {"pixels": data["x_test"]})  # batch 540 != export batch 2
    assert fixtures.accuracy(logits, data["y_test"]) >= 0.965


def test_minilm_matches_sentence_transformers():
    # all sentences fit in 32 tokens, so padding to 32 changes nothing and the
    # ONNX graph must reproduce the full SentenceTransformer pipeline
    # (BERT -> mean pooling -> L2 normalise); measured max abs diff ~2e-7.
    sentences = fixtures.evaluation_sentences()[:8]
    reference = fixtures.minilm_sentence_transformer().encode(sentences, convert_to_numpy=True)
    path = fixtures.minilm()
    assert _signature(path) == {
        "input_ids": ["batch", "seq"],
        "attention_mask": ["batch", "seq"],
        "sentence_embedding": ["batch", 384],
    }
    (embedding,) = _run(path, fixtures.minilm_inputs(sentences, seq_len=32))
    cosine = (embedding * reference).sum(1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(embedding, reference, atol=1e-5)


def test_sentence_sets():
    calibration, evaluation = fixtures.calibration_sentences(), fixtures.evaluation_sentences()
    assert len(calibration) == 128 and len(evaluation) == 64
    assert len(set(calibration)) == 128 and len(set(evaluation)) == 64
    assert not set(calibration) & set(evaluation)
    assert all(5 <= len(s.split()) <= 20 and s.endswith(".") for s in calibration + evaluation)
    assert calibration == fixtures.calibration_sentences()  # deterministic
    lengths = fixtures.minilm_inputs(calibration + evaluation, seq_len=32)["attention_mask"].sum(1)
    assert lengths.max() <= 32 and lengths.min() >= 5


def test_sentence_pools_do_not_depend_on_import_order():
    # torch replaces inspect.getfile when imported: a process that asks for sentences before importing torch
    # must get the same ones as one that imported it first (one sentence fewer reshuffles every set).
    count = 2600
    script = f"from examples import fixtures; print(repr(fixtures.training_sentences({count})))"

    def sentences(first: str) -> list[str]:
        run = subprocess.run([sys.executable, "-c", first + script], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        return ast.literal_eval(run.stdout)

    training = sentences("import torch; ")
    assert sentences("import sys; assert 'torch' not in sys.modules; ") == training
    assert training[:128] == fixtures.calibration_sentences()
    assert len(set(training)) == count
    others = {*fixtures.evaluation_sentences(), *fixtures.heldout_sentences(), *fixtures.written_sentences()}
    assert not set(training) & others


_RANDOM_OUTPUTS = {
    "bert": {"last_hidden_state": (3, 16, 64), "pooler_output": (3, 64)},
    "gpt2": {"last_hidden_state": (3, 16, 64)},
    "vit": {"last_hidden_state": (3, 65, 64), "pooler_output": (3, 64)},  # 8x8 patches + cls
    "deit": {"last_hidden_state": (3, 66, 64), "pooler_output": (3, 64)},  # + distillation token
    "swin": {"last_hidden_state": (3, 64, 64), "pooler_output": (3, 64)},  # 8x8 tokens after merge
}


@pytest.mark.parametrize("name", fixtures.RANDOM_MODELS)
def test_random_transformer_outputs(name):
    path = fixtures.random_transformer(name)
    feeds = fixtures.random_inputs(name, batch=3, seed=1)  # export used batch 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(feeds)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert {k: v.shape for k, v in outputs.items()} == _RANDOM_OUTPUTS[name]
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in outputs.values())


def test_gpt2_uses_tanh_gelu():
    graph = onnx.load(str(fixtures.random_transformer("gpt2"))).graph
    ops = [n.op_type for n in graph.node]
    assert "Tanh" in ops and "Pow" in ops and "Erf" not in ops


def test_fixture_npz(tmp_path, monkeypatch):
    monkeypatch.setattr(fixtures, "CACHE_DIR", tmp_path)
    pixels = np.load(fixtures.fixture_npz("digits-eval"))["pixels"]
    labels = np.load(tmp_path / "digits-eval-labels.npz")["labels"]
    assert pixels.shape == (540, 1, 8, 8) and labels.shape == (540,)
    assert np.load(fixtures.fixture_npz("digits-calib"))["pixels"].shape == (256, 1, 8, 8)
    tokens = np.load(fixtures.fixture_npz("minilm-eval"))
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape == (64, 32)
    assert tokens["input_ids"].dtype == np.int64
    # Atomic writes leave no temp files behind (only the finished files + locks).
    written = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")}
    assert written == {"digits-eval.npz", "digits-eval-labels.npz", "digits-calib.npz", "minilm-eval.npz"}
