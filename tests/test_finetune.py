"""spikec finetune: the ONNX graph as a torch module, LSQ distillation, and the written QANN's conversion."""

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from spikec.runtime import InferenceSession

import spikec
from examples import fixtures
from spikec.errors import SpikecError

torch = pytest.importorskip("torch")
from spikec.lsq import GraphModule, _torch_feeds, hidden_states  # noqa: E402

RNG = np.random.default_rng(5)


@pytest.mark.slow
def test_graph_module_equals_onnxruntime_on_the_float_digits_vit():
    model = onnx.load(str(fixtures.digits_vit()))
    feeds = {"pixels": fixtures.digits_data()["x_test"][:16]}
    want = InferenceSession(model).run(None, feeds)[0]
    got = GraphModule(model)(_torch_feeds(feeds, slice(None)))[0].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "route", "ops"),
    [
        ("gpt2", "ts17", {"Split"}),
        ("llama", "ts17", {"Sin", "Cos"}),
        ("bert", "ts17", {"IsNaN"}),
        ("mpnet", "ts17", {"CumSum", "Log"}),
        ("swin", "ts17", {"Pad", "GlobalAveragePool"}),
        ("deberta-v2", "ts17", {"Tile", "Sign", "Ceil"}),
        ("levit", "ts17", {"HardSwish", "BatchNormalization"}),
        ("bart", "ts17", {"ScatterND"}),
        ("wav2vec2", "ts17", {"InstanceNormalization"}),
        ("clip-text", "ts17", {"ArgMax"}),
        ("gemma2", "dynamo", {"Gelu", "GatherND"}),
        ("siglip-vision", "ts17", {"Conv"}),  # auto_pad VALID
    ],
)
def test_graph_module_runs_what_users_export(arch, route, ops):
    """finetune builds a torch module of every op the zoo's exports use (tiny random-init models, exported as
    their users do), equal to onnxruntime up to float rounding."""
    from spikec.passes.canonicalize import canonicalize
    from spikec.passes.loader import load_model

    from examples import zoo

    model = canonicalize(load_model(zoo.export(zoo.ARCHS[arch], zoo.ROUTES[route])))
    assert ops <= {n.op_type for n in model.graph.node}
    feeds = zoo.feeds_for(zoo.ARCHS[arch], [i.name for i in model.graph.input], 3, zoo.EVALUATION_SEED)
    with torch.no_grad():
        got = GraphModule(model)(_torch_feeds(feeds, slice(None)))
    for want, have in zip(InferenceSession(model).run(None, feeds), got, strict=True):
        finite = np.isfinite(want)
        np.testing.assert_array_equal(finite, np.isfinite(have.numpy()))
        scale = np.abs(want[finite]).max()
        np.testing.assert_allclose(have.numpy()[finite], want[finite], atol=1e-4 * scale, rtol=0)


def _mlp() -> onnx.ModelProto:
    """LayerNorm -> MatMul -> GELU (Erf form) -> MatMul: quantizers at the LayerNorm output, the GELU output (the
    one between the products) and the second product's output."""

    def init(name, *shape):
        return onnx.numpy_helper.from_array((RNG.standard_normal(shape) * 0.5).astype(np.float32), name)

    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["u"]),
        helper.make_node("Div", ["u", "sqrt2"], ["u2"]),
        helper.make_node("Erf", ["u2"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["u", "e1"], ["ue"]),
        helper.make_node("Mul", ["ue", "half"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    consts = [
        onnx.numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5))
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6])],
        [init("g", 8), init("b", 8), init("w1", 8, 16), init("w2", 16, 6), *consts],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
def test_finetune_lowers_the_loss_resumes_and_converts(tmp_path):
    model = _mlp()
    calib = {"x": RNG.standard_normal((64, 4, 8)).astype(np.float32)}
    checkpoint, out = tmp_path / "run.ckpt", tmp_path / "qann.onnx"
    # from PTQ without the refit, which would leave training less to do on this small model
    tuned, summary = spikec.finetune(
        model, calib, out, levels=4, steps=40, checkpoint=checkpoint, lr=1e-2, progress=False, refit=False
    )
    assert summary["steps"] == 40 and summary["loss_after"] < 0.8 * summary["loss_before"]
    # measured on every fifth sample, which training never saw; what the QANN writes is what the torch module
    # trained: onnxruntime sees the same loss there
    assert (summary["measured_on"], summary["measured_samples"]) == ("held-back", 12)
    assert _held_back_loss(model, onnx.load(out), calib) == pytest.approx(summary["loss_after"], rel=1e-2)
    # resumed from the checkpoint: 40 more steps, the start loss kept from the first run
    _, resumed = spikec.finetune(
        model, calib, levels=4, steps=80, checkpoint=checkpoint, lr=1e-2, progress=False, refit=False
    )
    assert resumed["steps"] == 80 and resumed["loss_before"] == summary["loss_before"]
    assert resumed["loss_after"] < summary["loss_after"]
    with pytest.raises(SpikecError, match="checkpoint: .* another model"):
        spikec.finetune(model, calib, levels=8, steps=1, checkpoint=checkpoint, progress=False)
    # the fine-tuned QANN converts, and its SNN equals it
    feeds = {"x": RNG.standard_normal((16, 4, 8)).astype(np.float32)}
    snn = spikec.compile(tuned, calib, method="spikezip", timesteps=24, progress=False)
    qann_out = InferenceSession(tuned).run(["y"], feeds)[0]
    np.testing.assert_allclose(
        InferenceSession(snn).run(["y"], feeds)[0], qann_out, atol=1e-4 * np.abs(qann_out).max(), rtol=0
    )


