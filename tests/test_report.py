"""`spikec report` and `spikec inspect` on the digits ViT, converted by every method: every number checked
against an independent recomputation (numpy on tensors fetched straight from onnxruntime, or by hand
from the architecture)."""

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from spikec.passes.sta import STAOptions
from spikec.runtime import equilibrium_steps
from spikec.runtime.metadata import SpikecMetadata

import spikec
from examples import fixtures
from spikec import methods
from spikec.cli import inspect_model, main
from spikec.errors import SpikecError
from spikec.evaluate import cosine, fidelity, finite_scale, max_abs_error
from spikec.methods import Method
from spikec.methods.ecmt import ECMT
from spikec.methods.spikezip import integer_qann
from spikec.report import build_report, energy, plots, write_report
from spikec.report.section import Context
from spikec.report.sta import STASection

pytestmark = pytest.mark.slow  # real models end to end; the fast tier is `pytest -m "not slow"`

T = 4
SAMPLES = 64
FEW = 32  # samples for the other methods' reports
# digits ViT: 8x8 image, patch 2 -> 16 patches + CLS = 17 tokens, dim 64, 4 heads of 16, MLP 128, 4 blocks
TOKENS, DIM, HEADS, MLP, BLOCKS, CLASSES = 17, 64, 4, 128, 4, 10
HEAD_DIM = DIM // HEADS
GELU_HIDDEN = 32  # STA's GELU UGO, the paper's size
COMMON_PLOTS = ("fidelity", "layers", "firing", "energy")
METHOD_PLOTS = {
    "ecmt": ("levels",),
    "spikezip": ("steps",),
    "sta": ("burst", "ugo"),
    "ttfs": ("spike_times", "clipping"),
}


@pytest.fixture(scope="module")
def root(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    np.savez(root / "x.npz", pixels=digits["x_test"][:SAMPLES])
    np.savez(root / "y.npz", labels=digits["y_test"][:SAMPLES])
    np.savez(root / "x_few.npz", pixels=digits["x_test"][:FEW])
    np.savez(root / "y_few.npz", labels=digits["y_test"][:FEW])
    return root


def _report(root, name, ann, snn, *extra, samples=FEW):
    """The report written by the CLI, and its data."""
    inputs, labels = ("x", "y") if samples == SAMPLES else ("x_few", "y_few")
    out = root / f"report_{name}"
    assert (
        main(
            [
                "report",
                str(ann),
                str(snn),
                "--inputs",
                str(root / f"{inputs}.npz"),
                "--labels",
                str(root / f"{labels}.npz"),
                "-o",
                str(out),
                "--quiet",
                *extra,
            ]
        )
        == 0
    )
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def made(digits, root):
    """ECMT (T=4), reported on 64 samples."""
    ann = fixtures.digits_vit()
    snn = root / "ecmt.onnx"
    spikec.compile(ann, {"pixels": digits["x_train"][:128]}, snn, timesteps=T, progress=False)
    out, data = _report(root, "ecmt", ann, snn, samples=SAMPLES)
    return {
        "ann": ann,
        "snn": snn,
        "x": digits["x_test"][:SAMPLES],
        "y": digits["y_test"][:SAMPLES],
        "out": out,
        "data": data,
    }


@pytest.fixture(scope="module")
def spikezip_made(digits, root):
    """SpikeZIP-TF: a float ANN quantized by the compile (its QANN saved beside), reported with --qann."""
    ann, snn, qann = fixtures.digits_vit(), root / "spikezip.onnx", root / "qann.onnx"
    spikec.compile(
        ann,
        {"pixels": digits["x_train"][:128]},
        snn,
        method="spikezip",
        save_qann=qann,
        progress=False,
    )  # T measured by the compile: past the held-out calibration images' T_eq, plus a margin
    out, data = _report(root, "spikezip", ann, snn, "--qann", str(qann))
    t = SpikecMetadata.read(onnx.load(snn)).timesteps
    return {"ann": ann, "qann": qann, "snn": snn, "x": digits["x_test"][:FEW], "out": out, "data": data, "t": t}


@pytest.fixture(scope="module")
def sta_made(digits, root):
    ann, snn = fixtures.digits_vit(), root / "sta.onnx"
    # little calibration data: the GELU UGOs' threshold search dominates the compile
    spikec.compile(ann, {"pixels": digits["x_train"][:16]}, snn, method="sta", timesteps=T, progress=False)
    out, data = _report(root, "sta", ann, snn)
    return {"ann": ann, "snn": snn, "x": digits["x_test"][:FEW], "out": out, "data": data}


@pytest.fixture(scope="module")
def ttfs_made(digits, root):
    ann, snn = fixtures.digits_vit(), root / "ttfs.onnx"
    spikec.compile(ann, {"pixels": digits["x_train"][:128]}, snn, method="ttfs", progress=False)
    out, data = _report(root, "ttfs", ann, snn)
    return {"ann": ann, "snn": snn, "x": digits["x_test"][:FEW], "out": out, "data": data}


METHODS = {"ecmt": "made", "spikezip": "spikezip_made", "sta": "sta_made", "ttfs": "ttfs_made"}


@pytest.fixture(params=list(METHODS))
def any_made(request):
    return request.param, request.getfixturevalue(METHODS[request.param])


def fetch(model, names, feeds):
    """Intermediate tensors straight from onnxruntime: the names become extra outputs of a copy."""
    model = onnx.load(model) if not isinstance(model, onnx.ModelProto) else model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    declared = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in declared)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


