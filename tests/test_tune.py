"""spikec tune: front, constraint and resume on the digits ViT."""
import json

import pytest

from examples import fixtures
from spikec.errors import SpikecError
from spikec.tune import front, pick, tune


def test_front_and_pick_on_known_points():
    points = [{"t": 1, "cosine": 0.5}, {"t": 2, "cosine": 0.9}, {"t": 2, "cosine": 0.8},
              {"t": 3, "cosine": 0.95}, {"t": 4, "cosine": 0.94}, {"t": 8, "cosine": 0.999}]
    assert [(p["t"], p["cosine"]) for p in front(points)] == [(1, 0.5), (2, 0.9), (3, 0.95), (8, 0.999)]
    assert pick(points, 0.95)["t"] == 3
    assert pick(points, None)["t"] == 2  # the largest gain per step: 0.5 -> 0.9
    with pytest.raises(SpikecError, match="no setting reaches"):
        pick(points, 0.9999)


@pytest.mark.slow
def test_tune_digits_vit_front_constraint_resume(tmp_path, digits):
    feeds = {"pixels": digits["x_test"][:64]}
    state = tmp_path / "state.json"
    first = tune(fixtures.digits_vit(), feeds, "spikezip", max_timesteps=6, time_budget=0.0, state=state,
                 progress=False)
    assert len(json.loads(state.read_text())) == 1  # the budget stopped it after one setting
    points = tune(fixtures.digits_vit(), feeds, "spikezip", max_timesteps=6, state=state, progress=False)
    assert len(points) == 3 * 6 and all(p in points for p in first)
    best = front(points)
    for p in best:  # non-dominated
        assert not any(q["cosine"] > p["cosine"] and q["t"] <= p["t"] for q in points)
    chosen = pick(points, 0.9)
    assert chosen["cosine"] >= 0.9
    assert all(p["t"] >= chosen["t"] for p in points if p["cosine"] >= 0.9)