def _loss(model: onnx.ModelProto, qann: onnx.ModelProto, feeds: dict) -> float:
    """The distillation loss onnxruntime sees on these samples."""
    want = InferenceSession(model).run(None, feeds)[0]
    got = InferenceSession(qann).run(None, feeds)[0]
    return float(np.mean(np.square(got - want)) / np.mean(np.square(want)))


def _held_back_loss(model: onnx.ModelProto, qann: onnx.ModelProto, feeds: dict) -> float:
    """The distillation loss onnxruntime sees on the samples finetune holds back (every fifth)."""
    return _loss(model, qann, {name: array[4::5] for name, array in feeds.items()})


def _residual_block() -> onnx.ModelProto:
    """x + (x W1 + b1) -> LayerNorm -> W2: a hidden state (the LayerNorm's output) between quantized products."""

    def init(name, *shape):
        return onnx.numpy_helper.from_array((RNG.standard_normal(shape) * 0.5).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"]),
        helper.make_node("Add", ["u", "b1"], ["ub"]),
        helper.make_node("Add", ["x", "ub"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6])],
        [init("w1", 8, 8), init("b1", 8), init("g", 8), init("b", 8), init("w2", 8, 6)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _hidden_error(model: onnx.ModelProto, qann: onnx.ModelProto, feeds: dict, name: str) -> float:
    """The QANN's relative squared error at tensor ``name`` against the float model's."""

    def at(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        return InferenceSession(m).run([name], feeds)[0]

    want = at(model)
    return float(np.mean(np.square(at(qann) - want)) / np.mean(np.square(want)))


@pytest.mark.slow
def test_hidden_state_distillation_fits_the_layernorm_output(tmp_path):
    model = _residual_block()
    assert hidden_states(model) == ["h"]
    # enough samples that the fifth held back measures what training fits (with 64, 13 samples held back
    # often judged 60 steps no better than the start and kept it)
    calib = {"x": np.random.default_rng(0).standard_normal((256, 4, 8)).astype(np.float32)}
    ptq = spikec.quantize(model, calib, levels=4, progress=False)
    errors = {}
    for weight in (0.0, 4.0):
        tuned, summary = spikec.finetune(
            model, calib, levels=4, steps=60, lr=1e-2, hidden_weight=weight, progress=False
        )
        assert summary["loss_after"] < summary["loss_before"]
        errors[weight] = _hidden_error(model, tuned, calib, "h")
    # the outputs' loss alone lets the hidden state drift from the float one (its error grows past PTQ's);
    # the hidden state's own target brings it closer than PTQ had it
    assert errors[4.0] < 0.9 * _hidden_error(model, ptq, calib, "h") and errors[4.0] < 0.6 * errors[0.0]
    # a checkpoint of the output-only loss is not resumed with hidden states in the loss
    checkpoint = tmp_path / "run.ckpt"
    spikec.finetune(model, calib, levels=4, steps=2, checkpoint=checkpoint, hidden_weight=0.0, progress=False)
    with pytest.raises(SpikecError, match="checkpoint: .* another model"):
        spikec.finetune(model, calib, levels=4, steps=4, checkpoint=checkpoint, hidden_weight=1.0, progress=False)


def test_per_channel_bounds_pass_gradients_as_clip_does():
    """A level that lands exactly on a bound lies inside the quantizer's range: the Max and Min of per-channel
    bounds give it the whole gradient, as Clip with scalar bounds does, so LSQ trains both forms alike."""
    x = np.array([[0.2, 3.1, -1.3, 4.4, 2.0, -0.4]], np.float32)

    def clamped(nodes: list, low: np.ndarray, high: np.ndarray) -> torch.Tensor:
        graph = helper.make_graph(
            [helper.make_node("Floor", ["x"], ["levels"]), *nodes],
            "clamp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
            [onnx.numpy_helper.from_array(low, "x.quant_low"), onnx.numpy_helper.from_array(high, "x.quant_high")],
        )
        feed = torch.tensor(x, requires_grad=True)
        y = GraphModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))({"x": feed})[0]
        (y * torch.arange(1.0, 7.0)).sum().backward()
        np.testing.assert_array_equal(y.detach().numpy(), np.clip(np.floor(x), 0, 3))
        return feed.grad

    clip = clamped([helper.make_node("Clip", ["levels", "x.quant_low", "x.quant_high"], ["y"])], *np.float32([0, 3]))
    per_channel = clamped(
        [
            helper.make_node("Max", ["levels", "x.quant_low"], ["raised"]),
            helper.make_node("Min", ["raised", "x.quant_high"], ["y"]),
        ],
        np.zeros(6, np.float32),
        np.full(6, 3, np.float32),
    )
    np.testing.assert_array_equal(clip.numpy(), [[1, 2, 0, 0, 5, 0]])
    np.testing.assert_array_equal(per_channel.numpy(), clip.numpy())