# ------------------------------------------------------------------ every method


def test_every_method_writes_html_json_and_nontrivial_plots(any_made):
    import matplotlib.image

    method, made = any_made
    out, data = made["out"], made["data"]
    assert data["method"] == method
    html = (out / "index.html").read_text()
    names = (*COMMON_PLOTS, *METHOD_PLOTS[method])
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(names)
    for name in names:
        png = out / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        pixels = matplotlib.image.imread(png)[..., :3]
        assert pixels.var() > 1e-3, name  # not a single colour
        colours = np.rint(pixels * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
        assert len(np.unique(colours)) > 20, name
        assert f'data-file="{name}.png"' in html
    assert html.count('src="data:image/png;base64,') == len(names)  # self-contained
    for text in ("4.6 pJ", "0.9 pJ", "Table 1", "TTFSFormer", "top-1 agreement", "symlog"):
        assert text in html
    assert data["classifier"] and not data["layers_skipped"]


def test_every_method_counts_energy_by_the_same_terms(made, spikezip_made, sta_made, ttfs_made):
    reports = [m["data"] for m in (made, spikezip_made, sta_made, ttfs_made)]
    for data in reports:
        e = data["energy"]
        rules = [(k, rule) for k, (_, rule) in energy.TERMS.items()]
        assert [(t["term"], t["rule"]) for t in e["snn"]["terms"]] == rules
        # the same ANN: the same baseline for every method
        assert e["ann"]["product_macs"] == 2_380_928
        assert e["ann"]["energy_pj"] == reports[0]["energy"]["ann"]["energy_pj"]
        snn_pj = sum(t["acs"] * 0.9 + t["macs"] * 4.6 for t in e["snn"]["terms"])
        assert e["ratio"] == pytest.approx(snn_pj / e["ann"]["energy_pj"])
        terms = {t["term"]: t for t in e["snn"]["terms"]}
        paper_acs = (
            terms["spike_products"]["acs"] + terms["ttfs_constructions"]["acs"] + e["snn"]["act_act_event_driven_acs"]
        )
        assert e["ratio_paper_convention"] == pytest.approx(0.9 * paper_acs / (4.6 * e["ann"]["product_macs"]))
        # spike-driven ACs are what the sites fired times the fan-out of the products they feed
        spikes = {s["source"]: s["spikes_per_sample"] for s in data["sites"]}
        fed = [p for p in e["snn"]["products"] if p["counted_as"] == "spike_products" and not p.get("claimed")]
        assert fed and all(p["acs"] == pytest.approx(spikes[p["source"]] * p["fan_out"]) for p in fed)
        assert not e["uncounted"]


# ------------------------------------------------------------------ ECMT


def test_fidelity_matches_numpy(made):
    feeds = {"pixels": made["x"]}
    ann = fetch(made["ann"], ["logits"], feeds)["logits"]
    steps = fetch(made["snn"], ["logits.steps"], feeds)["logits.steps"]
    assert steps.shape == (T, SAMPLES, CLASSES)
    reference = made["data"]["fidelity"]["ANN"]
    output = reference["outputs"]["logits"]
    assert reference["model"] == str(made["ann"]) and made["data"]["references"] == ["ANN"]
    assert [r["t"] for r in output["per_t"]] == list(range(1, T + 1))
    for t, row in enumerate(output["per_t"]):
        # the report runs in batches, this run all at once: MatMul rounds by batch shape, and a value at a
        # threshold may flip a spike, so the numbers agree to a spike flip, not bit for bit
        assert row["cosine"] == pytest.approx(cosine(ann, steps[t]), abs=1e-3)
        assert row["top1_agreement"] == np.mean(steps[t].argmax(1) == ann.argmax(1))
        assert row["accuracy"] == np.mean(steps[t].argmax(1) == made["y"])
        assert row["max_abs_error"] == pytest.approx(np.abs(steps[t] - ann).max(), rel=0.05)
    assert output["accuracy"] == np.mean(ann.argmax(1) == made["y"])
    assert output["per_t"][-1]["cosine"] > 0.95


def test_firing_rates_match_numpy(made):
    rows = {r["site"]: r for r in made["data"]["sites"]}
    assert len(rows) == 4 * 8 + 1 and {r["kind"] for r in rows.values()} == {"MTNeuron"}
    tensor = "/blocks.1/mlp/mlp.1/Mul_1_output_0"  # GELU output: the fc2 input neuron
    row = rows[tensor]
    codes = fetch(made["snn"], [row["source"]], {"pixels": made["x"]})[row["source"]]
    assert codes.shape == (T * SAMPLES, TOKENS, MLP)
    assert row["neurons"] == TOKENS * MLP
    assert row["spikes_per_neuron_per_step"] == pytest.approx(np.count_nonzero(codes) / codes.size, rel=1e-3)  # flips
    assert 0.05 < row["spikes_per_neuron_per_step"] < 1.0
    # positive codes are 2^k; negative ones -(theta_neg/theta_pos) 2^k
    site = next(n for n in inspect_model(str(made["snn"]))["neurons"] if n["tensor"] == tensor)
    ratio = np.broadcast_to(np.asarray(site["theta_neg"]) / np.asarray(site["theta_pos"]), codes.shape)  # per channel
    positive = np.log2(codes[codes > 0])
    negative = np.log2(-codes[codes < 0] / ratio[codes < 0])
    np.testing.assert_allclose(positive, np.rint(positive), atol=1e-4)
    np.testing.assert_allclose(negative, np.rint(negative), atol=1e-4)
    np.testing.assert_allclose(
        row["positive"], np.bincount(np.rint(positive).astype(int), minlength=8), rtol=1e-2, atol=2
    )
    np.testing.assert_allclose(
        row["negative"], np.bincount(np.rint(negative).astype(int), minlength=8), rtol=1e-2, atol=2
    )
    assert sum(row["split"].values()) == pytest.approx(row["spikes_per_sample"])
    levels = made["data"]["section"]
    assert sum(levels["positive_fraction"]) + sum(levels["negative_fraction"]) == pytest.approx(1.0)
    # ECMT Fig. 6: most spikes use the base thresholds
    assert levels["positive_fraction"][0] + levels["negative_fraction"][0] > 0.5
    assert levels["compile_timesteps_search"] is None  # compiled at a T given


def test_per_layer_error_matches_numpy(made):
    layers = {r["tensor"]: r for r in made["data"]["layers"]}
    # an EC output (per-step increments: running mean) and a tensor inside EC (F of the means: last step)
    increments, inside = "/blocks.2/norm1/LayerNormalization_output_0", "/blocks.2/mlp/mlp.1/Erf_output_0"
    assert layers[increments]["estimate"] == "running mean"
    assert layers[inside]["estimate"] == "last step"
    feeds = {"pixels": made["x"]}
    ann = fetch(made["ann"], [increments, inside], feeds)
    snn = fetch(made["snn"], [increments, inside], feeds)
    estimates = {
        increments: snn[increments].reshape(T, SAMPLES, TOKENS, DIM).mean(0),
        inside: snn[inside].reshape(T, SAMPLES, TOKENS, MLP)[-1],
    }
    for name, estimate in estimates.items():
        reference = ann[name]
        assert layers[name]["cosine"] == pytest.approx(cosine(reference, estimate), abs=1e-5)
        relative = np.abs(estimate - reference).max() / np.abs(reference).max()
        assert layers[name]["relative_max_error"] == pytest.approx(relative, rel=1e-4)
    # the time-invariant embedding is exact; the logits layer equals the output fidelity at T
    assert layers["/Add_output_0"]["relative_max_error"] == 0
    assert layers["logits"]["cosine"] == pytest.approx(
        made["data"]["fidelity"]["ANN"]["outputs"]["logits"]["per_t"][-1]["cosine"]
    )


def test_cosine_and_errors_of_padded_rows_and_masks():
    rows = np.array([[1.0, 2.0], [0.0, 0.0]])
    assert cosine(rows, rows) == pytest.approx(1.0)  # a padded token's row, zero in both, is equal
    assert cosine(rows, np.array([[1.0, 2.0], [0.0, 1.0]])) == pytest.approx(0.5)
    mask = np.array([[0.0, -np.inf], [1.0, -np.inf]])  # an additive attention mask: -inf in both agrees
    assert cosine(mask, mask) == pytest.approx(1.0) and max_abs_error(mask, mask) == 0.0 and finite_scale(mask) == 1.0
    lost = np.array([[0.0, -1e9], [1.0, -np.inf]])  # the first row's -inf became finite: that row disagrees
    assert cosine(mask, lost) == pytest.approx(0.5) and max_abs_error(mask, lost) == np.inf
    both_nan = np.array([[np.nan, 3.0]])
    assert cosine(both_nan, both_nan) == pytest.approx(1.0) and cosine(both_nan, np.array([[1.0, 3.0]])) == 0.0


def test_layers_of_a_padded_text_model_are_compared_not_skipped(tmp_path):
    """bert with right-padded inputs: the extended attention mask's rows of padded keys are zero in both
    models (cosine 1, not 0), and the position embeddings, computed once and not per step, are compared."""
    model = fixtures.random_transformer("bert")
    snn = tmp_path / "snn.onnx"
    spikec.compile(model, fixtures.random_inputs("bert", 32), snn, method="ecmt", timesteps=4, progress=False)
    data = build_report(model, snn, fixtures.random_inputs("bert", 8, seed=1))
    json.dumps(data, allow_nan=False)
    layers = {layer["tensor"]: layer for layer in data["layers"]}
    assert data["layers_skipped"] == []
    position = layers["/model/embeddings/position_embeddings/Gather_output_0"]
    assert position["estimate"] == "last step" and position["max_abs_error"] == 0 and position["cosine"] == 1
    exact = [layer for layer in data["layers"] if layer["max_abs_error"] == 0]
    assert len(exact) > 5 and all(layer["cosine"] == pytest.approx(1.0) for layer in exact)


def test_energy_counts_by_hand(made):
    energy = made["data"]["energy"]
    per_block = (
        3 * TOKENS * DIM * DIM  # q, k, v
        + 2 * HEADS * TOKENS * TOKENS * HEAD_DIM  # q k^T and attn v
        + TOKENS * DIM * DIM  # proj
        + 2 * TOKENS * DIM * MLP
    )  # fc1, fc2
    patch_conv = DIM * 16 * 1 * 2 * 2  # 1 -> 64 channels, k=2 stride 2, 4x4 outputs
    head = DIM * CLASSES  # CLS token only
    assert energy["ann"]["product_macs"] == BLOCKS * per_block + patch_conv + head == 2_380_928
    layernorms, softmax, gelu = (2 * BLOCKS + 1) * TOKENS * DIM, BLOCKS * HEADS * TOKENS**2, BLOCKS * TOKENS * MLP
    assert energy["ann"]["nonlinear_ops"] == layernorms + softmax + gelu

    # spike-driven products: every spike reaches (output features) weights, one AC each
    firing = {r["site"]: r["spikes_per_sample"] for r in made["data"]["sites"]}
    fan_out = {
        "norm1/LayerNormalization_output_0": 3 * DIM,
        "attn/Reshape_3_output_0": DIM,
        "norm2/LayerNormalization_output_0": MLP,
        "mlp/mlp.1/Mul_1_output_0": DIM,
    }
    acs = sum(firing[f"/blocks.{b}/{t}"] * f for b in range(BLOCKS) for t, f in fan_out.items())
    acs += firing["/Gather_1_output_0"] * CLASSES
    terms = {t["term"]: t for t in energy["snn"]["terms"]}
    assert terms["spike_products"]["acs"] == pytest.approx(acs, rel=1e-9)
    # activation x activation products on running means, and the patch embedding, in float at every step
    act_act = BLOCKS * 2 * HEADS * TOKENS * TOKENS * HEAD_DIM
    assert terms["float_products"]["macs"] == T * (act_act + patch_conv)
    assert terms["nonlinear"]["macs"] == T * energy["ann"]["nonlinear_ops"]
    neurons = sum(r["neurons"] for r in made["data"]["sites"])
    assert neurons == made["data"]["model"]["neuron_counts"]["neurons_total"]
    assert terms["neuron_updates"]["acs"] == T * neurons
    # every EC element: running sum + division by t, and 2 MACs per compensated element
    assert terms["ec_accumulate"]["acs"] == terms["ec_accumulate"]["macs"] > 0
    assert terms["ec_compensate"]["macs"] > 0 and terms["ec_compensate"]["acs"] == 0
    assert all(terms[t]["acs"] == terms[t]["macs"] == 0 for t in ("ugo_inputs", "ugo_readout", "ttfs_constructions"))
    event_acs = energy["snn"]["act_act_event_driven_acs"]
    assert energy["ratio_paper_convention"] == pytest.approx(
        0.9 * (acs + event_acs) / (4.6 * energy["ann"]["product_macs"])
    )
    assert 0 < energy["ratio_paper_convention"] < energy["ratio"] < 1.5


# ------------------------------------------------------------------ SpikeZIP-TF


def test_spikezip_fidelity_against_the_qann_and_the_float_ann(spikezip_made):
    data = spikezip_made["data"]
    # integer-exact by default: compile held the SNN to the integer QANN, and so does the report
    assert data["references"] == ["QANN", "integer QANN", "float ANN"] and data["layers_reference"] == "QANN"
    feeds = {"pixels": spikezip_made["x"]}
    steps = fetch(spikezip_made["snn"], ["logits.steps"], feeds)["logits.steps"]
    integer = integer_qann(onnx.load(spikezip_made["qann"]))
    for label, model, reference_model in (
        ("QANN", spikezip_made["qann"], spikezip_made["qann"]),
        ("integer QANN", spikezip_made["qann"], integer),
        ("float ANN", spikezip_made["ann"], spikezip_made["ann"]),
    ):
        reference = fetch(reference_model, ["logits"], feeds)["logits"]
        assert data["fidelity"][label]["model"] == str(model)
        got = data["fidelity"][label]["outputs"]["logits"]["per_t"]
        want = fidelity(reference, steps)
        assert len(got) == spikezip_made["t"]
        for g, w in zip(got, want):
            assert g["cosine"] == pytest.approx(w["cosine"], abs=1e-6)
            assert g["top1_agreement"] == w["top1_agreement"]
    # quiet by T: the SNN is its QANN up to float rounding at level boundaries, and only approximates the ANN
    last = data["fidelity"]["QANN"]["outputs"]["logits"]["per_t"][-1]
    assert last["cosine"] > 0.9999 and last["top1_agreement"] == 1.0
    assert data["fidelity"]["float ANN"]["outputs"]["logits"]["per_t"][-1]["cosine"] < last["cosine"]
    assert data["fidelity"]["integer QANN"]["outputs"]["logits"]["per_t"][-1]["max_abs_error"] == 0
    # per layer against the QANN: the logits are exact once quiet
    layers = {r["tensor"]: r for r in data["layers"]}
    assert layers["logits"]["estimate"] == "graph output (after T steps)"
    assert layers["logits"]["cosine"] == pytest.approx(last["cosine"])
    assert layers["/Add_output_0"]["estimate"] == "last step" and layers["/Add_output_0"]["relative_max_error"] == 0


def test_spikezip_equilibrium_steps_and_spikes_per_layer(spikezip_made):
    data = spikezip_made["data"]
    feeds = {"pixels": spikezip_made["x"]}
    site = next(s for s in data["sites"] if s["site"] == "/blocks.1/mlp/mlp.1/Mul_1_output_0")
    fetched = fetch(spikezip_made["snn"], ["spikec.spikes.steps", site["source"]], feeds)
    per_step = fetched["spikec.spikes.steps"]
    steps = spikezip_made["t"]
    assert per_step.shape == (steps, FEW)
    section = data["section"]
    assert section["t_eq"] == equilibrium_steps(per_step) and None not in section["t_eq"]
    assert section["not_quiet"] == 0 and 10 <= section["max_t_eq"] < steps
    # the T the compile measured, and how: the report says it beside what these samples took
    assert section["compile_equilibrium"]["timesteps"] == steps
    assert (
        f"The compile chose T={steps}: the steps until no neuron fires on "
        in (spikezip_made["out"] / "index.html").read_text()
    )
    assert sum(section["t_eq_histogram"]) == FEW
    np.testing.assert_allclose(section["spikes_per_step"], per_step.mean(axis=1))
    # ternary codes: a spike is a nonzero code, and a GELU output's ST-BIF+ neurons per element
    codes = fetched[site["source"]]
    assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0} and site["kind"] == "STBIFIntegerNeuron"
    # integer-exact by default: every tensor between neurons is a running total, read at the last step
    # (summing its per-step values would count it T times over), and equal to the QANN's once quiet
    assert data["layers"] and all(layer["cosine"] > 1 - 1e-6 for layer in data["layers"])
    assert {layer["estimate"] for layer in data["layers"]} == {"last step", "graph output (after T steps)"}
    assert site["neurons"] == TOKENS * MLP
    assert site["spikes_per_sample"] == pytest.approx(np.count_nonzero(codes) / FEW)
    # every spike of the model is some site's
    assert sum(s["spikes_per_sample"] for s in data["sites"]) == pytest.approx(per_step.sum() / FEW)
    assert len(data["sites"]) == len(SpikecMetadata.read(onnx.load(spikezip_made["snn"])).report.neurons)
    terms = {t["term"]: t for t in data["energy"]["snn"]["terms"]}
    # sum semantics: running sums cost an AC, differences an AC; no division by t
    assert terms["ec_accumulate"]["macs"] == 0 < terms["ec_accumulate"]["acs"]
    assert terms["ec_compensate"]["macs"] == 0 < terms["ec_compensate"]["acs"]
    assert terms["neuron_updates"]["acs"] == steps * sum(s["neurons"] for s in data["sites"])


