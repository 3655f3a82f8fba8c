"""The native kernels (runtime/kernels/, `make native`) against the ONNX functions of runtime/ops.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from op_models import example_attributes, example_params, initial_states, one_node_model
from spikec.runtime import InferenceSession, Stepper, native, ops, run_stateful, ttfs
from spikec.runtime.session import next_state_name

import spikec
from examples import fixtures
from spikec import SpikecError

pytestmark = pytest.mark.skipif(not native.available(), reason="native library not built (run `make native`)")

T, B, C = 7, 6, 9


def _model(op_type: str, params: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    return one_node_model(op_type, params, C, **attrs)


def _pair(model: onnx.ModelProto) -> tuple[InferenceSession, InferenceSession]:
    portable, fast = InferenceSession(model, native=False), InferenceSession(model)
    assert (portable.native, fast.native) == (False, True)
    return portable, fast


def _thetas(rng, per_channel: bool) -> dict[str, np.ndarray]:
    shape = (C,) if per_channel else ()
    return {
        "theta_pos": rng.uniform(0.1, 1.0, shape).astype(np.float32),
        "theta_neg": rng.uniform(0.1, 1.0, shape).astype(np.float32),
    }


def _inputs(rng, op: ops.SpikingOp, params: dict[str, np.ndarray]) -> np.ndarray:
    """[T, B, C]: normal values at several scales; membranes on every firing boundary (step 1 sees x as
    the membrane): MT levels theta*(2^k - 1/2) of both sides, ST-BIF+'s +-theta/2 (not through a UGO's
    hidden affine map); zeros, -0, inf, NaN."""
    x = (rng.standard_normal((T, B, C)) * rng.choice([0.1, 1.0, 10.0, 1e3], (T, B, C))).astype(np.float32)
    if "theta_pos" in params:
        pos = np.broadcast_to(params["theta_pos"], (C,))
        neg = np.broadcast_to(params["theta_neg"], (C,))
        for k in range(5):
            x[0, k % B] = pos * np.float32(2.0**k - 0.5)
            x[1, k % B] = -neg * np.float32(2.0**k - 0.5)
    if "theta" in params and "theta" not in op.hidden:
        half = np.broadcast_to(params["theta"], (C,)) * np.float32(0.5)
        x[0, 0], x[0, 1] = half, -half
    x[2, 0, :4] = [0.0, -0.0, np.inf, -np.inf]
    x[3, 1, 0] = np.nan
    return x


# Every op with its example attributes, and an op whose functions hold a body for each value of an attribute
# (SpikingOp.specialized) with the other value too.
CASES: list[tuple[str, dict[str, int]]] = [(name, {}) for name in ops.OPS] + [
    (name, {op.specialized: 1 - example_attributes(op)[op.specialized]})
    for name, op in ops.OPS.items()
    if op.specialized
]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("name", "attributes"), CASES)
def test_unrolled_matches_function(name, attributes, per_channel):
    op = ops.OPS[name]
    rng = np.random.default_rng(3)
    params = example_params(op, rng, C, per_channel)
    x = _inputs(rng, op, params).reshape(T * B, C)
    portable, fast = _pair(_model(name, params, timesteps=T, **{**example_attributes(op), **attributes}))
    want = portable.run(None, {op.inputs[0]: x})
    got = fast.run(None, {op.inputs[0]: x})
    assert len(got) == len(want) == 1 + op.spike_count
    # same float32 operations in the same order: equal, not merely close (NaN where the functions give NaN)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("average", [0, 1])
def test_unrolled_accumulation_starts_where_its_function_does(average):
    """ECAccumulate's unrolled function is a CumSum, which starts from the first input (from -0, not +0):
    the kernel gives its bits, also the sign of a sum of only -0 inputs."""
    x = np.random.default_rng(6).standard_normal((T, B, C)).astype(np.float32)
    x[:, 0, :2] = -0.0
    x[:, 1, 0] = [0.0] + [-0.0] * (T - 1)
    portable, fast = _pair(_model("ECAccumulate", {}, timesteps=T, average=average))
    (want,) = portable.run(None, {"x": x.reshape(T * B, C)})
    (got,) = fast.run(None, {"x": x.reshape(T * B, C)})
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.signbit(got.reshape(T, B, C)[:, 0, :2]).all() and not np.signbit(got.reshape(T, B, C)[:, 1, 0]).any()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(("name", "attributes"), CASES)
def test_step_matches_function(name, attributes, per_channel):
    op = ops.OPS[name]
    rng = np.random.default_rng(4)
    params = example_params(op, rng, C, per_channel)
    x = _inputs(rng, op, params)
    portable, fast = _pair(_model(op.step_name, params, **{**example_attributes(op), **attributes}))
    states = initial_states(op)  # t=1: a single zero broadcasts
    for t in range(T):
        feeds = {op.inputs[0]: x[t], "t": np.array(t + 1, np.float32), **states}
        want = portable.run(None, feeds)
        got = fast.run(None, feeds)
        assert len(got) == len(want) == 1 + len(op.states) + op.spike_count
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        states = dict(zip(op.states, want[1:]))


def test_mt_codes_are_levels():
    """A sanity check independent of the functions: codes are 0, 2^k or -eta*2^k."""
    rng = np.random.default_rng(5)
    params = _thetas(rng, True)
    x = (rng.standard_normal((T * B, C)) * 3).astype(np.float32)
    (codes,) = InferenceSession(_model("MTNeuron", params, levels=4, timesteps=T)).run(None, {"x": x})
    eta = params["theta_neg"] / params["theta_pos"]
    levels = 2.0 ** np.arange(4)
    ok = np.isin(codes, np.concatenate([[0.0], levels])) | np.isclose((-codes / eta)[..., None], levels, rtol=1e-6).any(
        -1
    )
    assert ok.all()


def test_parameter_shape_is_checked():
    params = {"theta_pos": np.ones(3, np.float32), "theta_neg": np.ones(3, np.float32)}  # C is 9
    session = InferenceSession(_model("MTNeuron", params, levels=4, timesteps=T))
    with pytest.raises(Exception, match="one value or C values"):
        session.run(None, {"x": np.ones((T * B, C), np.float32)})


def test_native_kernels_replace_the_functions(tmp_path):
    """The measured registration rule: the registered kernel wins over the model-local function."""
    model = _model("MTNeuron", _thetas(np.random.default_rng(6), False), levels=8, timesteps=T)
    x = np.ones((T * B, C), np.float32)

    def executed(native_flag: bool) -> set[str]:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.fspath(tmp_path / f"native_{native_flag}")
        session = InferenceSession(model, options, native=native_flag)
        session.run(None, {"x": x})
        with open(session.end_profiling()) as f:
            return {e["args"]["op_name"] for e in json.load(f) if e.get("cat") == "Node" and "op_name" in e["args"]}

    assert executed(True) == {"MTNeuron"}
    assert "Scan" in executed(False)


def test_session_options_reuse_and_opt_out():
    model = _model("ECAccumulate", {}, timesteps=T, average=1)
    options = ort.SessionOptions()
    first, second = InferenceSession(model, options), InferenceSession(model, options)  # registered once
    assert first.native and second.native and native.registered(options)
    with pytest.raises(ValueError, match="native=False"):
        InferenceSession(model, options, native=False)


def test_library_path_from_environment(monkeypatch, tmp_path):
    built = native.library_path()
    monkeypatch.setenv(native.ENV_VAR, os.fspath(built))
    assert native.library_path() == built
    for wrong in (tmp_path / "missing.so", tmp_path):  # a mistake to report, not a reason to run portably
        monkeypatch.setenv(native.ENV_VAR, os.fspath(wrong))
        with pytest.raises(SpikecError, match=native.ENV_VAR):
            native.available()


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    data = fixtures.digits_data()
    out = tmp_path_factory.mktemp("native_digits")
    calib = {"pixels": data["x_train"][:256]}
    for mode in ("unrolled", "stateful"):
        spikec.compile(fixtures.digits_vit(), calib, out / f"{mode}.onnx", timesteps=8, mode=mode, progress=False)
    return out, {"pixels": data["x_test"][:64]}


@pytest.mark.slow
def test_digits_vit_native_equals_portable(digits_models):
    out, feeds = digits_models
    path = out / "unrolled.onnx"
    portable, fast = InferenceSession(path, native=False), InferenceSession(path)
    assert fast.native
    want = portable.run(["logits.steps"], feeds)[0]
    got = fast.run(["logits.steps"], feeds)[0]
    assert got.shape == (8, 64, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_digits_vit_stateful_native_equals_portable(digits_models):
    """InferenceSession keeps MatMulScaleFusion off (runtime/session.py), so the portable run computes
    the inlined step functions as written, and the native kernels must match it."""
    out, feeds = digits_models
    path = out / "stateful.onnx"
    portable = InferenceSession(path, native=False)
    want = run_stateful(portable, feeds, 8)["logits.steps"]
    got = run_stateful(InferenceSession(path), feeds, 8)["logits.steps"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stepper_updates_states_in_place_with_the_same_bits(digits_models):
    """Native steps write each state over its input (Stepper): the same bits as steps with fresh buffers
    and numpy states, and the state tensors keep their addresses from the second step on."""
    out, feeds = digits_models
    session = InferenceSession(out / "stateful.onnx")
    stepper = Stepper(session, feeds)
    states = {
        i.name: np.zeros([1] * len(i.shape), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("spikec.state.")
    }
    addresses = None
    returned, expected = [], []
    for t in range(1, 7):
        got = stepper.step()
        values = session.run(
            stepper.outputs + [next_state_name(n) for n in states],
            {**feeds, "spikec.t": np.array(t, np.float32), **states},
        )
        states = dict(zip(states, values[len(stepper.outputs) :]))
        for name, want in zip(stepper.outputs, values):
            np.testing.assert_array_equal(got[name], want)
        returned.append(got)
        expected.append(dict(zip(stepper.outputs, values)))
        if t >= 2:
            now = {name: value.data_ptr() for name, value in stepper.states.items()}
            assert addresses is None or now == addresses
            addresses = now
    assert len(states) > 50
    with pytest.raises(ValueError, match="input 'extra': not an input of the model"):
        Stepper(session, {**feeds, "extra": np.zeros(1, np.float32)})
    final = stepper.next_states()
    for name, want in states.items():
        np.testing.assert_array_equal(final[next_state_name(name)], want)
    # the outputs of earlier steps are the caller's: later steps (writing into bound buffers) leave them be
    stepper.step()
    for got, want in zip(returned, expected):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(final[next_state_name(next(iter(states)))], states[next(iter(states))])


def _ttfs_model(op_type: str, scalars: dict[str, float]) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in scalars.items()]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op_type, ["x", *scalars], ["y"], domain="spikec")],
        op_type,
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    return onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("spikec", 1)],
        functions=ttfs.functions_for({op_type}, 17),
    )


# The TTFS ops with native kernels (runtime/kernels/ttfs_kernels.cc: those without transcendentals).
_RANGE = {"lower": -3.0, "upper": 2.5, "delta": 1.0}
_TTFS_CASES = [
    ("TTFSReceiveIdentity", _RANGE),
    ("TTFSReceiveRelu", _RANGE),
    ("TTFSReceiveSquare", _RANGE),
    ("TTFSReceiveRsqrt", {**_RANGE, "lower": 0.0, "epsilon": 1e-5}),
    ("TTFSEmitIdentity", _RANGE),
    (ttfs.TICK_OP, {"delta": 1.0, "tick": 1.0 / 1024}),
]


@pytest.mark.parametrize("op_type, scalars", _TTFS_CASES, ids=[c[0] for c in _TTFS_CASES])
def test_ttfs_kernels_match_functions(op_type, scalars):
    """Spike times (receive, tick) over the whole window and potentials (emit) across and beyond the range;
    70k values, so the kernel's parallel path runs too."""
    rng = np.random.default_rng(0)
    if op_type.startswith("TTFSEmit"):
        x = rng.uniform(-6, 6, (70_000, 3))
    else:
        x = rng.uniform(0, 1, (70_000, 3))
        x[:2] = [[0, 1, 0.5], [1, 0, 1]]
    x = x.astype(np.float32)
    portable, fast = _pair(_ttfs_model(op_type, scalars))
    want, got = portable.run(None, {"x": x})[0], fast.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_digits_vit_ttfs_native_equals_portable(tmp_path):
    data = fixtures.digits_data()
    path = tmp_path / "ttfs.onnx"
    spikec.compile(fixtures.digits_vit(), {"pixels": data["x_train"][:128]}, path, method="ttfs", progress=False)
    feeds = {"pixels": data["x_test"][:64]}
    want = InferenceSession(path, native=False).run(["logits"], feeds)[0]
    got = InferenceSession(path).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_a_library_from_other_sources_is_refused(monkeypatch):
    """build.sh stamps the sources' digest into the library, the same one native.py computes; a library
    whose sources changed since is refused, so models fall back to their functions."""
    path = native.library_path()
    assert native.built_from(path) == native.source_digest() is not None
    monkeypatch.setattr(native, "source_digest", lambda: "0" * 16)
    native._loads.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="rebuild it with `make native`"):
            assert not native.available()
        assert not InferenceSession(one_node_model("ECAccumulate", {}, C, average=1, timesteps=2)).native
    finally:
        monkeypatch.undo()
        native._loads.cache_clear()
    assert native.available()


