"""benchmarks/bench_gpu.py's placement parsing and the providers a spikec session hands onnxruntime, on the CPU."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from spikec.runtime import InferenceSession, native, run
from spikec.runtime.session import quiet_options

import spikec
from benchmarks import bench_gpu
from tests.graphs import mlp

CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def compiled_mlp():
    data = {"x": np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)}
    return spikec.compile(mlp(), data, timesteps=4, progress=False, verify=False), {"x": data["x"][:4]}


def test_cpu_run_places_every_node_on_the_cpu(compiled_mlp):
    model, feeds = compiled_mlp
    placement = bench_gpu.profiled_placement(model, [CPU], feeds)
    ops = {op for op, _ in placement.values()}
    assert {"MatMul", "Scan"} <= ops  # the layers and the ECMT neurons' step loops (inside them too)
    assert {provider for _, provider in placement.values()} == {CPU}
    summary = bench_gpu.placement_summary(placement, CPU)
    assert summary == {"nodes": {CPU: len(placement)}, "fallback_ops": {}, "memcpy": {}}
    # seen from another provider, every node ran elsewhere
    elsewhere = bench_gpu.placement_summary(placement, "CUDAExecutionProvider")["fallback_ops"]
    assert sum(elsewhere.values()) == len(placement) and set(elsewhere) == ops


def test_placement_reads_fallbacks_and_copies(tmp_path):
    """A profile in onnxruntime's format with a device run: session events and fences carry no provider."""

    def node(name, op, provider):
        return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": provider}}

    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        {"cat": "Node", "name": "mm_fence_before", "args": {"op_name": "MatMul"}},
        node("mm", "MatMul", "CUDAExecutionProvider"),
        node("shape", "Shape", CPU),
        node("range", "Range", CPU),
        node("copy_in", "MemcpyFromHost", "CUDAExecutionProvider"),
        node("copy_out", "MemcpyToHost", "CUDAExecutionProvider"),
    ]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(events))
    placement = bench_gpu.node_placement(profile)
    assert placement["mm"] == ("MatMul", "CUDAExecutionProvider") and len(placement) == 5
    assert bench_gpu.placement_summary(placement, "CUDAExecutionProvider") == {
        "nodes": {"CUDAExecutionProvider": 3, CPU: 2},
        "fallback_ops": {"Shape": 1, "Range": 1},
        "memcpy": {"MemcpyFromHost": 1, "MemcpyToHost": 1},
    }


def test_script_refuses_a_missing_provider(capsys):
    assert bench_gpu.main(["--provider", "NoSuchExecutionProvider"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert bench_gpu.main([]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "CUDAExecutionProvider" in err


def test_providers_reach_onnxruntime(compiled_mlp):
    model, feeds = compiled_mlp
    cpu = InferenceSession(model, providers=[(CPU, {})])
    assert cpu.get_providers() == [CPU] and cpu.native == native.available()
    device = next((p for p in ort.get_available_providers() if p != CPU), None)
    if device is None:
        pytest.skip("this onnxruntime has no provider besides the CPU's")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = InferenceSession(model, providers=[device, CPU])
    assert session.get_providers() == [device, CPU]
    # a device session runs the functions, not the CPU-only native kernels, with the same results
    assert not session.native
    reference = run(InferenceSession(model, native=False), feeds)["y"]
    np.testing.assert_allclose(run(session, feeds)["y"], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    if native.available():
        options = quiet_options()
        native.register(options)
        with pytest.raises(ValueError, match=device):
            InferenceSession(model, options, providers=[device, CPU])
