"""`spikec report` and `spikec inspect` on the digits ViT: every number checked against an independent
recomputation (numpy on tensors fetched straight from onnxruntime, or by hand from the architecture)."""
import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spikec
from examples import fixtures
from spikec.cli import inspect_model, main
from spikec.errors import SpikecError
from spikec.evaluate import cosine

T = 4
SAMPLES = 64
PLOTS = ("fidelity", "layers", "firing", "levels", "energy")
# digits ViT: 8x8 image, patch 2 -> 16 patches + CLS = 17 tokens, dim 64, 4 heads of 16, MLP 128, 4 blocks
TOKENS, DIM, HEADS, MLP, BLOCKS, CLASSES = 17, 64, 4, 128, 4, 10
HEAD_DIM = DIM // HEADS


@pytest.fixture(scope="module")
def digits():
    return fixtures.digits_data()


@pytest.fixture(scope="module")
def made(digits, tmp_path_factory):
    """The SNN (T=4), the evaluation data, and the report written by the CLI."""
    root = tmp_path_factory.mktemp("report")
    ann = fixtures.digits_vit()
    snn = root / "snn.onnx"
    spikec.compile(ann, {"pixels": digits["x_train"][:128]}, snn, timesteps=T, progress=False)
    x, y = digits["x_test"][:SAMPLES], digits["y_test"][:SAMPLES]
    np.savez(root / "x.npz", pixels=x)
    np.savez(root / "y.npz", labels=y)
    out = root / "report"
    assert main(["report", str(ann), str(snn), "--inputs", str(root / "x.npz"), "--labels", str(root / "y.npz"),
                 "-o", str(out), "--quiet"]) == 0
    return {"ann": ann, "snn": snn, "x": x, "y": y, "out": out,
            "data": json.loads((out / "report.json").read_text())}


def fetch(model_path, names, feeds):
    """Intermediate tensors straight from onnxruntime: the names become extra outputs of a copy."""
    model = onnx.load(model_path)
    declared = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in declared)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


