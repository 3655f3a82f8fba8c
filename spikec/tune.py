"""Search a method's knobs for the settings on the fidelity/latency front (issue 20).

One compile per knob setting at the largest T: the unrolled model's per-step outputs give the fidelity of
every smaller T from the same run, so T is never a search axis of its own."""
from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spikec.errors import SpikecError

# The knobs searched per method; T comes from the per-step outputs of one run at --max-timesteps.
KNOBS: dict[str, dict[str, Sequence]] = {
    "ecmt": {"percentile": (90.0, 99.0, 99.9), "per_channel": (True, False), "levels": (4, 8)},
    "spikezip": {"levels": (8, 16, 32)},
}


def settings(method: str) -> list[dict]:
    if method not in KNOBS:
        raise SpikecError(f"--method {method}: tune searches {', '.join(sorted(KNOBS))}")
    names = list(KNOBS[method])
    return [dict(zip(names, values)) for values in itertools.product(*(KNOBS[method][n] for n in names))]


def split(feeds: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(fit, validation) by spikec.compare.validation_mask."""
    from spikec.compare import validation_mask

    valid = validation_mask(len(next(iter(feeds.values()))))
    return ({k: v[~valid] for k, v in feeds.items()}, {k: v[valid] for k, v in feeds.items()})


def front(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both cosine (higher) and T (lower), sorted by T."""
    def dominated(p: dict) -> bool:
        return any(q["cosine"] >= p["cosine"] and q["t"] <= p["t"]
                   and (q["cosine"] > p["cosine"] or q["t"] < p["t"]) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: (p["t"], -p["cosine"]))


def pick(points: Sequence[dict], min_cosine: float | None) -> dict:
    """The lowest-T point meeting ``min_cosine``; without a bound, the knee (largest cosine gain per step)."""
    best = front(points)
    if min_cosine is not None:
        ok = [p for p in best if p["cosine"] >= min_cosine]
        if not ok:
            raise SpikecError(f"--min-cosine {min_cosine}: no setting reaches it (best cosine "
                              f"{max(p['cosine'] for p in best):.5f} at T={best[-1]['t']})")
        return ok[0]
    if len(best) < 3:
        return best[-1]
    gains = [(b["cosine"] - a["cosine"]) / (b["t"] - a["t"]) for a, b in zip(best, best[1:])]
    return best[int(np.argmax(gains)) + 1]


def _key(method: str, knobs: dict, t: int) -> str:
    return json.dumps({"method": method, "t": t, **knobs}, sort_keys=True)


def tune(ann: str | os.PathLike, feeds: Mapping[str, np.ndarray], method: str, *, max_timesteps: int = 8,
         time_budget: float | None = None, state: str | os.PathLike | None = None,
         progress: bool = True) -> list[dict]:
    """Every (setting, T) point evaluated on the validation part; ``state`` keeps the evaluated settings so
    a rerun continues where the last stopped (time budget or interrupt)."""
    from spikec.compiler import compile as compile_model
    from spikec.evaluate import compare

    fit, valid = split(feeds)
    done: dict[str, list[dict]] = {}
    if state is not None and Path(state).exists():
        try:
            done = json.loads(Path(state).read_text())
        except (OSError, ValueError) as exc:
            raise SpikecError(f"--resume {state}: not a tune state file ({exc})") from None
    start = time.monotonic()
    todo = settings(method)
    for i, knobs in enumerate(todo, start=1):
        key = _key(method, knobs, max_timesteps)
        if key in done:
            continue
        if progress:
            print(f"tune {i}/{len(todo)} {knobs}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            snn = Path(tmp) / "snn.onnx"
            compile_model(ann, fit, snn, method=method, timesteps=max_timesteps, progress=False, verify=False,
                          **knobs)
            result = compare(ann, snn, valid)
        # The worst output decides: a setting is as good as its least faithful output.
        per_t = [min(o["per_t"][t]["cosine"] for o in result.values()) for t in range(max_timesteps)]
        done[key] = [{"t": t + 1, "cosine": c} for t, c in enumerate(per_t)]
        if state is not None:
            partial = Path(f"{state}.partial")  # an interrupt never leaves a half-written state file
            partial.write_text(json.dumps(done))
            os.replace(partial, state)
        if time_budget is not None and time.monotonic() - start > time_budget:
            break  # checked after a setting, so every run evaluates at least one
    return [{"method": method, **{k: v for k, v in json.loads(key).items() if k not in ("method", "t")}, **row}
            for key, rows in done.items() if json.loads(key)["method"] == method for row in rows]