def _spike_matmul_model(k: int, n: int, weight: np.ndarray | None, dense_above: float) -> onnx.ModelProto:
    """SpikeMatMul(x [a, b, K], w [K, N]); w an initializer, or a graph input where ``weight`` is None."""
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["a", "b", k])]
    initializers = []
    if weight is None:
        inputs.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [k, n]))
    else:
        initializers.append(onnx.numpy_helper.from_array(weight, "w"))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(ops.SPIKE_MATMUL, ["x", "w"], ["y"], domain=ops.DOMAIN, dense_above=dense_above)],
        "spike_matmul",
        inputs,
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["a", "b", n])],
        initializers,
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)],
    )
    model.functions.extend(ops.functions_for({ops.SPIKE_MATMUL}, 17))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("constant_weight", [True, False])
@pytest.mark.parametrize("dense_above", [1.0, 0.0], ids=["rows", "matmul"])
def test_spike_matmul_is_the_matmul(dense_above, constant_weight):
    """Both of the kernel's paths (adding fired weight rows; onnxruntime's MatMul above dense_above)
    against float64: N = 70 leaves a partial 64-column panel; codes +-1, zeros, other values, NaN, inf."""
    rng = np.random.default_rng(21)
    k, n = 37, 70
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.choice(np.float32([-1, 0, 0, 0, 0, 1]), (5, 11, k))
    x[0, 0, :4] = [0.5, -3.0, np.inf, np.nan]
    portable, fast = _pair(_spike_matmul_model(k, n, weight if constant_weight else None, dense_above))
    feeds = {"x": x} if constant_weight else {"x": x, "w": weight}
    got = fast.run(None, feeds)[0]
    assert got.shape == (5, 11, n)
    with np.errstate(invalid="ignore"):
        want = x.astype(np.float64) @ weight.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[finite], portable.run(None, feeds)[0][finite], rtol=0, atol=1e-5)


