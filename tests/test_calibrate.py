import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spikec.calibrate import DEFAULT_MMSE_GRID, TapStats, collect_statistics, load_inputs, run_batches
from spikec.errors import SpikecError

T = 8


def qt(x, thr):
    """STA's quantizer QT(z) = Vth/T * clamp(floor(T z / Vth), 0, T)."""
    return thr / T * np.clip(np.floor(T * x / thr), 0, T)


def make_mlp(batch="N"):
    """x [N, 2, 4] -> MatMul -> mm -> Add -> h -> Relu -> y [N, 2, 3]; ids [N, 5] int64 -> Identity -> ids_out."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.array([0.5, -0.25, 0.0], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
        ],
        "mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, [batch, 5]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def make_identity(channels):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["out"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", channels])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 2, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(n, 5)).astype(np.int64),
    }


def fetch_all(model, data, name):
    batches = run_batches(model, data, [name], batch_size=1000, progress=False)
    return np.concatenate([b[name] for b in batches])


# --- collect_statistics ---------------------------------------------------------------------------


def test_under_budget_sample_is_all_data():
    model, data = make_mlp(), mlp_data()
    h = fetch_all(model, data, "h")
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(h, data["x"] @ w + [0.5, -0.25, 0], atol=1e-5)
    stats = collect_statistics(model, data, ["h", "y"], batch_size=7, progress=False)["h"]
    assert stats.count == h.size and stats.channels == 3 and stats.shape == (None, 2, 3)
    for p in (0, 1, 37.5, 99, 99.9, 100):
        assert stats.percentile(p) == np.float32(np.percentile(h, p))
        per_channel = np.percentile(h.reshape(-1, 3), p, axis=0).astype(np.float32)
        np.testing.assert_array_equal(stats.percentile(p, per_channel=True), per_channel)
    assert stats.min() == h.min() and stats.max() == h.max() and stats.absmax() == np.abs(h).max()
    np.testing.assert_array_equal(stats.max(per_channel=True), h.max(axis=(0, 1)))
    np.testing.assert_array_equal(stats.min(per_channel=True), h.min(axis=(0, 1)))
    summary = stats.to_json()
    assert summary["p99.9"] == pytest.approx(np.percentile(h, 99.9))
    assert summary["std"] == pytest.approx(h.std(), rel=1e-6)
    assert set(summary) >= {"min", "max", "p1", "p99", "p99.9", "mean", "std"}


def test_over_budget_min_max_exact_and_sample_deterministic():
    model, data = make_mlp(), mlp_data(n=200)
    h = fetch_all(model, data, "h").reshape(-1, 3)
    small = collect_statistics(model, data, ["h"], batch_size=16, max_values=30, progress=False)["h"]
    assert small.sample.shape == (10, 3) and small.count == h.size
    np.testing.assert_array_equal(small.max(per_channel=True), h.max(axis=0))
    np.testing.assert_array_equal(small.min(per_channel=True), h.min(axis=0))
    assert small.absmax() == np.abs(h).max()
    # Whole rows of the data, unique, and not just the first ones.
    matches = [np.flatnonzero((h == row).all(axis=1)) for row in small.sample]
    assert all(len(m) == 1 for m in matches) and len({int(m[0]) for m in matches}) == 10
    assert max(int(m[0]) for m in matches) >= 10
    # The same sample whatever the batching.
    other = collect_statistics(model, data, ["h"], batch_size=3, max_values=30, progress=False)["h"]
    np.testing.assert_array_equal(small.sample, other.sample)


def test_channel_axis_and_per_channel_shapes():
    model, data = make_mlp(), mlp_data()
    stats = collect_statistics(model, data, ["h"], channel_axis=1, progress=False)["h"]
    h = fetch_all(model, data, "h")
    assert stats.channels == 2 and stats.channel_axis == 1
    assert stats.percentile(50, per_channel=True).shape == (2,)
    np.testing.assert_array_equal(stats.max(per_channel=True), h.max(axis=(0, 2)))
    assert stats.mmse(qt, per_channel=True).shape == (2,)


def test_mmse_matches_brute_force():
    model, data = make_mlp(), mlp_data(n=100)
    y = fetch_all(model, data, "y").reshape(-1, 3)
    stats = collect_statistics(model, data, ["y"], progress=False)["y"]
    ref = y.max(axis=0)
    errors = np.array([((qt(y, np.float32(g * ref)) - y) ** 2).sum(axis=0) for g in DEFAULT_MMSE_GRID])
    best = errors.argmin(axis=0)
    expected = np.array([DEFAULT_MMSE_GRID[best[c]] * ref[c] for c in range(3)], np.float32)
    np.testing.assert_allclose(stats.mmse(qt, per_channel=True, reference="max"), expected, rtol=1e-6)
    total = np.array([((qt(y, np.float32(g * ref.max())) - y) ** 2).sum() for g in DEFAULT_MMSE_GRID])
    assert stats.mmse(qt) == pytest.approx(DEFAULT_MMSE_GRID[total.argmin()] * ref.max(), rel=1e-6)


def test_mmse_finds_constructed_optimum_per_channel():
    # Channel c sits on the lattice of threshold g_c * max_c plus one outlier at max_c: rounding is exact
    # there and only the outlier is clipped, which makes g_c the unique optimum.
    def round_q(x, thr):
        return thr / T * np.clip(np.round(T * x / thr), 0, T)

    g = DEFAULT_MMSE_GRID[[54, 14]]  # 0.8 and 0.6
    top = np.array([1.0, 2.0], np.float32)
    theta = (g * top).astype(np.float32)
    lattice = np.repeat(np.arange(T + 1), 100)[:, None] * theta / T
    x = np.vstack([lattice, top]).astype(np.float32)
    stats = collect_statistics(make_identity(2), {"x": x}, ["x"], progress=False)["x"]
    np.testing.assert_allclose(stats.mmse(round_q, per_channel=True, reference="max"), theta, rtol=1e-6)


def test_mmse_dead_channel_gets_zero():
    x = np.stack([np.linspace(0, 1, 50), np.zeros(50)], axis=1).astype(np.float32)
    stats = collect_statistics(make_identity(2), {"x": x}, ["x"], progress=False)["x"]
    thr = stats.mmse(qt, per_channel=True)
    assert thr[1] == 0 and thr[0] > 0


@pytest.mark.parametrize("tap", ["ids_out", "nope", "W"])
def test_bad_taps(tap):
    with pytest.raises(SpikecError, match=f"'{tap}'"):
        collect_statistics(make_mlp(), mlp_data(), [tap], progress=False)


def test_bad_arguments():
    stats = collect_statistics(make_mlp(), mlp_data(), ["h"], progress=False)["h"]
    with pytest.raises(SpikecError, match="p=101"):
        stats.percentile(101)
    with pytest.raises(SpikecError, match="reference"):
        stats.mmse(qt, reference="mean")
    with pytest.raises(SpikecError, match="channel_axis=3"):
        collect_statistics(make_mlp(), mlp_data(), ["h"], channel_axis=3, progress=False)
    with pytest.raises(SpikecError, match="batch_size=0"):
        collect_statistics(make_mlp(), mlp_data(), ["h"], batch_size=0, progress=False)


# --- run_batches ----------------------------------------------------------------------------------


def test_run_batches_sizes_and_static_batch():
    data = mlp_data(n=10)
    sizes = [len(b["y"]) for b in run_batches(make_mlp(), data, ["y", "mm"], batch_size=4, progress=False)]
    assert sizes == [4, 4, 2]
    sizes = [len(b["y"]) for b in run_batches(make_mlp(batch=5), data, ["y"], batch_size=4, progress=False)]
    assert sizes == [5, 5]
    with pytest.raises(SpikecError, match="static batch size of 3"):
        run_batches(make_mlp(batch=3), data, ["y"], progress=False)


def test_external_data_and_large_model_route(tmp_path, monkeypatch):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(make_mlp(), path, save_as_external_data=True, location="mlp.data", size_threshold=0)
    data = mlp_data()
    expected = fetch_all(make_mlp(), data, "h")
    np.testing.assert_array_equal(fetch_all(path, data, "h"), expected)
    np.testing.assert_array_equal(fetch_all(path, data, "y"), fetch_all(make_mlp(), data, "y"))  # declared output
    # Models over protobuf's 2 GB limit go through a temporary file with external data.
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 1)
    np.testing.assert_array_equal(fetch_all(path, data, "h"), expected)
    with pytest.raises(SpikecError, match="external weights"):
        run_batches(onnx.load(str(path), load_external_data=False), data, ["h"], progress=False)


# --- load_inputs ----------------------------------------------------------------------------------


def test_load_inputs_npz_and_safe_casts(tmp_path):
    data = mlp_data(n=6)
    path = tmp_path / "calib.npz"
    np.savez(path, x=data["x"].astype(np.float64), ids=data["ids"].astype(np.int32))
    loaded = load_inputs(path, make_mlp())
    assert list(loaded) == ["x", "ids"]
    assert loaded["x"].dtype == np.float32 and loaded["ids"].dtype == np.int64
    np.testing.assert_array_equal(loaded["ids"], data["ids"])


@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda d: d.pop("ids"), "'ids': missing"),
        (lambda d: d.update(extra=np.zeros(3)), "'extra'"),
        (lambda d: d.update(ids=d["ids"].astype(np.float32)), "'ids': dtype float32 cannot feed a int64"),
        (lambda d: d.update(x=d["x"].astype(np.int32)), "'x': dtype int32"),
        (lambda d: d.update(x=d["x"][:, 0]), "'x': expected rank 3"),
        (lambda d: d.update(x=d["x"][:, :, :3]), "'x': axis 2 must be 4"),
        (lambda d: d["x"].__setitem__((1, 0, 0), np.nan), "'x': contains 1 NaN"),
        (lambda d: d.update(x=d["x"][:0], ids=d["ids"][:0]), "'x': has zero samples"),
        (lambda d: d.update(ids=d["ids"][:3]), "different sample counts"),
        (lambda d: d.update(ids=d["ids"] + 2**40), None),  # int64 stays int64: fine
    ],
)
def test_load_inputs_errors(tmp_path, change, culprit):
    data = mlp_data(n=6)
    change(data)
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    if culprit is None:
        load_inputs(path, make_mlp())
        return
    with pytest.raises(SpikecError, match=culprit) as err:
        load_inputs(path, make_mlp())
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_inputs_symbolic_dims_must_agree():
    model = make_mlp()
    for vi in model.graph.input:
        vi.type.tensor_type.shape.dim[1].dim_param = "S"
    with pytest.raises(SpikecError, match="'ids': axis 1 \\('S'\\) is 5 but input 'x' axis 1 is 2"):
        load_inputs(mlp_data(n=2), model)


def test_load_inputs_int_range_checked():
    data = mlp_data(n=2)
    model = make_mlp()
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT32
    with pytest.raises(SpikecError, match="'ids': values .* do not fit int32"):
        load_inputs({**data, "ids": data["ids"] + 2**40}, model)


@pytest.mark.parametrize("content", [b"not an archive", None])
def test_load_inputs_unreadable_files(tmp_path, content):
    if content is None:
        path = tmp_path / "calib.npy"
        np.save(path, np.zeros(3))
    else:
        path = tmp_path / "calib.npz"
        path.write_bytes(content)
    with pytest.raises(SpikecError, match="npz") as err:
        load_inputs(path, make_mlp())
    assert str(path) in str(err.value)
    with pytest.raises(SpikecError, match="missing.npz"):
        load_inputs(tmp_path / "missing.npz", make_mlp())


# --- statistics that merge, resume and run in processes -------------------------------------------


def _same(a, b):
    assert (a.name, a.shape, a.channel_axis, a.count) == (b.name, b.shape, b.channel_axis, b.count)
    for field in ("sample", "channel_min", "channel_max"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def _parts(model, data, cuts, **kwargs):
    bounds = [0, *cuts, len(data["x"])]
    return [
        collect_statistics(model, {k: v[a:b] for k, v in data.items()}, ["h"], progress=False, **kwargs)["h"]
        for a, b in zip(bounds, bounds[1:])
    ]


def test_merged_statistics_equal_one_pass_within_the_budget():
    model, data = make_mlp(), mlp_data(n=200)
    one = collect_statistics(model, data, ["h"], batch_size=16, progress=False)["h"]
    first, second, third = _parts(model, data, [70, 131], batch_size=16)
    _same(first.merge(second).merge(third), one)


def test_merged_statistics_over_the_budget_keep_exact_extremes_and_a_uniform_sample():
    model, data = make_mlp(), mlp_data(n=200)
    h = fetch_all(model, data, "h").reshape(-1, 3)
    first, second = _parts(model, data, [120], max_values=30)
    merged = first.merge(second, max_values=30)
    assert merged.count == h.size and merged.sample.shape == (10, 3)
    np.testing.assert_array_equal(merged.min(per_channel=True), h.min(axis=0))
    np.testing.assert_array_equal(merged.max(per_channel=True), h.max(axis=0))
    rows = [int(np.flatnonzero((h == row).all(axis=1))[0]) for row in merged.sample]
    assert len(set(rows)) == 10  # distinct rows of the data
    _same(merged, first.merge(second, max_values=30))  # the same merge, the same sample
    # how many rows come from each side follows the rows each saw: over many row counts the first
    # side's share of the merged sample averages its share of the rows (hypergeometric mean)
    taken, expected = 0.0, 0.0
    for seen in range(20, 400, 7):
        a = TapStats("t", (None, 1), 1, seen, np.zeros((min(seen, 50), 1), np.float32), np.zeros(1), np.zeros(1))
        b = TapStats("t", (None, 1), 1, 400, np.ones((50, 1), np.float32), np.ones(1), np.ones(1))
        taken += 50 - a.merge(b, max_values=50).sample.sum()
        expected += 50 * seen / (seen + 400)
    assert abs(taken / expected - 1) < 0.05
    with pytest.raises(SpikecError, match="cannot merge statistics of 'y'"):
        first.merge(collect_statistics(model, data, ["y"], channel_axis=1, progress=False)["y"])


def test_an_interrupted_calibration_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from spikec import calibrate

    model, data = make_mlp(), mlp_data(n=200)
    settings = dict(batch_size=16, max_values=30, progress=False)
    one = collect_statistics(model, data, ["h", "y"], **settings)
    checkpoint = tmp_path / "calib.ckpt.npz"
    iterate = calibrate._iterate

    def interrupted(start, *args):
        for count, batch in enumerate(iterate(start, *args)):
            if count == 5:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(calibrate, "_iterate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(model, data, ["h", "y"], checkpoint=checkpoint, checkpoint_every=0, **settings)
    starts = []
    monkeypatch.setattr(calibrate, "_iterate", lambda start, *args: starts.append(start) or iterate(start, *args))
    resumed = collect_statistics(model, data, ["h", "y"], checkpoint=checkpoint, checkpoint_every=0, **settings)
    assert starts == [80]  # after the five batches that were summarised
    for name in one:
        _same(resumed[name], one[name])  # bit for bit an uninterrupted pass, past the sample budget
    again = collect_statistics(model, data, ["h", "y"], checkpoint=checkpoint, **settings)
    assert starts[-1] == 200  # a complete checkpoint is the result: nothing runs
    _same(again["h"], one["h"])
    other = {k: v[::-1].copy() for k, v in data.items()}  # other data: the checkpoint is not theirs
    fresh = collect_statistics(model, other, ["h", "y"], checkpoint=checkpoint, **settings)
    assert starts[-1] == 0
    _same(fresh["h"], collect_statistics(model, other, ["h"], **settings)["h"])


def test_calibration_in_processes_merges_to_one_pass(tmp_path):
    model, data = make_mlp(), mlp_data(n=200)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(make_mlp(), path, save_as_external_data=True, location="mlp.data", size_threshold=0)
    one = collect_statistics(model, data, ["h", "y"], batch_size=16, progress=False)
    parallel = collect_statistics(path, data, ["h", "y"], batch_size=16, progress=False, workers=2)
    for name in one:
        _same(parallel[name], one[name])


def test_calibration_workers_end_when_the_pool_is_terminated():
    """Pool.terminate() ends its workers by SIGTERM (and holds the task queue's lock while it waits for them):
    a worker that ignored SIGTERM made it wait until the worker's task ended, or for ever when the worker
    waited for that lock."""
    import multiprocessing
    import time

    from spikec.calibrate import _quiet_worker

    with multiprocessing.get_context("spawn").Pool(1, initializer=_quiet_worker) as pool:
        busy = pool.apply_async(time.sleep, (120,))
        with pytest.raises(multiprocessing.TimeoutError):
            busy.get(timeout=2)  # the worker is started and inside its task
        began = time.monotonic()
        pool.terminate()
        assert time.monotonic() - began < 60


@pytest.mark.filterwarnings("ignore::spikec.compiler.FidelityWarning")
def test_compile_with_a_checkpoint_and_workers_writes_the_same_model(tmp_path, monkeypatch):
    import spikec
    from spikec import calibrate

    model, data = make_mlp(), {"x": mlp_data(n=64)["x"], "ids": mlp_data(n=64)["ids"]}
    plain = spikec.compile(model, data, tmp_path / "plain.onnx", timesteps=4, progress=False)
    checkpoint = tmp_path / "calib.npz"
    spikec.compile(model, data, tmp_path / "first.onnx", timesteps=4, progress=False, calibration_checkpoint=checkpoint)
    assert checkpoint.is_file()
    starts = []
    iterate = calibrate._iterate
    monkeypatch.setattr(
        calibrate,
        "_iterate",
        lambda start, session, names, feeds, *a: (
            starts.append((len(next(iter(feeds.values()))), start)) or iterate(start, session, names, feeds, *a)
        ),
    )
    spikec.compile(
        model, data, tmp_path / "resumed.onnx", timesteps=4, progress=False, calibration_checkpoint=checkpoint
    )
    # the pass over all 56 calibration samples (8 held out) resumes at their end; the time-folding check's
    # runs on two batches start afresh
    assert [start for samples, start in starts if samples == 56] == [56]
    spikec.compile(model, data, tmp_path / "workers.onnx", timesteps=4, progress=False, calibration_workers=2)
    for name in ("first", "resumed", "workers"):
        assert (tmp_path / f"{name}.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes(), name
    assert plain.graph.node
    with pytest.raises(SpikecError, match="calibration checkpoint output .* is the calibration data"):
        np.savez(tmp_path / "data.npz", **data)
        spikec.compile(model, tmp_path / "data.npz", tmp_path / "x.onnx", calibration_checkpoint=tmp_path / "data.npz")
