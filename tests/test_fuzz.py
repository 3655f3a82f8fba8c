"""Fuzz `spikec.compile` with broken models and broken calibration data (hypothesis).

Real exported models (the digits ViT, a random-init BERT) are mutated: a node dropped, an attribute
changed, a graph input's dtype/shape changed, an initializer corrupted (raw_data of the wrong length, a
wrong data type or dims), weights made extreme (NaN/Inf entries, zero, x1e20, x1e-30), a tensor renamed
so that a node input dangles. Calibration data is mutated too: dtype, rank, NaN/Inf, empty, extra or missing keys, mismatched sample counts,
out-of-range values. Every case must end in one of two ways:

* `spikec.compile` raises SpikecError with a one-line message (and prints nothing), or
* it returns a model that passes onnx.checker and runs in spikec.runtime.InferenceSession, with finite
  outputs wherever the (mutated) ANN's outputs are finite.

Anything else (another exception type, a multi-line message, a model that does not load or run) fails.

Time is bounded: each test runs SPIKEC_FUZZ_EXAMPLES cases (default 25) with T=2 and 4 calibration
samples; cases are derandomized (the same on every run) unless SPIKEC_FUZZ_RANDOM=1. The number of cases
run and how they ended is printed at the end of the module: ``pytest -s tests/test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from spikec.runtime import InferenceSession, run

import spikec
from examples import fixtures
from spikec.calibrate import load_inputs

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`

T = 2
EXAMPLES = int(os.environ.get("SPIKEC_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    derandomize=os.environ.get("SPIKEC_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(OUTCOMES.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items()))
    print(f"\nfuzz: {total} cases ran ({detail})")


# --------------------------------------------------------------------------
# base models and data (loaded once, every case mutates a fresh copy)
# --------------------------------------------------------------------------


@functools.cache
def _base(name: str) -> tuple[bytes, dict[str, np.ndarray]]:
    if name == "vit":
        path, feeds = fixtures.digits_vit(), {"pixels": fixtures.digits_data()["x_train"][:4]}
    else:
        path, feeds = fixtures.random_transformer("bert"), fixtures.random_inputs("bert", batch=4)
    return onnx.load(path).SerializeToString(), feeds


def _model(name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(_base(name)[0])
    return model


def _feeds(name: str) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in _base(name)[1].items()}


# --------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------


def _ann_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The mutated ANN's outputs in plain onnxruntime, or None where it does not run at all."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)
    except Exception:  # noqa: BLE001 - any failure means there is no reference to compare with
        return None


def _one_batch(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The feeds cut to the model's static batch size, if it has one."""
    static = [d.dim_value for i in model.graph.input for d in i.type.tensor_type.shape.dim[:1] if d.dim_value]
    return {k: v[: static[0]] for k, v in feeds.items()} if static else feeds


def _check(model: onnx.ModelProto, calibration, *, via_file: bool = False, kind: str) -> None:
    with tempfile.TemporaryDirectory(prefix="spikec-fuzz-") as tmp:
        source = model
        if via_file:
            source = Path(tmp) / "model.onnx"
            source.write_bytes(model.SerializeToString())
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # the CLI's stdout carries results only
                snn = spikec.compile(source, calibration, timesteps=T, progress=False, batch_size=2)
        except spikec.SpikecError as exc:
            message = str(exc)
            assert message.strip() and "\n" not in message, f"not a one-line message: {message!r}"
            assert printed.getvalue() == "", printed.getvalue()
            OUTCOMES[f"{kind}: rejected"] += 1
            return
        assert printed.getvalue() == "", printed.getvalue()
    onnx.checker.check_model(snn)
    feeds = _one_batch(load_inputs(calibration, model), model)
    session = InferenceSession(snn)
    outputs = run(session, feeds)
    names = [o.name for o in model.graph.output]
    assert set(names) <= set(outputs)
    ann = _ann_outputs(model, feeds)
    if ann is not None and all(np.isfinite(a).all() for a in ann if np.issubdtype(a.dtype, np.floating)):
        for name in names:
            if np.issubdtype(outputs[name].dtype, np.floating):
                assert np.isfinite(outputs[name]).all(), f"output {name} is not finite though the ANN's is"
    OUTCOMES[f"{kind}: compiled"] += 1


# --------------------------------------------------------------------------
# model mutations
# --------------------------------------------------------------------------

_DTYPES = [
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.STRING,
]
_ODD_FLOATS = st.sampled_from([0.0, -1.0, 1e-12, 1e30, -1e30, float("nan"), float("inf"), 2.0])
_ODD_INTS = st.one_of(st.integers(-4, 8), st.sampled_from([2**31, -(2**40), 2**62]))