def test_spike_matmul_rows_give_the_same_bits_on_any_thread_count():
    """The row path sums each element in a fixed order: one thread or two, the same bits."""
    rng = np.random.default_rng(22)
    k, n = 384, 200
    model = _spike_matmul_model(k, n, rng.standard_normal((k, n)).astype(np.float32), 1.0)
    x = rng.choice(np.float32([-1, 0, 0, 0, 0, 0, 0, 1]), (4, 96, k))
    results = []
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        results.append(InferenceSession(model, options).run(None, {"x": x})[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_the_kernels_run_the_vector_isa_asked_for():
    isa = native.kernel_isa()
    assert isa in native.ISAS
    if os.environ.get(native.ISA_ENV_VAR):  # set by the test below, to an ISA this CPU has
        assert isa == os.environ[native.ISA_ENV_VAR]


# the kernels' loops are compiled once per vector ISA and this process runs the CPU's widest
_NARROWER_ISAS = native.ISAS[: native.ISAS.index(native.kernel_isa())] if native.available() else ()


@pytest.mark.slow
@pytest.mark.parametrize("isa", _NARROWER_ISAS)
def test_narrower_vector_isas_give_the_same_bits(isa):
    """This module's bit-equality tests again, in a fresh process whose kernels run the narrower ISA
    (chosen once per process)."""
    selected = "matches_function or is_the_matmul or any_thread_count or equals_portable or vector_isa_asked_for"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
        env={**os.environ, native.ISA_ENV_VAR: isa},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]


def test_an_unknown_vector_isa_is_refused(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV_VAR, "sse9")
    with pytest.raises(SpikecError, match=f"{native.ISA_ENV_VAR}='sse9': expected one of baseline, avx2, avx512"):
        native.register(ort.SessionOptions())