@pytest.mark.slow
def test_qdrop_replaces_quantized_values_by_float_ones_in_training_only():
    model = _mlp()
    calib = {"x": np.random.default_rng(0).standard_normal((256, 4, 8)).astype(np.float32)}
    # without the refit, the QANN's weights are the float model's
    qann = spikec.quantize(model, calib, levels=4, progress=False, refit=False)
    module = GraphModule(qann)
    assert len(module.float_inputs) == sum(n.op_type == "Floor" for n in qann.graph.node) == 3
    feeds = _torch_feeds(calib, slice(None))
    want = InferenceSession(model).run(None, calib)[0]
    quantized = InferenceSession(qann).run(None, calib)[0]
    module.qdrop = 1.0  # every quantizer dropped: the float model
    with torch.no_grad():
        np.testing.assert_allclose(module(feeds)[0].numpy(), want, atol=1e-4 * np.abs(want).max(), rtol=0)
        module.eval()  # QDrop is for training only
        np.testing.assert_allclose(module(feeds)[0].numpy(), quantized, atol=1e-4 * np.abs(want).max(), rtol=0)
        module.train()
        module.qdrop = 0.5
        name = next(iter(module.float_inputs))
        mixed, float_input = module(feeds, [name, module.float_inputs[name]])[1:]
        kept = torch.isclose(mixed, float_input, atol=0, rtol=0).float().mean().item()
    assert 0.4 < kept < 0.6
    tuned, summary = spikec.finetune(model, calib, levels=4, steps=100, lr=1e-2, qdrop=0.5, progress=False, refit=False)
    # training with half the values float still fits the quantized model: on the samples trained on (all but
    # every fifth), 0.70-0.91 of the PTQ QANN's loss over 8 draws of model and data
    trained = {"x": np.delete(calib["x"], np.s_[4::5], axis=0)}
    assert summary["kept_step"] > 0
    assert _loss(model, tuned, trained) < 0.95 * _loss(model, qann, trained)
    assert [(n.op_type, list(n.input)) for n in tuned.graph.node] == [
        (n.op_type, list(n.input)) for n in qann.graph.node
    ]
    with pytest.raises(SpikecError, match="argument qdrop"):
        spikec.finetune(model, calib, levels=4, steps=1, qdrop=1.0, progress=False)


def test_cli_finetune_without_torch_is_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_mlp(), model)
    fixtures.write_npz(tmp_path / "c.npz", {"x": RNG.standard_normal((8, 4, 8)).astype(np.float32)})
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None; "
        "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else _find(name, *a); "
        "from spikec.cli import main; sys.exit(main())"
    )
    code = "import importlib.util as u; _find = u.find_spec; " + code
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "finetune",
            str(model),
            "--calib",
            str(tmp_path / "c.npz"),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "needs PyTorch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_cli_finetune_says_what_it_quantized_and_trained(tmp_path, capfd):
    """`spikec finetune` prints one line: the quantizers and the refit (as `spikec quantize` does), then the
    distillation loss before and after its steps, counted as the written QANN and the summary have them."""
    from spikec.cli import main

    calib, out = tmp_path / "calib.npz", tmp_path / "qann.onnx"
    onnx.save(_mlp(), tmp_path / "mlp.onnx")
    np.savez(calib, x=RNG.standard_normal((64, 4, 8)).astype(np.float32))
    args = ["finetune", str(tmp_path / "mlp.onnx"), "--calib", str(calib), "-o", str(out), "--levels", "4"]
    assert main([*args, "--steps", "3", "--quiet"]) == 0
    line = capfd.readouterr().out.strip()
    scales = [t for t in onnx.load(out).graph.initializer if t.name.endswith(".quant_scale")]
    assert line.startswith(f"{len(scales)} quantizers (") and "weight products" in line
    assert re.search(r" after 3 steps( \(kept the parameters of step [0-3]\))?; wrote ", line), line
    assert line.endswith(str(out))


