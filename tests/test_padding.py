"""Calibration leaves padded positions out where they reach no output (spikec/calibrate.py _token_axes).

A small attention encoder whose padded positions carry outliers (40 against standard-normal tokens): pooled
under the mask, the outliers reach no output, and the statistics, the PTQ clip and ECMT's thresholds must
not follow them; with an output along the sequence, or a static sequence axis, every row still counts."""

import math

import numpy as np
import onnx
import pytest
import torch
from graphs import torch_export
from spikec.passes.patterns import find_regions, padding_mask_input
from torch import nn

import spikec
from spikec.calibrate import collect_statistics, position_mask, run_batches, token_axes
from spikec.evaluate import cosine, run_dataset

SEQ, DIM, HEADS = 8, 16, 2
OUTLIER = 40.0


class Encoder(nn.Module):
    """x + attention(x) under the key-padding mask, then an MLP; ``pooled``: the mean over the unpadded
    positions (a sentence embedding), else every position (last_hidden_state)."""

    def __init__(self, pooled: bool):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.pooled = pooled

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS)
        allowed = attention_mask[:, None, None, :].bool()
        scores = scores + torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        h = x + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, DIM))
        h = h + self.mlp(h)
        if not self.pooled:
            return h
        m = attention_mask[:, :, None].float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def data(samples: int, seed: int, side: str = "both") -> dict[str, np.ndarray]:
    """Standard-normal tokens, padded (by OUTLIER) on the right, on the left, or alternately on each."""
    rng = np.random.default_rng(seed)
    mask = np.ones((samples, SEQ), np.int64)
    lengths = rng.integers(2, SEQ, samples)
    for i, n in enumerate(lengths):
        if side == "left" or (side == "both" and i % 2):
            mask[i, : SEQ - n] = 0
        else:
            mask[i, n:] = 0
    x = rng.standard_normal((samples, SEQ, DIM)).astype(np.float32)
    x[mask == 0] = OUTLIER
    return {"x": x, "attention_mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("padding"), {}

    def export(pooled: bool, dynamic_seq: bool = True):
        key = (pooled, dynamic_seq)
        if key not in cache:
            path = root / f"encoder-{int(pooled)}{int(dynamic_seq)}.onnx"
            axes = {0: "batch", 1: "seq"} if dynamic_seq else {0: "batch"}
            torch_export(
                Encoder(pooled),
                data(2, 0),
                path,
                {
                    "x": axes,
                    "attention_mask": axes,
                    "y": {0: "batch", **({1: "seq"} if not pooled and dynamic_seq else {})},
                },
            )
            cache[key] = path
        return cache[key]

    return export


def _taps(path) -> dict[str, str]:
    """The input, the attention probabilities [B, H, S, S] and the heads' outputs [B, H, S, d]."""
    graph = onnx.load(str(path)).graph
    softmax = next(n for n in graph.node if n.op_type == "Softmax").output[0]
    heads = next(n for n in graph.node if n.op_type == "MatMul" and softmax in n.input).output[0]
    return {"x": "x", "probabilities": softmax, "heads": heads}


def _valid_rows(value: np.ndarray, mask: np.ndarray, token_axis: int) -> np.ndarray:
    """value's rows over the last axis at unpadded positions of ``token_axis``."""
    shape = [1] * value.ndim
    shape[0], shape[token_axis] = mask.shape
    keep = np.broadcast_to(mask.reshape(shape) != 0, value.shape)
    return value[keep].reshape(-1, value.shape[-1])


def test_the_mask_input_is_recognized(exported):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(exported(pooled=True))))
    assert padding_mask_input(find_regions(graph)) == "attention_mask"


@pytest.mark.parametrize("side", ["right", "left", "both"])
def test_padded_rows_are_left_out_of_a_pooled_models_statistics(exported, side):
    path, feeds = exported(pooled=True), data(24, 1, side)
    taps = _taps(path)
    stats = collect_statistics(
        path, feeds, list(taps.values()), batch_size=8, progress=False, padding_mask="attention_mask"
    )
    values = next(run_batches(path, feeds, list(taps.values()), batch_size=len(feeds["x"]), progress=False))
    for label, token_axis in (("x", 1), ("probabilities", 2), ("heads", 2)):
        rows = _valid_rows(values[taps[label]], feeds["attention_mask"], token_axis)
        s = stats[taps[label]]
        np.testing.assert_array_equal(s.channel_max, rows.max(axis=0), err_msg=label)
        np.testing.assert_array_equal(s.channel_min, rows.min(axis=0), err_msg=label)
        assert s.count == rows.size, label
    # the outliers were there to leave out
    assert stats["x"].max() < 10 < OUTLIER == collect_statistics(path, feeds, ["x"], progress=False)["x"].max()


@pytest.mark.parametrize("pooled, dynamic_seq", [(False, True), (True, False)])
def test_every_row_counts_where_padded_positions_are_outputs_or_the_sequence_is_static(exported, pooled, dynamic_seq):
    path, feeds = exported(pooled, dynamic_seq), data(16, 2)
    taps = list(_taps(path).values())
    masked = collect_statistics(path, feeds, taps, batch_size=8, progress=False, padding_mask="attention_mask")
    plain = collect_statistics(path, feeds, taps, batch_size=8, progress=False)
    for name in taps:
        np.testing.assert_array_equal(masked[name].sample, plain[name].sample)
        assert masked[name].count == plain[name].count
    assert masked["x"].max() == OUTLIER


def test_ptq_clips_for_the_unpadded_tokens(exported):
    # With the padded rows in, the input's clip follows the outliers: at 16 levels a step of 40/15 leaves
    # the standard-normal tokens some three levels.
    path = exported(pooled=True)
    calib, held = data(64, 3), data(32, 4)
    reference = run_dataset(path, held)["y"]
    qann = spikec.quantize(path, calib, levels=16, progress=False)
    assert cosine(run_dataset(qann, held)["y"], reference) >= 0.99


def test_ecmt_thresholds_are_set_by_the_unpadded_tokens(exported):
    path = exported(pooled=True)
    calib, held = data(64, 3), data(32, 4)
    reference = run_dataset(path, held)["y"]
    snn = spikec.compile(path, calib, method="ecmt", timesteps=16, progress=False)
    assert cosine(run_dataset(snn, held)["y"], reference) >= 0.99


def test_position_masks_mark_each_tap_along_its_token_axes(exported):
    path, feeds = exported(pooled=True), data(12, 5)
    taps = _taps(path)
    mask = feeds["attention_mask"] != 0
    ranks = {"x": 3, taps["probabilities"]: 4, taps["heads"]: 4}
    axes = token_axes(path, feeds, list(taps.values()), "attention_mask")
    valid = {name: position_mask(mask, axes[name], ranks[name]) for name in axes}
    np.testing.assert_array_equal(valid["x"], mask[:, :, None])
    # [B, H, S, S]: a query or key position padded leaves the element out
    np.testing.assert_array_equal(valid[taps["probabilities"]], mask[:, None, :, None] & mask[:, None, None, :])
    np.testing.assert_array_equal(valid[taps["heads"]], mask[:, None, :, None])
    # outputs along the sequence: every position is a target
    assert token_axes(exported(pooled=False), feeds, list(taps.values()), "attention_mask") == {}
