"""The memory guard of the time-unrolled form (spikec/memory.py) and `--memory-budget`; compiling with the
weights on disk (runtime/weights.py): external data in and out, and compile memory against the weights."""

from __future__ import annotations

import os
import subprocess
import sys

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data
from spikec.passes.canonicalize import canonicalize
from spikec.passes.loader import load_model
from spikec.runtime import InferenceSession, run, weights
from spikec.runtime.metadata import SpikecMetadata

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
    for part in (
        "timesteps=8",
        "needs an estimated",
        "memory budget of 64 KiB",
        "--mode stateful",
        "--timesteps",
        "--batch-size",
    ):
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
        ann.graph.output.extend(
            onnx.ValueInfoProto(name=o)
            for n in ann.graph.node
            for o in n.output
            if o and o not in {x.name for x in ann.graph.output}
        )
        session = ort.InferenceSession(ann.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, data)
        biggest = max(o.nbytes for o in outputs if isinstance(o, np.ndarray))
        assert biggest <= est.largest <= est.live
        assert est.batch == 8


@pytest.mark.parametrize(
    "value, expected",
    [
        (1024, 1024),
        ("1K", 1024),
        ("1.5G", int(1.5 * 2**30)),
        ("2GB", 2 * 10**9),
        ("8GiB", 8 * 2**30),
        ("3e9", 3 * 10**9),
    ],
)
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
    assert (
        main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--memory-budget", "64K", "--quiet"]) == 2
    )
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spikec: error: argument --timesteps=8")
    assert "over the memory budget of 64 KiB (argument --memory-budget)" in err
    assert "--mode stateful" in err and not out.exists()
    assert (
        main(["compile", str(model), "-o", str(out), "--calib", str(calib), "--memory-budget", "lots", "--quiet"]) == 2
    )
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "argument --memory-budget='lots'" in err
    assert (
        main(
            [
                "compile",
                str(model),
                "-o",
                str(out),
                "--calib",
                str(calib),
                "--memory-budget",
                "64K",
                "--mode",
                "stateful",
                "--quiet",
            ]
        )
        == 0
    )
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


# ------------------------------------------------------------------ compiling with the weights on disk


