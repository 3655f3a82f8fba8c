"""`spikec calib make`: calibration .npz files from a text file and a tokenizer, or from a Python function."""

import sys

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
    argv = [
        "calib",
        "make",
        str(fixtures.minilm()),
        "-o",
        str(out),
        "--text",
        str(text),
        "--tokenizer",
        str(fixtures._minilm_dir()),
        "--max-length",
        "32",
        "--quiet",
    ]
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
    _fails(
        capfd,
        [
            "calib",
            "make",
            str(fixtures.minilm()),
            "-o",
            str(out),
            "--text",
            str(text),
            "--tokenizer",
            str(fixtures._minilm_dir()),
        ],
        "--max-length",
    )
    _fails(
        capfd,
        [
            "calib",
            "make",
            str(fixtures.minilm()),
            "-o",
            str(out),
            "--text",
            str(text),
            "--tokenizer",
            str(tmp_path / "none"),
            "--max-length",
            "8",
        ],
        "tokenizer",
        "not a directory",
    )
    _fails(capfd, ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--text", str(text)], "--tokenizer")
    assert not out.exists()


def test_python_function(tmp_path, digits, capfd, monkeypatch):
    source = tmp_path / "images.py"
    source.write_text(
        "import numpy as np\n"
        "def pixels():\n"
        "    return {'pixels': np.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)}\n"
        "def misnamed():\n"
        "    return {'image': np.zeros((3, 1, 8, 8), np.float32)}\n"
        "def broken():\n"
        "    raise ValueError('no images here')\n"
    )
    out = tmp_path / "calib.npz"
    assert main(["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:pixels"]) == 0
    with np.load(out) as got:
        assert got["pixels"].dtype == np.float32 and got["pixels"].shape == (3, 1, 8, 8)  # cast to the model's dtype
        np.testing.assert_allclose(got["pixels"].ravel(), np.linspace(-1, 1, 3 * 64), rtol=1e-6)
    assert "wrote" in capfd.readouterr().out
    out.unlink()
    _fails(
        capfd,
        ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:misnamed"],
        "unexpected key 'image'",
    )
    _fails(
        capfd,
        ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:broken"],
        "ValueError: no images here",
    )
    _fails(
        capfd,
        ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", f"{source}:absent"],
        "cannot load it",
    )
    assert not out.exists()
    # module:function finds a module of the working directory, as `python -m` does
    source.rename(tmp_path / "spikec_test_calib_images.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "spikec_test_calib_images", raising=False)
    argv = ["calib", "make", str(fixtures.digits_vit()), "-o", str(out), "--python", "spikec_test_calib_images:pixels"]
    assert main(argv) == 0 and out.exists()
    assert str(tmp_path) not in sys.path
    sys.modules.pop("spikec_test_calib_images", None)


def _write_digits(folder, images, upsample: int = 1) -> None:
    """The digits as 8-bit grey PNGs (pixel 0..16 -> 0..240), each ``upsample`` x ``upsample`` blocks, in class
    subfolders as image datasets are laid out."""
    from PIL import Image

    for i, image in enumerate(images):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.kron(image, np.ones((upsample, upsample))).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(sub / f"{i:03d}.png")


@pytest.fixture(scope="module")
def digit_pixels():
    from sklearn.datasets import load_digits

    return (load_digits().images[:12] * 15).astype(np.uint8)  # 0..16 -> 0..240


def test_image_folder_resized_and_normalized_as_the_spec_says(tmp_path, digit_pixels, capfd):
    """16x16 PNGs (each digit pixel a 2x2 block) box-resized to the model's 8x8, scaled and normalized: the
    arrays the spec's arithmetic gives, in the model's NCHW layout and dtype, in path order."""
    pytest.importorskip("PIL")
    _write_digits(tmp_path / "images", digit_pixels, upsample=2)
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    out = tmp_path / "calib.npz"
    assert (
        main(
            [
                "calib",
                "make",
                str(fixtures.digits_vit()),
                "-o",
                str(out),
                "--images",
                str(tmp_path / "images"),
                "--resample",
                "box",
                "--mean",
                "0.3",
                "--std",
                "0.4",
                "--quiet",
            ]
        )
        == 0
    )
    assert "12 samples of pixels float32 [1, 8, 8]" in capfd.readouterr().out
    order = sorted(range(12), key=lambda i: (i % 3, i))  # class0/000, class0/003, ..., class1/001, ...
    want = (digit_pixels[order][:, None] / 255 - 0.3) / 0.4
    with np.load(out) as got:
        assert got["pixels"].dtype == np.float32
        np.testing.assert_allclose(got["pixels"], want, atol=1e-5)


def test_image_folder_errors_are_one_line(tmp_path, digit_pixels, capfd, monkeypatch):
    pytest.importorskip("PIL")
    folder, out = tmp_path / "images", tmp_path / "calib.npz"
    _write_digits(folder, digit_pixels[:2])
    model = str(fixtures.digits_vit())
    base = ["calib", "make", model, "-o", str(out), "--quiet", "--images"]
    _fails(capfd, [*base, str(folder), "--resize", "16x16"], "image folder", "pixels")  # model fixes 8x8
    _fails(capfd, [*base, str(folder), "--resize", "8"], "resize=8", "HxW")
    _fails(capfd, [*base, str(folder), "--mean", "0.1,0.2"], "--mean", "2 values for 1 channel")
    _fails(capfd, [*base, str(folder), "--std", "a"], "--std", "float")
    _fails(capfd, [*base, str(folder), "--resample", "cubic"], "resample='cubic'")
    _fails(capfd, [*base, str(tmp_path / "none")], "not a directory")
    (tmp_path / "empty").mkdir()
    _fails(capfd, [*base, str(tmp_path / "empty")], "holds no image file")
    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    _fails(capfd, [*base, str(folder)], "broken.png", "cannot read it")
    _fails(
        capfd, ["calib", "make", str(fixtures.minilm()), "-o", str(out), "--images", str(folder)], "one 4-D image input"
    )
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # Pillow not installed
    _fails(capfd, [*base, str(folder)], "needs the Pillow package")
    assert not out.exists()
