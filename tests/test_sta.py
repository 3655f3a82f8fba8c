"""STA end to end (passes/sta.py): digits-ViT accuracy vs T, MiniLM cosine vs T, structure, ablation."""

import json

import numpy as np
import onnx
import pytest

import spikec
from examples import fixtures
from spikec.evaluate import cosine, run_dataset

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`


@pytest.fixture(scope="module")
def ann_accuracy(digits):
    return fixtures.accuracy(
        run_dataset(fixtures.digits_vit(), {"pixels": digits["x_test"]})["logits"], digits["y_test"]
    )


def _accuracy_per_t(digits, **options):
    model = spikec.compile(
        fixtures.digits_vit(), {"pixels": digits["x_train"][:256]}, method="sta", progress=False, **options
    )
    steps = run_dataset(model, {"pixels": digits["x_test"]}, batch_size=32)["logits.steps"]
    return model, [fixtures.accuracy(s, digits["y_test"]) for s in steps]


def test_digits_vit_accuracy(digits, ann_accuracy):
    model, accuracy = _accuracy_per_t(digits, timesteps=64)
    # measured: 93.0 % at T=4, 97.59 % from T=7 on, equal to the ANN
    assert accuracy[31] >= ann_accuracy - 0.01 and accuracy[63] >= ann_accuracy - 0.01
    assert accuracy[3] < accuracy[31]
    report = json.loads({p.key: p.value for p in model.metadata_props}["spikec.report"])
    # X2X encoders on qkv, projection and fc1 inputs of 4 blocks and the head's; fc2 reads the GELU UGO
    assert len(report["encoders"]) == 4 * 3 + 1
    ugos = [u["operator"] for u in report["ugos"]]
    # every LayerNorm but one, whose calibration variances span more than the rsqrt UGO's 100:1 domain
    assert ugos.count("gelu") == 4 and ugos.count("rsqrt") == 4 * 2 + 1 - 1
    assert len(report["layernorms_kept_float"]) == 1
    ops = [n.op_type for n in model.graph.node if n.domain == "spikec"]
    # one per X2X encoder (its two IF neurons inside); one UGO op per GELU and rsqrt, its hidden IF
    # neurons inside
    assert ops.count("X2XEncoder") == 13 and ops.count("UGO") == 4 + 8 and "IFNeuron" not in ops
    kept = [n.op_type for n in model.graph.node]
    assert "Erf" not in kept and kept.count("LayerNormalization") == 1
    onnx.checker.check_model(model)


def test_exact_nonlinearities_without_ugos(digits, ann_accuracy):
    """The ablation's "exact nonlinearity": GELU and LayerNorm in float with expectation compensation."""
    model, accuracy = _accuracy_per_t(digits, timesteps=32, ugo=False)
    assert accuracy[31] >= ann_accuracy - 0.005  # measured: equal to the ANN
    assert {"Erf", "LayerNormalization"} <= {n.op_type for n in model.graph.node}
    onnx.checker.check_model(model)


def test_naive_split_is_uneven_early(digits):
    """Def. 2's outputs grow with t, so at small T accuracy collapses; TCSA does not (the ablation)."""
    _, corrected = _accuracy_per_t(digits, timesteps=16)
    _, naive = _accuracy_per_t(digits, timesteps=16, tcsa=False)
    # measured: 0.97 vs 0.68 at t=8 (0.96 vs 0.10 while the IF neurons kept membrane and emitted total in
    # float spike values: their rounding over the naive split's growing inputs had cost more)
    assert corrected[7] > naive[7] + 0.2
    assert naive[15] > naive[7]


def test_minilm_cosine_grows_with_t():
    calib = fixtures.minilm_inputs(fixtures.calibration_sentences())
    feeds = fixtures.minilm_inputs(fixtures.evaluation_sentences()[:4])
    reference = run_dataset(fixtures.minilm(), feeds)["sentence_embedding"]
    model = spikec.compile(fixtures.minilm(), calib, method="sta", timesteps=32, mode="stateful", progress=False)
    steps = run_dataset(model, feeds)["sentence_embedding.steps"]
    similarity = [cosine(reference, s) for s in steps]
    assert similarity[31] >= 0.95  # measured on 16 sentences: 0.90 (T=16), 0.968 (T=32), 0.985 (T=64)
    assert similarity[31] > similarity[15] > similarity[7]


def test_softmax_decomposition_runs_and_costs_accuracy(digits, ann_accuracy):
    """Appendix D.2 on request: exp and inverse UGOs replace Softmax. Measured: 80 % at T=32 (the clamp
    at the exp UGO's domain top flattens the attention peaks, see passes/sta.py)."""
    model, accuracy = _accuracy_per_t(digits, timesteps=32, softmax_ugo=True)
    assert "Softmax" not in {n.op_type for n in model.graph.node}
    report = json.loads({p.key: p.value for p in model.metadata_props}["spikec.report"])
    assert sum(u["operator"].startswith("softmax") for u in report["ugos"]) == 4
    assert 0.6 < accuracy[31] < ann_accuracy - 0.05


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "deit", "swin"])
def test_random_transformers_convert(name):
    path = fixtures.random_transformer(name)
    calib, feeds = fixtures.random_inputs(name, batch=16, seed=1), fixtures.random_inputs(name, batch=2, seed=0)
    snn = spikec.compile(path, calib, method="sta", timesteps=32, progress=False)
    got = run_dataset(snn, feeds)
    for output, reference in run_dataset(path, feeds).items():
        steps = got[output + ".steps"]
        assert np.isfinite(steps).all()
        # measured 0.93-0.998 (DeiT's tanh pooler is the lowest); with burst spikes of 4 BERT's is 0.9999
        # from step 4 on, so the steps improve on the first one
        assert cosine(reference, steps[-1]) > 0.9 and cosine(reference, steps[-1]) > cosine(reference, steps[0])