def test_spikezip_needs_its_qann(spikezip_made, made):
    x = {"pixels": spikezip_made["x"][:4]}
    with pytest.raises(SpikecError, match="no activation quantizers; pass the QANN with --qann"):
        build_report(spikezip_made["ann"], spikezip_made["snn"], x)
    # the QANN as ANN
    assert build_report(spikezip_made["qann"], spikezip_made["snn"], x)["references"] == ["QANN", "integer QANN"]
    with pytest.raises(SpikecError, match="--qann: only a spikezip model"):
        build_report(made["ann"], made["snn"], x, qann=spikezip_made["qann"])


@pytest.mark.filterwarnings("ignore::spikec.compiler.FidelityWarning")
def test_the_models_given_are_checked_against_the_snns_record(made, spikezip_made, digits, tmp_path, capsys):
    """An SNN records the digest of its source's weights (runtime/weights.digest): the model it was compiled
    from, another export of the same weights and a QANN's float model pass; another model's weights are
    warned of by eval and the report, and said in report.json and on the page."""
    assert made["data"]["source_check"] == {"ANN": True}
    assert spikezip_made["data"]["source_check"] == {"QANN": True, "float ANN": True}
    x = {"pixels": made["x"][:4]}
    assert build_report(fixtures.digits_vit(exporter="dynamo"), made["snn"], x)["source_check"] == {"ANN": True}
    other = onnx.load(made["ann"])
    weight = max(other.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.01
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.warns(UserWarning, match=r"ANN .*other.onnx: not the model .*ecmt.onnx was made from"):
        data = build_report(tmp_path / "other.onnx", made["snn"], x)
    assert data["source_check"] == {"ANN": False}
    page = (write_report(data, tmp_path / "page")).read_text()
    assert "is not the model the SNN was made from" in page
    np.savez(tmp_path / "x.npz", **x)
    assert (
        main(["eval", str(tmp_path / "other.onnx"), str(made["snn"]), "--inputs", str(tmp_path / "x.npz"), "--quiet"])
        == 0
    )
    assert "spikec: warning: ANN " in capsys.readouterr().err
    # `spikec quantize`, then the QANN compiled: its float model is known to the SNN through the QANN
    qann, snn = tmp_path / "qann.onnx", tmp_path / "spikezip.onnx"
    spikec.quantize(made["ann"], {"pixels": digits["x_train"][:64]}, qann, progress=False)
    spikec.compile(qann, {"pixels": digits["x_train"][:64]}, snn, method="spikezip", timesteps=8, progress=False)
    checked = build_report(made["ann"], snn, x, qann=qann)["source_check"]
    assert checked == {"QANN": True, "float ANN": True}


# ------------------------------------------------------------------ STA


def test_sta_probes_fire_the_spikes_of_the_encoders_and_ugos(sta_made):
    """The probes (IFNeuron ops fed what the X2X encoder's and the UGO's IF steps are fed) reproduce the
    ops' outputs: x's spikes minus -x's are the encoder's output bit for bit, and w2 . hidden spikes + b2 is
    the UGO's output."""
    model = onnx.load(sta_made["snn"])
    x = sta_made["x"][:8]
    record = SpikecMetadata.read(model)
    section = STASection(Context(model, record, T, len(x)))
    probed = section.model(model)
    encoder = next(p for p in section.probes if not p.ugo)
    ugo = next(p for p in section.probes if p.ugo and "mlp" in p.node.name)
    counts = [f"{o}.{c}" for o in (*encoder.outputs, *ugo.outputs) for c in ("spikes", "bursts")]
    counts.append(f"{ugo.outputs[0]}.per_unit")
    got = fetch(
        probed, [*encoder.outputs, encoder.node.output[0], *ugo.outputs, ugo.node.output[0], *counts], {"pixels": x}
    )
    positive, negative = (got[o] for o in encoder.outputs)
    np.testing.assert_array_equal(positive - negative, got[encoder.node.output[0]])
    hidden = got[ugo.outputs[0]]
    assert hidden.shape == (T * len(x), TOKENS, MLP, GELU_HIDDEN)
    w2, b2 = (section.context.initializer(ugo.node.input[i]) for i in (4, 5))
    np.testing.assert_allclose(hidden @ w2 + b2, got[ugo.node.output[0]], atol=1e-5)
    # spike values are k spikes of theta/burst, k <= burst
    theta = section.context.initializer(ugo.node.input[3])
    k = np.abs(hidden) / (theta / ugo.burst)
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)
    assert 1 < k.max() <= ugo.burst and (k == 1).any()
    # the counts made inside the run are those of the spikes themselves, exactly
    for probe, unit in ((encoder, encoder.units[0]), (ugo, theta / ugo.burst)):
        fired = np.rint(np.abs(got[probe.outputs[0]]) / unit).astype(np.int64)
        assert got[f"{probe.outputs[0]}.spikes"] == fired.sum()
        np.testing.assert_array_equal(
            got[f"{probe.outputs[0]}.bursts"], np.bincount(fired.ravel(), minlength=probe.burst + 1)
        )
    np.testing.assert_array_equal(got[f"{ugo.outputs[0]}.per_unit"], fired.reshape(-1, GELU_HIDDEN).sum(0))


