"""Chains of spikec ops fused into one op in a session's copy of a model (runtime/fusion.py): the same bits."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from spikec.runtime import InferenceSession, fusion, native, ops, run

import spikec
from examples import fixtures
from spikec.evaluate import _with_outputs

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`


def test_compose_refuses_ops_sharing_names():
    with pytest.raises(ValueError, match="theta_pos"):
        ops.compose(ops.MT_NEURON, ops.MT_NEURON)


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    data = fixtures.digits_data()
    out = tmp_path_factory.mktemp("fusion")
    for mode in ("unrolled", "stateful"):
        spikec.compile(
            fixtures.digits_vit(),
            {"pixels": data["x_train"][:256]},
            out / f"{mode}.onnx",
            timesteps=4,
            mode=mode,
            progress=False,
        )
    return out, {"pixels": data["x_test"][:64]}


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("mode", ["unrolled", "stateful"])
def test_fused_sessions_give_the_same_bits(digits_models, mode, native):
    out, feeds = digits_models
    path = out / f"{mode}.onnx"
    fused = fusion.fuse(onnx.load(path))
    kinds = collections.Counter(n.op_type.removesuffix("Step") for n in fused.graph.node if n.domain == ops.DOMAIN)
    # the digits ViT: 19 compensated functions feed a neuron (the attention outputs' past the heads'
    # Transpose and Reshape: timing.sink_compensations), 4 of whose spike values and 12 others are
    # accumulated for products
    assert kinds["ECCompensate_MTNeuron"] == 15 and kinds["ECCompensate_MTNeuron_ECAccumulate"] == 4
    assert kinds["MTNeuron_ECAccumulate"] == 12
    onnx.checker.check_model(fused)
    if native and not InferenceSession(path).native:
        pytest.skip("native library not built")
    want = run(InferenceSession(path, native=native, fuse=False), feeds, 4)
    got = run(InferenceSession(path, native=native), feeds, 4)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.fixture(scope="module")
def spikezip_models():
    data = fixtures.digits_data()
    calib = {"pixels": data["x_train"][:256]}
    qann = spikec.quantize(fixtures.digits_vit(), calib, levels=16, progress=False)
    models = {
        mode: spikec.compile(qann, calib, method="spikezip", timesteps=4, mode=mode, integer=False, progress=False)
        for mode in ("unrolled", "stateful")
    }
    return models, {"pixels": data["x_test"][:32]}


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("mode", ["unrolled", "stateful"])
def test_spikezip_chains_fuse_with_their_spike_counts(spikezip_models, mode, native):
    """ST-BIF+ neurons whose spike values are accumulated fuse with the accumulation, carrying the
    neuron's spike count (T_eq's input) out of the composite: outputs and counts keep their bits."""
    models, feeds = spikezip_models
    model = models[mode]
    kinds = collections.Counter(
        ops.base_name(n.op_type) for n in fusion.fuse(model).graph.node if n.domain == ops.DOMAIN
    )
    # per block: the q, k and v neurons (the accumulators hoisted above the heads' Reshape and Transpose)
    # and the softmax output's (compensated first), accumulated for the attention products (the GELU reads
    # the first MLP product's sum, no neuron); and the logits' neuron, accumulated for the readout
    assert kinds["STBIFNeuron_ECAccumulate"] == 4 * 3 + 1 and kinds["ECCompensate_STBIFNeuron_ECAccumulate"] == 4
    if native and not InferenceSession(model).native:
        pytest.skip("native library not built")
    want = run(InferenceSession(model, native=native, fuse=False), feeds, 4)
    got = run(InferenceSession(model, native=native), feeds, 4)
    assert want.keys() == got.keys() and any(name.startswith("spikec.spikes") for name in want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_chain_whose_middle_is_read_stays_apart(digits_models):
    """Reports add neuron outputs as graph outputs: those chains must keep their middle tensor."""
    out, _ = digits_models
    model = onnx.load(out / "unrolled.onnx")
    producer = {o: n for n in model.graph.node for o in n.output}
    baseline = collections.Counter(n.op_type for n in fusion.fuse(model).graph.node)
    accumulated = next(n for n in fusion.fuse(model).graph.node if n.op_type == "MTNeuron_ECAccumulate")
    spikes = producer[producer[accumulated.output[0]].input[0]].input[0]  # ECAccumulate <- Mul <- MTNeuron
    compensated = next(n for n in fusion.fuse(model).graph.node if n.op_type == "ECCompensate_MTNeuron")
    increments = producer[compensated.output[0]].input[0]  # MTNeuron <- ECCompensate
    fused = fusion.fuse(_with_outputs(model, [spikes, increments]))
    produced = {o for n in fused.graph.node for o in n.output}
    assert spikes in produced and increments in produced
    producers = {o: n.op_type for n in fused.graph.node for o in n.output}
    assert producers[spikes] == "MTNeuron" and producers[increments] == "ECCompensate"
    counts = collections.Counter(n.op_type for n in fused.graph.node)
    assert counts["ECCompensate_MTNeuron"] == baseline["ECCompensate_MTNeuron"] - 1


def test_nothing_to_fuse_returns_the_model():
    model = onnx.load(fixtures.digits_vit())
    assert fusion.fuse(model) is model


def _forced_rows(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as sessions run it, every SpikeMatMul forced onto the kernel's row path."""
    result = fusion.spike_matmuls(fusion.fuse(model), lambda k, n: True)
    for node in result.graph.node:
        if node.op_type == ops.SPIKE_MATMUL:
            node.attribute.append(onnx.helper.make_attribute("dense_above", 1.0))
    return result