def _drop_node(model, data):
    index = data.draw(st.integers(0, len(model.graph.node) - 1), label="drop node")
    del model.graph.node[index]


def _change_attribute(model, data):
    candidates = [
        (i, j)
        for i, n in enumerate(model.graph.node)
        for j, a in enumerate(n.attribute)
        if a.type != onnx.AttributeProto.GRAPH
    ]
    i, j = data.draw(st.sampled_from(candidates), label="node, attribute")
    attr = model.graph.node[i].attribute[j]
    kind = attr.type
    if kind == onnx.AttributeProto.INT:
        attr.i = data.draw(_ODD_INTS, label="int")
    elif kind == onnx.AttributeProto.FLOAT:
        attr.f = data.draw(_ODD_FLOATS, label="float")
    elif kind == onnx.AttributeProto.INTS:
        del attr.ints[:]
        attr.ints.extend(data.draw(st.lists(_ODD_INTS, max_size=5), label="ints"))
    elif kind == onnx.AttributeProto.FLOATS:
        del attr.floats[:]
        attr.floats.extend(data.draw(st.lists(_ODD_FLOATS, max_size=5), label="floats"))
    elif kind == onnx.AttributeProto.STRING:
        attr.s = data.draw(st.sampled_from([b"", b"bogus", b"tanh", b"NOTSET"]), label="string")
    elif kind == onnx.AttributeProto.TENSOR:
        dtype = data.draw(st.sampled_from([np.float32, np.int64, np.float64, np.bool_]), label="tensor dtype")
        shape = data.draw(st.lists(st.integers(0, 3), max_size=3), label="tensor shape")
        values = np.asarray(data.draw(st.integers(-3, 3), label="tensor fill")).astype(dtype)
        attr.t.CopyFrom(numpy_helper.from_array(np.full(shape, values, dtype), attr.t.name))
    else:  # attribute lists of tensors/strings: drop them
        del model.graph.node[i].attribute[j]


def _change_input(model, data):
    constants = {t.name for t in model.graph.initializer}
    graph_input = data.draw(st.sampled_from([i for i in model.graph.input if i.name not in constants]), label="input")
    tensor = graph_input.type.tensor_type
    how = data.draw(st.sampled_from(["dtype", "add dim", "drop dim", "dim value", "no shape"]), label="how")
    if how == "dtype":
        tensor.elem_type = data.draw(st.sampled_from(_DTYPES), label="dtype")
    elif how == "add dim":
        tensor.shape.dim.add().dim_value = data.draw(st.integers(1, 3), label="size")
    elif how == "drop dim" and len(tensor.shape.dim):
        del tensor.shape.dim[data.draw(st.integers(0, len(tensor.shape.dim) - 1), label="axis")]
    elif how == "dim value" and len(tensor.shape.dim):
        axis = data.draw(st.integers(0, len(tensor.shape.dim) - 1), label="axis")
        tensor.shape.dim[axis].dim_value = data.draw(st.integers(1, 70), label="size")
    else:
        tensor.ClearField("shape")


def _corrupt_initializer(model, data):
    index = data.draw(st.integers(0, len(model.graph.initializer) - 1), label="initializer")
    tensor = model.graph.initializer[index]
    how = data.draw(st.sampled_from(["short raw", "long raw", "dtype", "dims"]), label="how")
    if how in ("short raw", "long raw"):
        raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
        cut = data.draw(st.integers(1, max(1, len(raw))), label="bytes")
        tensor.ClearField("float_data")
        tensor.ClearField("int64_data")
        tensor.raw_data = raw[:-cut] if how == "short raw" else raw + b"\0" * cut
    elif how == "dtype":
        tensor.data_type = data.draw(st.sampled_from(_DTYPES), label="dtype")
    else:
        del tensor.dims[:]
        tensor.dims.extend(data.draw(st.lists(st.integers(0, 70), max_size=4), label="dims"))


def _extreme_weights(model, data):
    """A well-formed model with extreme weights: NaN/Inf entries, all zero, or scaled to 1e20 / 1e-30."""
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims)]
    tensor = data.draw(st.sampled_from(floats), label="initializer")
    how = data.draw(st.sampled_from(["nan", "inf", "zero", "huge", "tiny"]), label="how")
    try:
        array = numpy_helper.to_array(tensor).copy()
    except ValueError:  # already corrupted by an earlier mutation
        return
    if how in ("nan", "inf"):
        flat = array.reshape(-1)
        flat[: data.draw(st.sampled_from([1, flat.size]), label="how many")] = np.nan if how == "nan" else np.inf
    else:
        array = array * {"zero": 0.0, "huge": 1e20, "tiny": 1e-30}[how]
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))