def test_sta_sites_bursts_ugos_and_layernorms(sta_made):
    data = sta_made["data"]
    record = SpikecMetadata.read(onnx.load(sta_made["snn"]))
    kinds = [s["kind"] for s in data["sites"]]
    encoders = len(record.report.encoders)
    assert kinds.count("X2XEncoder") == encoders and kinds.count("UGO gelu") == BLOCKS
    assert kinds.count("UGO rsqrt") == len([u for u in record.report.ugos if u["operator"] == "rsqrt"])
    for site in data["sites"]:
        # every neuron-step emits 0..burst spikes; the histogram covers them all
        assert sum(site["bursts"]) == site["neurons"] * T * FEW
        assert sum(k * n for k, n in enumerate(site["bursts"])) == pytest.approx(site["spikes_per_sample"] * FEW)
        assert site["spikes_per_neuron_per_step"] <= data["section"]["burst"]
    gelu = next(s for s in data["sites"] if s["kind"] == "UGO gelu")
    assert gelu["neurons"] == GELU_HIDDEN * TOKENS * MLP and gelu["hidden"] == GELU_HIDDEN
    encoder = next(s for s in data["sites"] if s["site"] == "/blocks.0/norm1/LayerNormalization_output_0")
    assert encoder["neurons"] == 2 * TOKENS * DIM and sum(encoder["split"].values()) == pytest.approx(
        encoder["spikes_per_sample"]
    )
    section = data["section"]
    assert section["burst"] == STAOptions().burst and len(section["ugos"]) == kinds.count("UGO gelu") + kinds.count(
        "UGO rsqrt"
    )
    assert all(len(u["spikes_per_unit_per_step"]) == u["hidden"] for u in section["ugos"])
    floats = [n["region"] for n in section["layernorms"] if n["float"]]
    assert len(section["layernorms"]) == 2 * BLOCKS + 1 and floats == record.report.layernorms_kept_float
    terms = {t["term"]: t for t in data["energy"]["snn"]["terms"]}
    ugo_neurons = sum(s["neurons"] for s in data["sites"] if s["kind"].startswith("UGO"))
    assert terms["ugo_inputs"]["macs"] == T * ugo_neurons
    # the GELU UGOs feed fc2 (their spikes count there); the rsqrt UGOs' outputs are read out
    rsqrt = sum(s["spikes_per_sample"] for s in data["sites"] if s["kind"] == "UGO rsqrt")
    assert terms["ugo_readout"]["acs"] == pytest.approx(rsqrt)
    assert terms["neuron_updates"]["acs"] == T * sum(s["neurons"] for s in data["sites"])
    # the float Softmax and LayerNorms: one MAC per element and step
    softmax = BLOCKS * HEADS * TOKENS**2
    assert terms["nonlinear"]["macs"] == T * (softmax + len(floats) * TOKENS * DIM)