@pytest.mark.parametrize("mode", ["unrolled", "stateful"])
def test_products_of_spike_codes_become_spike_matmuls(spikezip_models, digits_models, mode):
    """SpikeZIP-TF's ternary codes reach q, k, v and both MLP layers of each block as SpikeMatMuls (the
    attention projection reads the heads' Reshape, the head is a Gemm); ECMT's multi-level codes do not.
    Summed in another order than MatMul's, the row path's outputs differ by float rounding; where a
    membrane lands within that rounding of a threshold a spike flips (how often depends on the CPU's
    MatMul kernel, so flips are bounded, not forbidden) and moves that sample's later values."""
    models, feeds = spikezip_models
    fused = fusion.fuse(models[mode])
    chosen = fusion.spike_matmuls(fused, lambda k, n: True)
    assert collections.Counter(n.op_type.removesuffix("Step") for n in chosen.graph.node)[ops.SPIKE_MATMUL] == 4 * 5
    onnx.checker.check_model(chosen)
    ecmt = fusion.fuse(onnx.load(digits_models[0] / f"{mode}.onnx"))
    assert fusion.spike_matmuls(ecmt, lambda k, n: True) is ecmt
    if not InferenceSession(models[mode]).native:
        pytest.skip("native library not built")
    # the kernel's cost model: adding rows never pays on the digits ViT's 64 x 64 / 64 x 128 weights (its
    # sessions keep MatMul), it does on MiniLM's
    assert fusion.spike_matmuls(fused, native.spike_matmul_pays) is fused
    assert native.spike_matmul_pays(384, 1536) and native.spike_matmul_pays(1536, 384)
    want = run(InferenceSession(models[mode], native=False), feeds, 4)
    got = run(InferenceSession(_forced_rows(models[mode]), fuse=False), feeds, 4)
    spikes_got, spikes_want = got["spikec.spikes.steps"], want["spikec.spikes.steps"]  # [steps, samples]
    assert spikes_got.shape == spikes_want.shape == (4, len(feeds["pixels"]))
    assert np.abs(spikes_got - spikes_want).sum() <= 1e-4 * spikes_want.sum()
    flipped = (spikes_got != spikes_want).any(axis=0)
    assert flipped.mean() <= 0.25
    scale = np.abs(want["logits"]).max()
    np.testing.assert_allclose(got["logits"][~flipped], want["logits"][~flipped], rtol=0, atol=1e-4 * scale)
    assert np.abs(got["logits"] - want["logits"]).max() <= 0.5 * scale
