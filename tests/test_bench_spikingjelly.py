"""benchmarks/bench_spikingjelly.py's own models, which SpikingJelly converts: the rewrites of the digits
ViT compute the same function, and the SpikeZIP-TF QANN written for it quantizes as its recipe reads it.
None of this needs SpikingJelly."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_spikingjelly as bench  # noqa: E402
from examples import fixtures  # noqa: E402

LEVELS = 16


@pytest.fixture(scope="module")
def digits():
    # one thread: these models are small, and OpenMP barriers stall when another job holds a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fixtures.digits_data(), fixtures.digits_vit_torch()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tokens_as_input", [False, True])
def test_fx_rewrite_computes_the_digits_vit(digits, tokens_as_input):
    data, vit = digits
    x = torch.from_numpy(data["x_test"][:32])
    model = bench.fx_vit(vit, tokens_as_input)
    with torch.no_grad():
        want = vit(x).numpy()
        got = model(x, model.tokens.expand(len(x), -1, -1)) if tokens_as_input else model(x)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)


def test_qann_quantizes_at_its_levels_and_keeps_the_accuracy(digits):
    data, vit = digits
    qann = bench.qvit(vit, LEVELS, data["x_train"][:256])
    quantizers = [m for m in qann.modules() if hasattr(m, "pos_max")]
    assert len(quantizers) == 4 * 11  # per block: 2 LayerNorm outputs, 6 in the attention, 3 in the MLP
    for m in quantizers:
        assert m.observed is None and m.s.item() > 0
        assert float(m.pos_max) - float(m.neg_min) + 1 == LEVELS
    for block in qann.blocks:
        assert float(block.attn.attn_quan.neg_min) == 0  # softmax outputs: all levels positive
    # every quantizer's output is a whole number of its steps within its levels
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, o))) for m in quantizers]
    x = torch.from_numpy(data["x_test"])
    with torch.no_grad():
        qann_out = qann(x).numpy()
        float_out = vit(x).numpy()
    for h in hooks:
        h.remove()
    for m, out in seen:
        steps = out / m.s
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.min() >= float(m.neg_min) - 1e-3 and steps.max() <= float(m.pos_max) + 1e-3
    assert fixtures.accuracy(qann_out, data["y_test"]) >= fixtures.accuracy(float_out, data["y_test"]) - 0.03