# ------------------------------------------------------------------ TTFS


def test_ttfs_spike_times_clipping_depth_and_energy(ttfs_made):
    data = ttfs_made["data"]
    assert not data["stepped"] and data["timesteps"] == 1
    output = data["fidelity"]["ANN"]["outputs"]["logits"]
    assert len(output["per_t"]) == 1 and output["per_t"][0]["cosine"] > 0.9999
    assert len(output["scatter"]["snn"]) == FEW * CLASSES
    sites = {s["site"]: s for s in data["sites"]}
    pixels = sites["pixels"]
    x = ttfs_made["x"]
    assert pixels["neurons"] == 64 and pixels["spikes_per_sample"] == pytest.approx((x > pixels["lower"]).sum() / FEW)
    spikes = fetch(ttfs_made["snn"], [pixels["source"]], {"pixels": x})[pixels["source"]]
    histogram = np.histogram(spikes[spikes < 1.0], bins=20, range=(0.0, 1.0))[0]  # delta = 1
    assert pixels["spike_times"] == [*histogram.tolist(), int((spikes >= 1.0).sum())]
    for site in data["sites"]:
        assert site["spikes_per_neuron_per_step"] <= 1  # at most one spike per neuron
        assert sum(site["spike_times"]) == site["neurons"] * FEW
    section = data["section"]
    assert section["clipped_sites"] == 0 and section["depth"] == 88
    terms = {t["term"]: t for t in data["energy"]["snn"]["terms"]}
    assert terms["ttfs_constructions"]["acs"] == sum(c["operations"] for c in section["constructions"])
    assert terms["neuron_updates"]["acs"] == 0 and terms["ec_accumulate"]["acs"] == 0
    # the patch embedding reads the pixels' spikes: one AC per spike and output feature it reaches
    conv = next(p for p in data["energy"]["snn"]["products"] if p["node"] == "/patch_embed/Conv")
    assert conv["source"] == pixels["source"] and conv["fan_out"] == DIM  # k=2 stride 2: each pixel in one patch
    assert 0.15 < data["energy"]["ratio_paper_convention"] < 0.3  # TTFSFormer's ViTs: 0.21-0.22
    # one pass: no layer runs per step; those on the decoded spike times say so
    categories = {layer["tensor"]: layer["category"] for layer in data["layers"]}
    assert set(categories.values()) <= {"decoded", "time_invariant", "spiking"}
    assert categories["/blocks.0/attn/q/MatMul_output_0"] == "decoded"