def _feeds(count: int = 16, width: int = graphs.FEATURES, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# A small MLP at a few steps sits below the methods' fidelity bounds; what is tested here is how it is written.
_NOT_FIDELITY = pytest.mark.filterwarnings("ignore::spikec.compiler.FidelityWarning")


@_NOT_FIDELITY
@pytest.mark.parametrize("method", ["ecmt", "spikezip"])
def test_external_data_in_external_data_out(tmp_path, method):
    """A model with external data compiles with its weights mapped, not loaded, to a model with its weights
    in NAME.data: the same model, weight for weight, as compiling it from memory; it loads and runs. Without
    an output path the model comes back whole."""
    source = tmp_path / "in" / "mlp.onnx"
    source.parent.mkdir()
    onnx.save(graphs.mlp(), source, save_as_external_data=True, location="mlp.weights", size_threshold=0)
    feeds = _feeds()
    options = dict(method=method, mode="stateful", timesteps=4, progress=False)
    in_memory = spikec.compile(graphs.mlp(), feeds, **options)
    output = tmp_path / "out" / "snn.onnx"
    output.parent.mkdir()
    returned = spikec.compile(source, feeds, output, **options)
    assert sorted(p.name for p in output.parent.iterdir()) == ["snn.onnx", "snn.onnx.data"]
    for tensor in returned.graph.initializer:  # as written: the weights referenced, the small rest inline
        assert uses_external_data(tensor) == (weights.nbytes_of(tensor) >= weights.EXTERNAL_MIN_BYTES), tensor.name
    written = onnx.load(output)
    expected = _initializers(in_memory)
    got = _initializers(written)
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    assert written.graph.node == in_memory.graph.node
    np.testing.assert_array_equal(
        run(InferenceSession(output), feeds)["y"], run(InferenceSession(in_memory), feeds)["y"]
    )
    whole = spikec.compile(source, feeds, **options)
    assert not any(uses_external_data(t) for t in whole.graph.initializer)
    assert _initializers(whole).keys() == expected.keys()
    assert (source.parent / "mlp.weights").read_bytes() == _saved_weights(tmp_path)  # the input only read
    # the weights' digest, read from the mapped file, is the in-memory model's
    recorded = SpikecMetadata.read(written).report.source
    assert recorded["input"] == weights.digest(graphs.mlp()) == SpikecMetadata.read(in_memory).report.source["input"]


@_NOT_FIDELITY
def test_a_weight_computed_from_external_data_is_folded_as_in_memory(tmp_path):
    """Canonicalize folds a Transpose of a weight (as exporters may leave it) the same whether the weight is
    in the model or in its external data: graphsurgeon folds in onnxruntime, where references do not reach."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
            onnx.helper.make_node("MatMul", ["x", "Wt"], ["y"]),
        ],
        "transposed",
        [onnx.helper.make_tensor_value_info("x", 1, ["batch", 64])],
        [onnx.helper.make_tensor_value_info("y", 1, ["batch", 32])],
        [onnx.numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "inline.onnx")
    onnx.save(model, tmp_path / "external.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    feeds = _feeds(16, 64)
    expected = spikec.compile(tmp_path / "inline.onnx", feeds, timesteps=4, progress=False)
    spikec.compile(tmp_path / "external.onnx", feeds, tmp_path / "snn.onnx", timesteps=4, progress=False)
    got = onnx.load(tmp_path / "snn.onnx")
    assert "Transpose" not in {n.op_type for n in got.graph.node} and got.graph.node == expected.graph.node
    for name, values in _initializers(expected).items():
        np.testing.assert_array_equal(_initializers(got)[name], values)


def _saved_weights(tmp_path) -> bytes:
    again = tmp_path / "again" / "mlp.onnx"
    again.parent.mkdir()
    onnx.save(graphs.mlp(), again, save_as_external_data=True, location="mlp.weights", size_threshold=0)
    return (again.parent / "mlp.weights").read_bytes()


@_NOT_FIDELITY
def test_a_model_past_the_size_limit_is_written_with_external_data(tmp_path, monkeypatch):
    """An in-memory model past the limit of one protobuf message (lowered here) is written as NAME and
    NAME.data, loads and runs as the one-file model does."""
    from spikec import modelio

    feeds = _feeds()
    small = spikec.compile(graphs.mlp(), feeds, tmp_path / "small.onnx", timesteps=4, progress=False)
    monkeypatch.setattr(modelio, "_PROTOBUF_LIMIT", 4096)
    returned = spikec.compile(graphs.mlp(), feeds, tmp_path / "big.onnx", timesteps=4, progress=False)
    assert (tmp_path / "big.onnx.data").is_file() and not (tmp_path / "small.onnx.data").exists()
    assert any(uses_external_data(t) for t in returned.graph.initializer)
    weight_bytes = sum(weights.nbytes_of(t) for t in graphs.mlp().graph.initializer if t.name in ("w1", "w2"))
    assert (tmp_path / "big.onnx.data").stat().st_size >= weight_bytes
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "small.onnx").stat().st_size - weight_bytes + 1024
    np.testing.assert_array_equal(
        run(InferenceSession(tmp_path / "big.onnx"), feeds)["y"], run(InferenceSession(small), feeds)["y"]
    )


def test_mapped_weights_pass_graphsurgeon_as_references(tmp_path):
    """Inside a compile's weights.source, graphsurgeon reads an external weight as a read-only map of its
    file and exports it, unchanged, as the same reference: no copy of it enters a proto."""
    import onnx_graphsurgeon as gs

    source = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), source, save_as_external_data=True, location="mlp.weights", size_threshold=0)
    with weights.source(tmp_path):
        graph = gs.import_onnx(load_model(source, map_weights=True))
        w1 = graph.tensors()["w1"]
        values = w1.values
        assert isinstance(values, weights.MappedArray) and not values.flags.writeable
        np.testing.assert_array_equal(values, _initializers(graphs.mlp())["w1"])
        graph.tensors()["w2"].values = values[:, : graphs.FEATURES] * 2  # a new weight, held in memory
        exported = {t.name: t for t in gs.export_onnx(graph).graph.initializer}
    assert uses_external_data(exported["w1"]) and not exported["w1"].raw_data
    assert not uses_external_data(exported["w2"]) and exported["w2"].data_location == onnx.TensorProto.DEFAULT


def _wide_mlp(width: int, layers: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, hidden = [], [], "x"
    for layer in range(layers):
        inits.append(
            onnx.numpy_helper.from_array(
                rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width)), f"w{layer}"
            )
        )
        nodes += [
            onnx.helper.make_node("MatMul", [hidden, f"w{layer}"], [f"m{layer}"]),
            onnx.helper.make_node("Relu", [f"m{layer}"], [f"h{layer}"]),
        ]
        hidden = f"h{layer}"
    graph = onnx.helper.make_graph(
        nodes,
        "wide",
        [onnx.helper.make_tensor_value_info("x", 1, ["batch", width])],
        [onnx.helper.make_tensor_value_info(hidden, 1, ["batch", width])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


_MEASURE = """
import os, resource, sys, numpy as np
import spikec
from spikec.compiler import compile
feeds = dict(np.load(sys.argv[2]))
if sys.argv[1] != "-":
    spikec.compile(sys.argv[1], feeds, sys.argv[3], method=sys.argv[4], mode="stateful", progress=False)
"""


def _peak_rss(*args: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter running _MEASURE with ``args``: its own ru_maxrss."""
    proc = subprocess.Popen([sys.executable, "-c", _MEASURE, *args], stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.parametrize("method", ["ecmt", "spikezip"])
def test_compile_memory_stays_within_three_times_the_weights(tmp_path, method):
    """A model with 192 MiB of external weights compiles (stateful, verified on held-out samples) within
    three times its weights above what importing spikec takes, however many calibration samples."""
    width, layers = 2048, 12
    source = tmp_path / "wide.onnx"
    onnx.save(_wide_mlp(width, layers), source, save_as_external_data=True, location="wide.data")
    weights_bytes = (tmp_path / "wide.data").stat().st_size
    assert weights_bytes == layers * width * width * 4
    peaks = []
    for samples in (16, 256):
        np.savez(tmp_path / "calib.npz", **_feeds(samples, width))
        baseline = _peak_rss("-", str(tmp_path / "calib.npz"))
        peaks.append(
            _peak_rss(str(source), str(tmp_path / "calib.npz"), str(tmp_path / f"snn{samples}.onnx"), method) - baseline
        )
        assert (tmp_path / f"snn{samples}.onnx.data").stat().st_size >= weights_bytes
    assert max(peaks) <= 3 * weights_bytes, [p / weights_bytes for p in peaks]
    assert abs(peaks[1] - peaks[0]) < 0.25 * weights_bytes, [p / weights_bytes for p in peaks]


def test_weight_digest_follows_values_not_names_order_layout_or_storage(tmp_path):
    """runtime/weights.digest: the same weights stored another way (renamed, reordered, transposed, as a
    Constant node, external, duplicated) match; one value changed, or one bit of it, does not."""
    model = graphs.mlp()
    digest = weights.digest(model)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w1, b1, w2 = (onnx.numpy_helper.to_array(t) for t in other.graph.initializer)
    del other.graph.initializer[:]
    other.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.ascontiguousarray(w2.T), "w2_transposed"),
            onnx.numpy_helper.from_array(w1, "first"),
            onnx.numpy_helper.from_array(w1, "tied_copy"),
        ]
    )
    other.graph.node.append(onnx.helper.make_node("Constant", [], ["bias"], value=onnx.numpy_helper.from_array(b1)))
    assert weights.digest(other) == digest
    saved = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), saved, save_as_external_data=True, location="mlp.weights", size_threshold=0)
    with weights.source(tmp_path):
        assert weights.digest(onnx.load(saved, load_external_data=False)) == digest
    for change in (lambda w: w + np.float32(1e-3), lambda w: (w.view(np.uint32) ^ np.uint32(1)).view(np.float32)):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        w = onnx.numpy_helper.to_array(changed.graph.initializer[0]).copy()
        w.flat[7:8] = change(w.flat[7:8])
        changed.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w1"))
        assert weights.digest(changed) != digest