def _dangle(model, data):
    candidates = [(i, j) for i, n in enumerate(model.graph.node) for j, name in enumerate(n.input) if name]
    i, j = data.draw(st.sampled_from(candidates), label="node, input")
    node = model.graph.node[i]
    if data.draw(st.booleans(), label="rename the producer's output"):
        producers = [n for n in model.graph.node if node.input[j] in n.output]
        if producers:
            outputs = producers[0].output
            outputs[list(outputs).index(node.input[j])] += ".renamed"
            return
    node.input[j] = node.input[j] + ".dangling"


MODEL_MUTATIONS = {
    "drop node": _drop_node,
    "attribute": _change_attribute,
    "input": _change_input,
    "initializer": _corrupt_initializer,
    "weights": _extreme_weights,
    "dangling input": _dangle,
}


@pytest.mark.parametrize("name", ["vit", "bert"])
@FUZZ
@given(data=st.data())
def test_mutated_model(name, data):
    model = _model(name)
    kinds = data.draw(st.lists(st.sampled_from(sorted(MODEL_MUTATIONS)), min_size=1, max_size=2), label="mutations")
    for kind in kinds:
        MODEL_MUTATIONS[kind](model, data)
    via_file = data.draw(st.booleans(), label="via file")
    _check(model, _feeds(name), via_file=via_file, kind=f"{name} model")


# --------------------------------------------------------------------------
# calibration data mutations
# --------------------------------------------------------------------------


def _cast(feeds, key, data):
    dtype = data.draw(
        st.sampled_from(
            [
                np.float16,
                np.float32,
                np.float64,
                np.int8,
                np.int32,
                np.int64,
                np.uint8,
                np.bool_,
                np.complex64,
                np.str_,
                np.object_,
            ]
        ),
        label="dtype",
    )
    feeds[key] = feeds[key].astype(dtype)


def _rank(feeds, key, data):
    array = feeds[key]
    if not array.size:
        return
    if data.draw(st.booleans(), label="add axis") or array.ndim == 1:
        feeds[key] = np.expand_dims(array, data.draw(st.integers(0, array.ndim), label="axis"))
    else:
        feeds[key] = np.take(array, 0, axis=data.draw(st.integers(0, array.ndim - 1), label="axis"))


def _nonfinite(feeds, key, data):
    if not feeds[key].size:
        return
    array = feeds[key].astype(np.float32 if feeds[key].dtype.kind != "f" else feeds[key].dtype)
    array.reshape(-1)[data.draw(st.integers(0, array.size - 1), label="at")] = data.draw(
        st.sampled_from([np.nan, np.inf, -np.inf]), label="value"
    )
    feeds[key] = array


def _empty(feeds, key, data):
    if not feeds[key].ndim:
        return
    axis = data.draw(st.integers(0, feeds[key].ndim - 1), label="axis")
    feeds[key] = np.take(feeds[key], np.arange(0), axis=axis)


def _extra_key(feeds, key, data):
    feeds[data.draw(st.sampled_from(["bogus", "", "spikec.t", key + " "]), label="key")] = feeds[key]


def _missing_key(feeds, key, data):
    del feeds[key]


def _sample_count(feeds, key, data):
    feeds[key] = feeds[key][: data.draw(st.integers(1, 3), label="samples")]


def _values(feeds, key, data):
    array = feeds[key]
    if not array.size:
        return
    value = data.draw(st.sampled_from([-1, 0, 999, 1000, 10**6, 1e30, -1e30, 1e-30]), label="value")
    if array.dtype.kind in "iu" and float(value).is_integer() and abs(value) < 2**62:
        value, array = int(value), array.astype(np.int64)
    else:
        array = array.astype(np.float64)
    array.reshape(-1)[data.draw(st.integers(0, array.size - 1), label="at")] = value
    feeds[key] = array