# ------------------------------------------------------------------ the page


def _regressor():
    """x [batch, 6] -> one value per sample: no classes, so no top-1 agreement."""
    rng = np.random.default_rng(0)
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("w1", (6, 8)), ("w2", (8, 1)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "regressor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_top1_agreement_only_for_classifier_outputs(tmp_path):
    x = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)
    ann, snn = tmp_path / "regressor.onnx", tmp_path / "snn.onnx"
    onnx.save(_regressor(), ann)
    spikec.compile(ann, {"x": x}, snn, timesteps=T, progress=False)
    np.savez(tmp_path / "x.npz", x=x)
    np.savez(tmp_path / "y.npz", labels=np.zeros(16, np.int64))
    assert (
        main(
            [
                "report",
                str(ann),
                str(snn),
                "--inputs",
                str(tmp_path / "x.npz"),
                "--labels",
                str(tmp_path / "y.npz"),
                "-o",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not data["classifier"]
    rows = data["fidelity"]["ANN"]["outputs"]["y"]["per_t"]
    assert all(set(r) == {"t", "cosine", "relative_max_error", "max_abs_error"} for r in rows)
    assert "accuracy" not in data["fidelity"]["ANN"]["outputs"]["y"]
    html = (tmp_path / "out" / "index.html").read_text()
    assert "top-1" not in html and "accuracy" not in html


class _PlainECMT(ECMT):
    """ECMT registered under another name, with the default report section."""

    name = "plain-ecmt"
    report_section = Method.report_section


def test_a_method_without_a_section_of_its_own_gets_the_common_report(tmp_path):
    x = np.random.default_rng(2).standard_normal((16, 6)).astype(np.float32)
    ann, snn = tmp_path / "regressor.onnx", tmp_path / "snn.onnx"
    onnx.save(_regressor(), ann)
    methods.register(_PlainECMT())
    try:
        spikec.compile(ann, {"x": x}, snn, method="plain-ecmt", timesteps=T, progress=False)
        data = build_report(ann, snn, {"x": x})
        write_report(data, tmp_path / "out")
    finally:
        del methods.METHODS["plain-ecmt"]
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == sorted(COMMON_PLOTS)
    # the default section counts every MT neuron's nonzero codes: the input of each MatMul
    codes = fetch(snn, [s["source"] for s in data["sites"]], {"x": x})
    assert [s["site"] for s in data["sites"]] == ["x", "r"] and data["section"] == {}
    for site in data["sites"]:
        assert site["spikes_per_sample"] == np.count_nonzero(codes[site["source"]]) / len(x)


def test_log_axes_are_not_dominated_by_zeros():
    fig, axes = plots.figure(1, 2)
    plots.log_axis(axes[0, 0], [0.0, 1e-6, 1e-3, 1.0])
    plots.log_axis(axes[0, 1], [1e-6, 1e-3, 1.0])
    assert axes[0, 0].get_yscale() == "symlog" and axes[0, 0].yaxis.get_transform().linthresh == 1e-6
    assert axes[0, 1].get_yscale() == "log"
    fig.clf()


# ------------------------------------------------------------------ inspect, Netron, errors


def test_inspect_lists_rewrites_neurons_and_float_ops(made, capsys):
    info = inspect_model(str(made["snn"]))
    counts = info["neuron_counts"]
    per_block = 6 * TOKENS * DIM + HEADS * TOKENS**2 + TOKENS * MLP  # 6 x [17,64], softmax, GELU output
    assert counts["neuron_nodes"] == len(counts["sites"]) == 33
    assert counts["neurons_total"] == BLOCKS * per_block + DIM
    float_ops = {r["category"]: r for r in info["float_ops"]}
    assert float_ops["spike_product"]["ops"] == {"Gemm": 1, "MatMul": 24}
    assert {"LayerNormalization", "Softmax", "Erf", "MatMul"} <= set(float_ops["ec_float"]["ops"])
    assert float_ops["time_invariant"]["ops"]["Conv"] == 1
    rewrites = {r["region"]: r for r in info["rewrites"]}
    assert any("ECAccumulate x2" in op for op in rewrites["/blocks.1/attn/MatMul"]["spikec_ops"])
    assert rewrites["/blocks.0/norm1/LayerNormalization"]["spikec_ops"][0].startswith("unchanged: time-invariant")
    assert "thresholds folded into weights (PPN)" in rewrites["/blocks.3/mlp/mlp.0/MatMul"]["spikec_ops"]
    assert main(["inspect", str(made["snn"])]) == 0
    assert "neurons per sample" in capsys.readouterr().out
    assert main(["inspect", str(made["ann"]), "--json"]) == 0  # a plain ANN has nothing rewritten
    assert json.loads(capsys.readouterr().out)["rewrites"] == []


def test_converted_model_opens_as_is_in_netron(made):
    """Netron shows the model file itself: spikec nodes with their attributes and function bodies."""
    onnx.checker.check_model(str(made["snn"]), full_check=True)
    model = onnx.load(made["snn"])
    functions = {(f.domain, f.name) for f in model.functions}
    assert {("spikec", "MTNeuron"), ("spikec", "ECAccumulate"), ("spikec", "ECCompensate")} <= functions
    neuron = next(n for n in model.graph.node if n.domain == "spikec" and n.op_type == "MTNeuron")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in neuron.attribute} == {"levels": 8, "timesteps": T}


def test_report_needs_an_unrolled_spikec_model(made, tmp_path):
    model = onnx.load(made["snn"])
    for prop in model.metadata_props:
        if prop.key == "spikec.mode":
            prop.value = "stateful"
    onnx.save(model, tmp_path / "stateful.onnx")
    with pytest.raises(SpikecError, match="--mode unrolled"):
        build_report(made["ann"], tmp_path / "stateful.onnx", {"pixels": made["x"][:2]})
    with pytest.raises(SpikecError, match="not a spikec model"):
        build_report(made["ann"], made["ann"], {"pixels": made["x"][:2]})


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(any_made, tmp_path):
    import matplotlib.image

    _, made = any_made
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            "--enable-logging=stderr",
            "--v=0",
            (made["out"] / "index.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # page errors, console messages (the report logs any image that fails to decode) and failed loads
    problems = [
        line
        for line in result.stderr.splitlines()
        if ":CONSOLE" in line or "Uncaught" in line or "Failed to load" in line or "net::ERR" in line
    ]
    assert not problems, problems
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.var() > 1e-3


def test_the_report_batch_fits_its_fetched_tensors(monkeypatch):
    """Each batch's fetched tensors (T rows per sample of an unrolled SNN) take at most a quarter of the budget."""
    from spikec import graphinfo
    from spikec.report import build

    snn = graphinfo.Shapes({"a": (8, 1000), "b": (8, 3000), "c": None}, {}, rows=8)  # c: unknown, counts as b
    ann = graphinfo.Shapes({"a": (1, 1000)}, {})
    per_sample = (1000 + 3000 + 3000) * 8 * 4 + 1000 * 4
    monkeypatch.setattr(build, "default_budget", lambda: 4 * per_sample * 5)
    assert build.fetch_batch_size(32, [(ann, ["a"]), (snn, ["a", "b", "c"])]) == 5
    assert build.fetch_batch_size(3, [(ann, ["a"]), (snn, ["a", "b", "c"])]) == 3
    monkeypatch.setattr(build, "default_budget", lambda: 1)
    assert build.fetch_batch_size(32, [(snn, ["b"])]) == 1  # never below one sample
