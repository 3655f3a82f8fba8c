"""benchmarks/torch_reference.py, the PyTorch loop the speed benchmarks time spikec against: it runs every
method's stateful model (each spikec step op written in torch) to onnxruntime's result."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spikec.runtime import InferenceSession, run  # noqa: E402

import spikec  # noqa: E402
from benchmarks.torch_reference import TorchStepSimulator  # noqa: E402
from examples import fixtures  # noqa: E402
from spikec.evaluate import cosine  # noqa: E402

T = 6


@pytest.mark.parametrize("method", ["ecmt", "spikezip", "sta"])
def test_simulator_runs_the_stateful_model_as_onnxruntime_does(method):
    data = fixtures.digits_data()
    stateful = spikec.compile(
        fixtures.digits_vit(),
        {"pixels": data["x_train"][:64]},
        method=method,
        timesteps=T,
        mode="stateful",
        progress=False,
    )
    batch = {"pixels": data["x_test"][:16]}
    want = run(InferenceSession(stateful), batch)["logits"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = TorchStepSimulator(stateful).run(batch, timesteps=T)["logits"]
    finally:
        torch.set_num_threads(threads)
    assert got.shape == want.shape == (16, 10)
    # torch sums its products in another order than onnxruntime: a spike at a threshold may flip
    assert cosine(got, want) >= 0.999
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 15 / 16