def test_training_that_diverges_hands_back_the_best_parameters_measured():
    """Steps far too large: the loss measured every few steps rises above the start's, and what finetune
    returns is the start (or the best measurement), whose loss the summary reports and onnxruntime sees."""
    from spikec.passes.canonicalize import canonicalize

    from spikec.lsq import finetune
    from spikec.methods.spikezip import quantize_model

    model = _mlp()
    calib = {"x": RNG.standard_normal((64, 4, 8)).astype(np.float32)}
    want = InferenceSession(model).run(None, calib)[0]
    qann, _, _ = quantize_model(canonicalize(model), calib, 4, batch_size=16, progress=False, refit=False)
    tuned, summary = finetune(qann, calib, [want], steps=20, lr=3.0, scale_lr=3.0, progress=False, evaluate_every=5)
    assert summary["steps"] == 20 and summary["kept_step"] in (0, 5, 10, 15)
    assert summary["loss_after"] <= summary["loss_before"]
    assert _held_back_loss(model, tuned, calib) == pytest.approx(summary["loss_after"], rel=1e-2)
    if summary["kept_step"] == 0:
        for a, b in zip(qann.graph.initializer, tuned.graph.initializer, strict=True):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@pytest.mark.parametrize(
    ("argument", "value"),
    [("steps", 0), ("steps", -5), ("lr", 0.0), ("lr", float("nan")), ("scale_lr", -1e-3), ("time_budget", -1.0)],
)
def test_bad_training_arguments_are_refused_before_quantizing(argument, value):
    """A step count or rate that trains nothing (or NaN) is refused in one line, before the minutes of PTQ."""
    calib = {"x": RNG.standard_normal((8, 4, 8)).astype(np.float32)}
    with pytest.raises(SpikecError, match=f"argument {argument}="):
        spikec.finetune("no-such-model.onnx", calib, levels=4, progress=False, **{argument: value})


def test_few_samples_are_measured_where_trained_and_old_checkpoints_are_refused(tmp_path):
    """Below five samples nothing can be held back: the loss is measured on the samples trained on. A
    checkpoint of another layout (an older spikec's, whose best parameters were measured on every sample)
    is refused in one line, not resumed."""
    from spikec.passes.canonicalize import canonicalize

    from spikec.lsq import finetune
    from spikec.methods.spikezip import quantize_model

    model = _mlp()
    calib = {"x": RNG.standard_normal((4, 4, 8)).astype(np.float32)}
    want = InferenceSession(model).run(None, calib)[0]
    qann, _, _ = quantize_model(canonicalize(model), calib, 4, batch_size=16, progress=False, refit=False)
    _, summary = finetune(qann, calib, [want], steps=2, progress=False)
    assert (summary["measured_on"], summary["measured_samples"]) == ("training", 4)
    got = InferenceSession(qann).run(None, calib)[0]
    loss = np.mean(np.square(got - want)) / np.mean(np.square(want))
    assert summary["loss_before"] == pytest.approx(loss, rel=1e-2)
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"fingerprint": "x", "params": {}, "step": 1, "best": {}}, checkpoint)
    with pytest.raises(SpikecError, match="checkpoint: .* older spikec"):
        finetune(qann, calib, [want], steps=2, progress=False, checkpoint=checkpoint)


def test_checkpoint_is_checked_before_quantizing(tmp_path):
    """A checkpoint that is the output, or no checkpoint at all, is refused in one line before the PTQ."""
    model, out = tmp_path / "mlp.onnx", tmp_path / "qann.onnx"
    onnx.save(_mlp(), model)
    calib = {"x": RNG.standard_normal((8, 4, 8)).astype(np.float32)}
    with pytest.raises(SpikecError, match=r"^checkpoint .*qann.onnx: is also the output"):
        spikec.finetune(model, calib, out, levels=4, steps=1, checkpoint=out, progress=False)
    garbage = tmp_path / "run.ckpt"
    garbage.write_bytes(b"\x08 not a checkpoint")
    # with a wrong input shape too: the checkpoint is said first, before the model is even loaded
    with pytest.raises(SpikecError, match="argument checkpoint: .*run.ckpt: cannot read it"):
        spikec.finetune(
            model, calib, out, levels=4, steps=1, checkpoint=garbage, progress=False, input_shapes={"x": [1]}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "run.ckpt"]
