"""The memory guard of the time-unrolled form (spikec/memory.py) and `--memory-budget`."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from spikec.passes.canonicalize import canonicalize
from spikec.passes.loader import load_model
from spikec.runtime import InferenceSession, run

import spikec
from examples import fixtures
from spikec import memory
from spikec.cli import main

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`


@pytest.fixture(scope="module")
def vit():
    return fixtures.digits_vit(), {"pixels": fixtures.digits_data()["x_train"][:8]}


@pytest.fixture(scope="module")
def bert():
    return fixtures.random_transformer("bert"), fixtures.random_inputs("bert", batch=4)


def _estimate(model, feeds, batch=32) -> memory.MemoryEstimate:
    return memory.estimate(canonicalize(load_model(model)), feeds, batch=batch)


def test_tiny_budget_refuses_unrolled_and_names_stateful(vit):
    model, feeds = vit
    with pytest.raises(spikec.SpikecError) as info:
        spikec.compile(model, feeds, timesteps=8, progress=False, memory_budget=64 * 2**10)
    message = str(info.value)
    assert "\n" not in message
    for part in ("timesteps=8", "needs an estimated", "memory budget of 64 KiB", "--mode stateful",
                 "--timesteps", "--batch-size"):
        assert part in message, (part, message)
    # the same budget: the stateful form compiles (its memory does not grow with T) and runs
    snn = spikec.compile(model, feeds, timesteps=8, mode="stateful", progress=False, memory_budget=64 * 2**10)
    out = run(InferenceSession(snn), feeds)
    assert out["logits.steps"].shape == (8, 8, 10) and np.isfinite(out["logits"]).all()


def test_absurd_timesteps_get_the_estimate(bert):
    model, feeds = bert
    with pytest.raises(spikec.SpikecError, match=r"timesteps=100000: .*needs an estimated [0-9.]+ (GiB|TiB)"):
        spikec.compile(model, feeds, timesteps=100000, progress=False)
    # ... and compile in stateful mode, where T only sets the default number of steps
    snn = spikec.compile(model, feeds, timesteps=100000, mode="stateful", progress=False)
    assert dict((p.key, p.value) for p in snn.metadata_props)["spikec.timesteps"] == "100000"


def test_estimate_grows_linearly_with_timesteps_and_batch(bert):
    model, feeds = bert
    est = _estimate(model, feeds)
    step = est.unrolled(2) - est.unrolled(1)
    assert step > 0 and est.unrolled(64) - est.unrolled(32) == 32 * step
    assert est.stateful() < est.unrolled(2)
    small = _estimate(model, feeds, batch=4)
    assert 7 * small.live < est.live <= 8 * small.live + 2**20


def test_estimate_covers_the_real_activations(bert):
    """Sequence length comes from the calibration data: the estimate must cover the largest
    intermediate tensor onnxruntime actually produces at that batch and length."""
    model, feeds = bert
    for seq in (16, 48):
        data = {k: np.tile(v, (2, seq // v.shape[1] + 1))[:8, :seq] for k, v in feeds.items()}
        est = _estimate(model, data, batch=8)
        ann = onnx.load(model)
        ann.graph.output.extend(onnx.ValueInfoProto(name=o) for n in ann.graph.node for o in n.output
                                if o and o not in {x.name for x in ann.graph.output})
        session = ort.InferenceSession(ann.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, data)
        biggest = max(o.nbytes for o in outputs if isinstance(o, np.ndarray))
        assert biggest <= est.largest <= est.live
        assert est.batch == 8


@pytest.mark.parametrize("value, expected", [(1024, 1024), ("1K", 1024), ("1.5G", int(1.5 * 2**30)),
                                             ("2GB", 2 * 10**9), ("8GiB", 8 * 2**30), ("3e9", 3 * 10**9)])
def test_parse_budget(value, expected):
    assert memory.parse_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1", "0", "1X", 0, -5, True, float("nan")])
def test_bad_budget(value):
    with pytest.raises(spikec.SpikecError, match=r"memory_budget"):
        memory.parse_budget(value)


def test_default_budget_is_80_percent_of_ram():
    total = memory.physical_memory()
    assert total and memory.parse_budget(None) == int(total * 0.8)


def test_cli_memory_budget(vit, tmp_path, capfd):
    model, feeds = vit
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds)
    out = tmp_path / "snn.onnx"
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--memory-budget", "64K",
                 "--quiet"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spikec: error: argument timesteps=8")
    assert "--mode stateful" in err and not out.exists()
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--memory-budget", "lots",
                 "--quiet"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "memory_budget='lots'" in err
    assert main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--memory-budget", "64K",
                 "--mode", "stateful", "--quiet"]) == 0
    assert out.exists()


def test_sta_ugo_states_count_n_per_element(vit):
    """An STA UGO keeps N hidden neurons' states per GELU element: the stateful estimate counts them."""
    import onnx_graphsurgeon as gs
    from spikec.passes import sta
    from spikec.passes.patterns import find_regions

    model, feeds = vit
    ann = canonicalize(load_model(model))
    regions = find_regions(gs.import_onnx(ann))
    options = sta.STAOptions()
    sites, hidden = sta.calibration_taps(regions, options), sta.hidden_sizes(regions, options)
    assert sorted(set(hidden.values())) == [32] and len(hidden) == 4
    plain = memory.estimate(ann, feeds, batch=64, neuron_sites=sites)
    counted = memory.estimate(ann, feeds, batch=64, neuron_sites=sites, hidden=hidden)
    gelu_elements = 64 * 17 * 128  # batch x tokens x MLP width, per GELU
    assert counted.states - plain.states == 4 * 4 * gelu_elements * (32 - 1) * 4
