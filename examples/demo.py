"""The default example: convert the bundled digits ViT to an ECMT spiking network and measure it.

Trains (once, cached under .cache/fixtures) a 4-layer ViT on scikit-learn's digits, exports it to
ONNX, then runs the same commands a user would type (``--method`` picks another conversion at its own
default T, which ecmt and spikezip measure, unless ``--timesteps`` is given; ttfs runs in one pass and
takes no ``--timesteps``):

    spikec compile digits_vit.onnx -o digits_snn.onnx --method ecmt --calib digits-calib.npz
    spikec eval digits_vit.onnx digits_snn.onnx --inputs digits-eval.npz --labels digits-eval-labels.npz
    spikec inspect digits_snn.onnx
"""

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import fixtures  # noqa: E402
from spikec.cli import main  # noqa: E402


def spikec(*args) -> None:
    print(f"\n$ spikec {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    code = main([str(a) for a in args])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="directory for the converted model")
    parser.add_argument("--method", default="ecmt", choices=["ecmt", "spikezip", "sta", "ttfs"])
    parser.add_argument(
        "--timesteps", type=int, help="T (default: the method's: ecmt and spikezip measure it, sta 64; spikec info)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann = fixtures.digits_vit()
    snn = out / "digits_snn.onnx"
    timing = [] if args.timesteps is None else ["--timesteps", args.timesteps]
    spikec("compile", ann, "-o", snn, "--method", args.method, *timing, "--calib", fixtures.fixture_npz("digits-calib"))
    spikec(
        "eval",
        ann,
        snn,
        "--inputs",
        fixtures.fixture_npz("digits-eval"),
        "--labels",
        fixtures.fixture_npz("digits-eval-labels"),
    )
    spikec("inspect", snn)
