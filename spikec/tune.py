"""Search a method's knobs for the settings on the fidelity/energy/latency front (issue 20).

One compile per knob setting at the largest T, measured by the report's one pass (spikec.compare.points):
the unrolled model's per-step outputs and spike counts give the fidelity and the energy of every smaller T
from the same run, so T is no search axis of ECMT's or SpikeZIP-TF's. STA's thresholds depend on T, so its
T is a knob; TTFS has no T. The settings share one calibration run where the knobs leave the calibration
unchanged: the first compile's calibration checkpoint is the statistics of the others."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from spikec.errors import SpikecError

# The knobs searched per method; ECMT's and SpikeZIP-TF's T come from the per-step outputs of one run at
# --max-timesteps, STA's "timesteps" are fractions of it (STA compiles per T). Each knob's default first: a
# time budget spent early has measured the defaults' neighbourhood. The last knob varies fastest: ECMT's
# energy objective (spikec/methods/ecmt.py) is tried at every setting before the next one.
KNOBS: dict[str, dict[str, Sequence]] = {
    "ecmt": {
        "percentile": (90.0, 99.0, 99.9),
        "per_channel": (True, False),
        "levels": (8, 4),
        "coverage": (1.0, 0.0),
        "energy_slack": (0.0, 1.0, 2.0),
    },
    "spikezip": {"levels": (8, 16, 32)},
    "sta": {"timesteps": (1.0, 0.5), "burst": (8, 2, 1), "gelu_hidden": (32, 64)},
    "ttfs": {"precision": (0, 256, 64), "margin": (1.0, 0.5, 0.25)},
}
# what a tuned point may be picked for
OBJECTIVES = ("energy", "timesteps")


def search_space(method: str, given: Sequence[str] = ()) -> dict[str, tuple]:
    """KNOBS[method] with each ``NAME=V1,V2,...`` of ``given`` (the command line's --knob) replacing that
    knob's values, or adding an option of the method's the grid leaves at its default; values are
    parsed as the option's type."""
    from spikec import methods
    from spikec.passes.options import kind_of

    if method not in KNOBS:
        raise SpikecError(f"--method {method}: tune searches {', '.join(sorted(KNOBS))}")
    space = {k: tuple(v) for k, v in KNOBS[method].items()}
    options = methods.get(method).Options
    fields = {f.name: f for f in options.declared()}
    parse: dict[str, Callable[[str], object]] = {"int": int, "float": float, "str": str, "bool": _boolean}
    for item in given:
        name, _, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in fields or name == "timesteps" or not text.strip():
            raise SpikecError(
                f"--knob {item}: expected NAME=V1,V2,... with NAME an option of {method} "
                f"({', '.join(n for n in fields if n != 'timesteps')}); T is --max-timesteps"
            )
        kind = kind_of(options, fields[name])
        try:
            space[name] = tuple(parse[kind](v.strip()) for v in text.split(",") if v.strip())
        except (KeyError, ValueError):
            raise SpikecError(f"--knob {item}: {name} takes {kind} values") from None
    return space


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def settings(method: str, max_timesteps: int = 8, knobs: Mapping[str, Sequence] | None = None) -> list[dict]:
    """Every combination of ``knobs`` (default KNOBS[method]), the last knob varying fastest."""
    if method not in KNOBS:
        raise SpikecError(f"--method {method}: tune searches {', '.join(sorted(KNOBS))}")
    space = KNOBS[method] if knobs is None else knobs
    names = list(space)
    result = []
    for values in itertools.product(*(space[n] for n in names)):
        setting = dict(zip(names, values))
        if "timesteps" in setting:
            setting["timesteps"] = max(1, int(round(setting["timesteps"] * max_timesteps)))
        if setting not in result:
            result.append(setting)
    return result


def split(feeds: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(fit, validation) by spikec.compare.validation_mask."""
    from spikec.compare import validation_mask

    valid = validation_mask(len(next(iter(feeds.values()))))
    return ({k: v[~valid] for k, v in feeds.items()}, {k: v[valid] for k, v in feeds.items()})


def _energy(p: dict) -> float:
    return p["energy"] if p.get("energy") is not None else float("inf")


def front(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on cosine (higher), energy (lower) and T (lower), sorted by T and
    energy (of equal points the first). A point without an energy estimate is beaten on energy by any
    point with one."""

    def key(p: dict) -> tuple[float, float, float]:
        return (-p["cosine"], _energy(p), p["t"])

    def dominated(p: dict) -> bool:
        a = key(p)
        return any(all(x <= y for x, y in zip(key(q), a)) and key(q) != a for q in points)

    kept = {key(p): p for p in reversed(points) if not dominated(p)}  # of equal points, the first
    return sorted(kept.values(), key=lambda p: (p["t"], _energy(p), -p["cosine"]))


def pick(
    points: Sequence[dict],
    min_cosine: float | None,
    *,
    max_energy: float | None = None,
    max_timesteps: int | None = None,
    minimize: str = "energy",
) -> dict:
    """The point the user's constraints pick. With ``min_cosine``: of the points reaching it (within
    ``max_energy``, ``max_timesteps``), the one least in ``minimize`` (energy: the fewest spikes and
    operations the error bound allows; timesteps: the lowest latency), then in the other, then the most
    faithful. With only ``max_energy``: the most faithful point within it. Without constraints: the knee
    of the cosine vs ``minimize`` front."""
    if minimize not in OBJECTIVES:
        raise SpikecError(f"--minimize {minimize}: one of {', '.join(OBJECTIVES)}")
    cost = (lambda p: (_energy(p), p["t"])) if minimize == "energy" else (lambda p: (p["t"], _energy(p)))
    ok = [
        p
        for p in front(points)
        if (max_energy is None or _energy(p) <= max_energy) and (max_timesteps is None or p["t"] <= max_timesteps)
    ]
    if not ok:
        bound = " and ".join(
            text
            for text, given in (
                (f"--max-energy {max_energy}", max_energy is not None),
                (f"--max-timesteps {max_timesteps}", max_timesteps is not None),
            )
            if given
        )
        raise SpikecError(
            f"{bound}: no setting is within it (lowest energy {min(map(_energy, points)):.3g}, "
            f"lowest T {min(p['t'] for p in points)})"
        )
    if min_cosine is not None:
        reach = [p for p in ok if p["cosine"] >= min_cosine]
        if not reach:
            best = max(ok, key=lambda p: p["cosine"])
            raise SpikecError(
                f"--min-cosine {min_cosine}: no setting reaches it within the bounds (best cosine "
                f"{best['cosine']:.5f} at T={best['t']}, energy {_energy(best):.3g})"
            )
        return min(reach, key=lambda p: (*cost(p), -p["cosine"]))
    if max_energy is not None:
        return max(ok, key=lambda p: (p["cosine"], -_energy(p), -p["t"]))
    # the 2-D front of cosine vs the minimized quantity, cheapest first
    curve: list[dict] = []
    for p in sorted(ok, key=lambda p: (*cost(p), -p["cosine"])):
        if not curve or p["cosine"] > curve[-1]["cosine"]:
            curve.append(p)
    if len(curve) < 3:
        return curve[-1]
    # the point farthest above the chord from the cheapest to the most faithful point, both axes scaled to
    # [0, 1]: where spending more starts to buy little fidelity
    x = np.array([cost(p)[0] for p in curve], np.float64)
    y = np.array([p["cosine"] for p in curve], np.float64)
    if not np.isfinite(x).all() or x[-1] == x[0]:
        return curve[-1]
    x, y = (x - x[0]) / (x[-1] - x[0]), (y - y[0]) / (y[-1] - y[0])
    return curve[int(np.argmax(y - x))]


def _key(method: str, knobs: dict, t: int) -> str:
    return json.dumps({"method": method, "t": t, **knobs}, sort_keys=True)


def tune(
    ann: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    method: str,
    *,
    max_timesteps: int = 8,
    time_budget: float | None = None,
    state: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 32,
    knobs: Mapping[str, Sequence] | None = None,
) -> list[dict]:
    """Every (setting, T) point evaluated on the validation part: cosine of the worst output, the energy
    estimate SNN/ANN (all work; ``energy_paper``: the papers' convention) and T. ``state`` keeps the
    evaluated settings so a rerun continues where the last stopped (time budget or interrupt). ``knobs``:
    the search space (default KNOBS[method]; see search_space)."""
    from tqdm import tqdm

    from spikec import methods
    from spikec.compare import measure
    from spikec.compare import points as report_points

    fit, valid = split(feeds)
    done: dict[str, list[dict]] = {}
    if state is not None and Path(state).exists():
        try:
            done = json.loads(Path(state).read_text())
        except (OSError, ValueError) as exc:
            raise SpikecError(f"--resume {state}: not a tune state file ({exc})") from None
        # settings measured before tune estimated energy are measured again
        done = {key: rows for key, rows in done.items() if all("energy" in row for row in rows)}
    stepped = methods.get(method).stepped if method in methods.METHODS else True
    todo = settings(method, max_timesteps, knobs)
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as tmp,
        tqdm(total=len(todo), desc=f"tune {method}", unit="setting", disable=None if progress else True) as bar,
    ):
        # its fingerprint (graph, data, taps) decides whether a setting's calibration is the last one's
        checkpoint = Path(tmp) / "calibration.npz"
        for knobs in todo:
            key = _key(method, knobs, max_timesteps if stepped else 1)
            if key in done:
                bar.update()
                continue
            bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in knobs.items()))
            options = {"timesteps": max_timesteps, **knobs} if stepped else dict(knobs)
            _, report = measure(
                ann, fit, valid, method, tmp, batch_size=batch_size, calibration_checkpoint=checkpoint, **options
            )
            done[key] = [{k: p[k] for k in ("t", "cosine", "energy", "energy_paper")} for p in report_points(report)]
            if state is not None:
                partial = Path(f"{state}.partial")  # an interrupt never leaves a half-written state file
                partial.write_text(json.dumps(done))
                os.replace(partial, state)
            bar.update()
            if time_budget is not None and time.monotonic() - start > time_budget:
                break  # checked after a setting, so every run evaluates at least one
    # the settings of this search only: a state file may hold other methods' and other searches' too
    searched = {_key(method, knobs, max_timesteps if stepped else 1) for knobs in todo}
    return [
        {"method": method, **{k: v for k, v in json.loads(key).items() if k not in ("method", "t")}, **row}
        for key, rows in done.items()
        if key in searched
        for row in rows
    ]


