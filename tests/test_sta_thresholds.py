"""STA's X2X encoder thresholds (passes/sta.encoder_thresholds): held-out inputs beyond a channel's calibrated
range, which an IF neuron clips at its threshold (LeViT's and MobileViT's conformance cells)."""

import graphs
import numpy as np
import pytest
from spikec.passes import sta
from spikec.passes.stats import TapStats

import spikec
from spikec.evaluate import cosine, run_dataset


def _stats(x: np.ndarray) -> TapStats:
    return TapStats("x", (None, x.shape[1]), 1, x.size, x, x.min(axis=0), x.max(axis=0))


@pytest.mark.parametrize(("samples", "bound"), [(32, 0.997), (256, 0.9998)])
def test_encoders_pass_held_out_inputs_beyond_few_calibrated_rows(samples, bound):
    """Channels of different scales, 32 calibration samples (24 once verify holds some out): each channel's own
    MMSE threshold sat at or below its few calibrated values and clipped held-out ones (measured cosine 0.9885;
    0.99958 from 256 samples)."""
    model = graphs.mlp()
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-1, 1, graphs.FEATURES))
    calibration = {"x": (rng.standard_normal((samples, graphs.FEATURES)) * scales).astype(np.float32)}
    held = {"x": (rng.standard_normal((64, graphs.FEATURES)) * scales).astype(np.float32)}
    snn = spikec.compile(model, calibration, method="sta", timesteps=32, progress=False)
    assert cosine(run_dataset(model, held)["y"], run_dataset(snn, held)["y"]) > bound


def test_encoder_thresholds_lift_channels_to_the_sites_multiple_and_keep_outliers():
    """Channels of one shape at different scales get the site's multiple of their RMS with headroom, above their
    own MMSE threshold; a channel of rare large outliers keeps its own, larger threshold (a multiple pooled over
    it would have coarsened every channel: MiniLM lost 0.07 of cosine at burst 2)."""
    x = np.random.default_rng(1).standard_normal((512, 4)).astype(np.float32) * np.float32([1.0, 4.0, 1.0, 0.1])
    x[::256, 3] = 20.0
    own, theta = sta.mmse_thresholds(_stats(x), 32), sta.encoder_thresholds(_stats(x), 32)
    assert theta[1] / theta[0] == pytest.approx(4.0, rel=0.1)
    assert (theta[:3] > own[:3]).all() and theta[0] > x[:, 0].max()
    assert theta[3] == own[3] and theta[0] < 1.6 * own[0]