def test_writes_html_json_and_nontrivial_plots(made):
    import matplotlib.image

    out = made["out"]
    html = (out / "index.html").read_text()
    for name in PLOTS:
        png = out / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        pixels = matplotlib.image.imread(png)[..., :3]
        assert pixels.var() > 1e-3, name  # not a single colour
        colours = np.rint(pixels * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
        assert len(np.unique(colours)) > 20, name
        assert f'data-file="{name}.png"' in html
    assert html.count('src="data:image/png;base64,') == len(PLOTS)  # self-contained
    for text in ("Table 1", "TTFSFormer", "4.6 pJ", "0.9 pJ", "MTNeuron"):
        assert text in html


def test_fidelity_matches_numpy(made):
    feeds = {"pixels": made["x"]}
    ann = fetch(made["ann"], ["logits"], feeds)["logits"]
    steps = fetch(made["snn"], ["logits.steps"], feeds)["logits.steps"]
    assert steps.shape == (T, SAMPLES, CLASSES)
    output = made["data"]["fidelity"]["logits"]
    assert [r["t"] for r in output["per_t"]] == list(range(1, T + 1))
    for t, row in enumerate(output["per_t"]):
        assert row["cosine"] == pytest.approx(cosine(ann, steps[t]), abs=1e-6)
        assert row["top1_agreement"] == np.mean(steps[t].argmax(1) == ann.argmax(1))
        assert row["accuracy"] == np.mean(steps[t].argmax(1) == made["y"])
        assert row["max_abs_error"] == pytest.approx(np.abs(steps[t] - ann).max(), rel=1e-6)
    assert output["ann_accuracy"] == np.mean(ann.argmax(1) == made["y"])
    assert output["per_t"][-1]["cosine"] > 0.95


def test_firing_rates_match_numpy(made):
    rows = {r["tensor"]: r for r in made["data"]["firing"]}
    assert len(rows) == 4 * 8 + 1
    tensor = "/blocks.1/mlp/mlp.1/Mul_1_output_0"  # GELU output: the fc2 input neuron
    row = rows[tensor]
    codes = fetch(made["snn"], [row["spikes_tensor"]], {"pixels": made["x"]})[row["spikes_tensor"]]
    assert codes.shape == (T * SAMPLES, TOKENS, MLP)
    assert row["neurons"] == TOKENS * MLP
    assert row["spikes_per_neuron_per_step"] == pytest.approx(np.count_nonzero(codes) / codes.size)
    assert 0.05 < row["spikes_per_neuron_per_step"] < 1.0
    # positive codes are 2^k; negative ones -(theta_neg/theta_pos) 2^k
    site = next(n for n in inspect_model(str(made["snn"]))["neurons"] if n["tensor"] == tensor)
    ratio = site["theta_neg"] / site["theta_pos"]
    positive = np.log2(codes[codes > 0])
    negative = np.log2(-codes[codes < 0] / ratio)
    np.testing.assert_allclose(positive, np.rint(positive), atol=1e-4)
    np.testing.assert_allclose(negative, np.rint(negative), atol=1e-4)
    assert row["positive"] == np.bincount(np.rint(positive).astype(int), minlength=8).tolist()
    assert row["negative"] == np.bincount(np.rint(negative).astype(int), minlength=8).tolist()
    levels = made["data"]["firing_levels"]
    assert sum(levels["positive_fraction"]) + sum(levels["negative_fraction"]) == pytest.approx(1.0)
    # ECMT Fig. 6: most spikes use the base thresholds
    assert levels["positive_fraction"][0] + levels["negative_fraction"][0] > 0.5


def test_per_layer_error_matches_numpy(made):
    layers = {r["tensor"]: r for r in made["data"]["layers"]}
    assert not made["data"]["layers_skipped"]
    # an EC output (per-step increments: running mean) and a tensor inside EC (F of the means: last step)
    increments, inside = "/blocks.2/norm1/LayerNormalization_output_0", "/blocks.2/mlp/mlp.1/Erf_output_0"
    assert layers[increments]["estimate"] == "running mean"
    assert layers[inside]["estimate"].startswith("last step")
    feeds = {"pixels": made["x"]}
    ann = fetch(made["ann"], [increments, inside], feeds)
    snn = fetch(made["snn"], [increments, inside], feeds)
    estimates = {increments: snn[increments].reshape(T, SAMPLES, TOKENS, DIM).mean(0),
                 inside: snn[inside].reshape(T, SAMPLES, TOKENS, MLP)[-1]}
    for name, estimate in estimates.items():
        reference = ann[name]
        assert layers[name]["cosine"] == pytest.approx(cosine(reference, estimate), abs=1e-5)
        relative = np.abs(estimate - reference).max() / np.abs(reference).max()
        assert layers[name]["relative_max_error"] == pytest.approx(relative, rel=1e-4)
    # the time-invariant embedding is exact; the logits layer equals the output fidelity at T
    assert layers["/Add_output_0"]["relative_max_error"] == 0
    assert layers["logits"]["cosine"] == pytest.approx(made["data"]["fidelity"]["logits"]["per_t"][-1]["cosine"])


def test_energy_counts_by_hand(made):
    energy = made["data"]["energy"]
    per_block = (3 * TOKENS * DIM * DIM                    # q, k, v
                 + 2 * HEADS * TOKENS * TOKENS * HEAD_DIM  # q k^T and attn v
                 + TOKENS * DIM * DIM                      # proj
                 + 2 * TOKENS * DIM * MLP)                 # fc1, fc2
    patch_conv = DIM * 16 * 1 * 2 * 2                      # 1 -> 64 channels, k=2 stride 2, 4x4 outputs
    head = DIM * CLASSES                                   # CLS token only
    assert energy["ann"]["product_macs"] == BLOCKS * per_block + patch_conv + head == 2_380_928
    layernorms, softmax, gelu = (2 * BLOCKS + 1) * TOKENS * DIM, BLOCKS * HEADS * TOKENS ** 2, BLOCKS * TOKENS * MLP
    assert energy["ann"]["nonlinear_ops"] == layernorms + softmax + gelu

    # spike-driven products: every spike reaches (output features) weights, one AC each
    firing = {r["tensor"]: r["spikes_per_sample"] for r in made["data"]["firing"]}
    fan_out = {"norm1/LayerNormalization_output_0": 3 * DIM, "attn/Reshape_3_output_0": DIM,
               "norm2/LayerNormalization_output_0": MLP, "mlp/mlp.1/Mul_1_output_0": DIM}
    acs = sum(firing[f"/blocks.{b}/{t}"] * f for b in range(BLOCKS) for t, f in fan_out.items())
    acs += firing["/Gather_1_output_0"] * CLASSES
    terms = {t["term"]: t for t in energy["snn"]["terms"]}
    assert terms["spike_products"]["acs"] == pytest.approx(acs, rel=1e-9)
    # activation x activation products on running means, and the patch embedding, in float at every step
    act_act = BLOCKS * 2 * HEADS * TOKENS * TOKENS * HEAD_DIM
    assert terms["float_products"]["macs"] == T * (act_act + patch_conv)
    assert terms["nonlinear"]["macs"] == T * energy["ann"]["nonlinear_ops"]
    assert terms["neuron_updates"]["acs"] == T * made["data"]["model"]["neuron_counts"]["neurons_total"]
    snn_pj = sum(t["acs"] * 0.9 + t["macs"] * 4.6 for t in terms.values())
    ann_pj = 4.6 * (energy["ann"]["product_macs"] + energy["ann"]["nonlinear_ops"])
    assert energy["ratio"] == pytest.approx(snn_pj / ann_pj)
    event_acs = energy["snn"]["act_act_event_driven_acs"]
    assert energy["ratio_paper_convention"] == pytest.approx(0.9 * (acs + event_acs)
                                                             / (4.6 * energy["ann"]["product_macs"]))
    assert 0 < energy["ratio_paper_convention"] < energy["ratio"] < 1.5
    assert not energy["uncounted"]


def test_inspect_lists_rewrites_neurons_and_float_ops(made, capsys):
    info = inspect_model(str(made["snn"]))
    counts = info["neuron_counts"]
    per_block = 6 * TOKENS * DIM + HEADS * TOKENS ** 2 + TOKENS * MLP  # 6 x [17,64], softmax, GELU output
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


def test_report_needs_an_unrolled_model(made, tmp_path):
    model = onnx.load(made["snn"])
    for prop in model.metadata_props:
        if prop.key == "spikec.mode":
            prop.value = "stateful"
    onnx.save(model, tmp_path / "stateful.onnx")
    from spikec.report import build_report

    with pytest.raises(SpikecError, match="--mode unrolled"):
        build_report(made["ann"], tmp_path / "stateful.onnx", {"pixels": made["x"][:2]})


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(made, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         "--enable-logging=stderr", "--v=0", (made["out"] / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # page errors, console messages (the report logs any image that fails to decode) and failed loads
    problems = [line for line in result.stderr.splitlines()
                if ":CONSOLE" in line or "Uncaught" in line or "Failed to load" in line or "net::ERR" in line]
    assert not problems, problems
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.var() > 1e-3