def plot(points: Sequence[dict], chosen: dict | None, path: str | os.PathLike) -> Path:
    """Cosine vs energy of every point, the front's points ringed and the chosen one (if any) marked, the colour
    saying T, written to ``path`` as a PNG. Returns the path written."""
    from spikec.report.plots import figure, png

    best = front(points)
    shown = [p for p in points if p.get("energy") is not None]
    fig, axes = figure(size=(7, 4.5))
    ax = axes[0][0]
    dots = ax.scatter(
        [p["energy"] for p in shown], [p["cosine"] for p in shown], c=[p["t"] for p in shown], cmap="viridis", s=18
    )
    fig.colorbar(dots, label="T")
    ax.scatter(
        [p["energy"] for p in best if p in shown],
        [p["cosine"] for p in best if p in shown],
        facecolors="none",
        edgecolors="black",
        s=60,
        label="Pareto front",
    )
    if chosen is not None:
        ax.scatter([chosen["energy"]], [chosen["cosine"]], marker="*", color="red", s=180, label="chosen")
    ax.set(xlabel="energy estimate SNN/ANN", ylabel="validation cosine (worst output)")
    ax.legend(loc="lower right")
    out = Path(path)
    partial = out.with_name(out.name + ".partial")  # an interrupt never leaves a half-written plot
    partial.write_bytes(png(fig))
    os.replace(partial, out)
    return out