def _resize(feeds, key, data):
    """Another size on a non-batch axis (all inputs alike, or just this one)."""
    if feeds[key].ndim < 2:
        return
    axis = data.draw(st.integers(1, feeds[key].ndim - 1), label="axis")
    size = data.draw(st.sampled_from([1, 2, 17, 65]), label="size")
    keys = list(feeds) if data.draw(st.booleans(), label="all inputs") else [key]
    for k in keys:
        if isinstance(feeds[k], np.ndarray) and feeds[k].ndim > axis and feeds[k].shape[axis]:
            reps = -(-size // feeds[k].shape[axis])
            feeds[k] = np.take(np.concatenate([feeds[k]] * max(reps, 1), axis=axis), np.arange(size), axis=axis)


def _not_array(feeds, key, data):
    feeds[key] = data.draw(st.sampled_from([None, "text", 3.5, [[1, 2], [3]]]), label="value")


def _layout(feeds, key, data):
    feeds[key] = np.asfortranarray(feeds[key]) if data.draw(st.booleans(), label="fortran") else feeds[key][..., ::-1]


CALIBRATION_MUTATIONS = {
    "dtype": _cast,
    "rank": _rank,
    "nonfinite": _nonfinite,
    "empty": _empty,
    "extra key": _extra_key,
    "missing key": _missing_key,
    "sample count": _sample_count,
    "values": _values,
    "resize": _resize,
    "not an array": _not_array,
    "layout": _layout,
}


@pytest.mark.parametrize("name", ["vit", "bert"])
@FUZZ
@given(data=st.data())
def test_mutated_calibration(name, data):
    feeds = _feeds(name)
    kinds = data.draw(
        st.lists(st.sampled_from(sorted(CALIBRATION_MUTATIONS)), min_size=1, max_size=2), label="mutations"
    )
    for kind in kinds:
        if not feeds:
            break
        key = data.draw(st.sampled_from(sorted(feeds)), label="input")
        if isinstance(feeds[key], np.ndarray):
            CALIBRATION_MUTATIONS[kind](feeds, key, data)
    via_npz = data.draw(st.booleans(), label="via npz")
    with tempfile.TemporaryDirectory(prefix="spikec-fuzz-") as tmp:
        calibration = feeds
        if via_npz and all(isinstance(v, np.ndarray) and v.dtype != object for v in feeds.values()) and all(feeds):
            calibration = Path(tmp) / "calib.npz"
            np.savez(calibration, **feeds)
        _check(_model(name), calibration, kind=f"{name} calibration")


# --------------------------------------------------------------------------
# regressions: cases the fuzzer found, pinned
# --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_static_batch_vit_unrolls(batch):
    """A static batch used to leave a batch-B constant (the CLS token, folded from its Expand) in a
    Concat, and batch-B shapes declared on T*B-row tensors: onnxruntime refused the unrolled model."""
    model, feeds = _model("vit"), _feeds("vit")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    dynamic = run(InferenceSession(spikec.compile(_model("vit"), feeds, timesteps=T, progress=False)), feeds)
    snn = spikec.compile(model, feeds, timesteps=T, progress=False)
    got = run(InferenceSession(snn), _one_batch(feeds, model))
    np.testing.assert_allclose(got["logits.steps"], dynamic["logits.steps"][:, :batch], atol=1e-4)


def test_static_batch_that_mixes_samples_is_refused():
    """BERT's exported attention mask gathers flat indices b*seq + s: with a static batch they are constants
    that only cover B rows. Unrolled, that is a one-line error pointing to stateful mode, which works."""
    model, feeds = _model("bert"), _feeds("bert")
    for vi in model.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(spikec.SpikecError, match=r"static batch of 2 .*--mode stateful"):
        spikec.compile(model, feeds, timesteps=T, progress=False)
    snn = spikec.compile(model, feeds, timesteps=T, progress=False, mode="stateful")
    assert all(np.isfinite(v).all() for v in run(InferenceSession(snn), _one_batch(feeds, model)).values())


@pytest.mark.parametrize("extra", [1, 3, 4])
def test_initializer_raw_data_too_long(extra):
    """onnx.checker accepts raw_data longer than the dims need; numpy failed deep inside a pass."""
    model = _model("vit")
    tensor = model.graph.initializer[1]
    tensor.raw_data = tensor.raw_data + b"\0" * extra
    with pytest.raises(spikec.SpikecError, match=rf"initializer '{tensor.name}'"):
        spikec.compile(model, _feeds("vit"), timesteps=T, progress=False)


def test_ragged_calibration_list():
    with pytest.raises(spikec.SpikecError, match=r"input 'pixels': not an array"):
        spikec.compile(_model("vit"), {"pixels": [[1, 2], [3]]}, timesteps=T, progress=False)


def test_unfoldable_subgraph_prints_nothing(capsys):
    """graphsurgeon printed a warning to stdout for every subgraph it could not fold."""
    model = _model("vit")
    cast = next(n for n in model.graph.node if n.name == "/blocks.0/attn/Cast")
    next(a for a in cast.attribute if a.name == "to").i = onnx.TensorProto.UNDEFINED
    with pytest.raises(spikec.SpikecError):
        spikec.compile(model, _feeds("vit"), timesteps=T, progress=False)
    assert capsys.readouterr().out == ""
