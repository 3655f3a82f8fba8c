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
    0.99958 from 256 samples). Pooled over channels with headroom: 0.9991 and 0.99996."""
    model = graphs.mlp()
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-1, 1, graphs.FEATURES))
    calibration = {"x": (rng.standard_normal((samples, graphs.FEATURES)) * scales).astype(np.float32)}
    held = {"x": (rng.standard_normal((64, graphs.FEATURES)) * scales).astype(np.float32)}
    snn = spikec.compile(model, calibration, method="sta", timesteps=32, progress=False)
    assert cosine(run_dataset(model, held)["y"], run_dataset(snn, held)["y"]) > bound


def test_encoder_thresholds_scale_with_each_channel_and_skip_dead_ones():
    """The pooled multiple is one per site, so each channel's threshold is proportional to its RMS; a channel that
    is never positive gets the largest threshold (it never fires)."""
    x = np.random.default_rng(1).standard_normal((512, 3)).astype(np.float32) * np.float32([1.0, 4.0, 1.0])
    x[:, 2] = -np.abs(x[:, 2])
    theta = sta.encoder_thresholds(_stats(x), 32)
    assert theta[1] / theta[0] == pytest.approx(4.0, rel=0.1)
    assert theta[2] == theta.max()
    # headroom over the channel's calibrated maximum, where the per-channel search stays at or below it
    assert theta[0] > x[:, 0].max() >= sta.mmse_thresholds(_stats(x), 32)[0]
