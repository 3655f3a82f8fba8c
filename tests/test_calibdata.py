"""`spikec calib make`: calibration .npz files from a text file and a tokenizer, or from a Python function."""
import numpy as np
import pytest
from test_cli import _fails

from examples import fixtures
from spikec.cli import main


@pytest.fixture(scope="module")
def sentences():
    return fixtures.calibration_sentences()[:40]


def test_text_and_tokenizer_give_the_inputs_the_tokenizer_gives(tmp_path, sentences, capfd):
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(sentences[:20]) + "\n\n" + "\n".join(sentences[20:]) + "\n")  # blank lines skipped
    out = tmp_path / "calib.npz"
    argv = ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--text", str(text),
            "--tokenizer", str(fixtures._minilm_dir()), "--max-length", "32", "--quiet"]
    assert main(argv) == 0
    assert "40 samples of input_ids int64 [32], attention_mask int64 [32]" in capfd.readouterr().out
    want = fixtures.minilm_inputs(sentences, seq_len=32)
    with np.load(out) as got:
        assert sorted(got.files) == ["attention_mask", "input_ids"]
        for name in got.files:
            np.testing.assert_array_equal(got[name], want[name])


def test_a_dynamic_sequence_axis_needs_a_length(tmp_path, sentences, capfd):
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(sentences))
    out = tmp_path / "calib.npz"
    _fails(capfd, ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--text", str(text),
                   "--tokenizer", str(fixtures._minilm_dir())], "--max-length")
    _fails(capfd, ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--text", str(text),
                   "--tokenizer", str(tmp_path / "none"), "--max-length", "8"], "tokenizer", "not a directory")
    _fails(capfd, ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--text", str(text)], "--tokenizer")
    assert not out.exists()


def test_python_function(tmp_path, digits, capfd):
    source = tmp_path / "images.py"
    source.write_text("import numpy as np\n"
                      "def pixels():\n"
                      "    return {'pixels': np.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)}\n"
                      "def misnamed():\n"
                      "    return {'image': np.zeros((3, 1, 8, 8), np.float32)}\n"
                      "def broken():\n"
                      "    raise ValueError('no images here')\n")
    out = tmp_path / "calib.npz"
    assert main(["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:pixels"]) == 0
    with np.load(out) as got:
        assert got["pixels"].dtype == np.float32 and got["pixels"].shape == (3, 1, 8, 8)  # cast to the model's dtype
        np.testing.assert_allclose(got["pixels"].ravel(), np.linspace(-1, 1, 3 * 64), rtol=1e-6)
    assert "wrote" in capfd.readouterr().out
    out.unlink()
    _fails(capfd, ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:misnamed"],
           "unexpected key 'image'")
    _fails(capfd, ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:broken"],
           "ValueError: no images here")
    _fails(capfd, ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:absent"],
           "cannot load it")
    assert not out.exists()
