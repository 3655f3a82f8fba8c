"""ECMT's report section: spikes per threshold level of the MT neurons (the paper's Fig. 6), by sign."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from spikec.equilibrium import bound_line
from spikec.report import plots
from spikec.report.page import table
from spikec.report.section import Context, Section


@dataclass
class _Levels:
    """Spike counts of one MT neuron site by level k (|code| = 2^k) and sign."""

    levels: int
    ratio: np.ndarray  # theta_neg / theta_pos: negative codes are -ratio * 2^k
    positive: np.ndarray = field(init=False)
    negative: np.ndarray = field(init=False)

    def __post_init__(self):
        self.positive = np.zeros(self.levels, np.int64)
        self.negative = np.zeros(self.levels, np.int64)

    def add(self, codes: np.ndarray) -> None:
        ratio = np.broadcast_to(self.ratio, codes.shape)
        for sign, counts in ((1, self.positive), (-1, self.negative)):
            mask = codes * sign > 0
            units = np.abs(codes[mask]) / (1.0 if sign > 0 else ratio[mask])
            k = np.clip(np.rint(np.log2(units)).astype(np.int64), 0, self.levels - 1)
            counts += np.bincount(k, minlength=self.levels)


def _plot_levels(data: dict) -> bytes:
    lv = data["section"]
    n = lv["levels"]
    fig, axes = plots.figure(1, 1, (10, 4))
    ax = axes[0, 0]
    labels = [f"-θ2·2^{k}" for k in reversed(range(n))] + [f"θ1·2^{k}" for k in range(n)]
    values = list(reversed(lv["negative_fraction"])) + list(lv["positive_fraction"])
    ax.bar(np.arange(2 * n), values, color=["tab:orange"] * n + ["tab:blue"] * n)
    ax.set_xticks(np.arange(2 * n), labels, rotation=60, fontsize=8)
    ax.set(title="spikes per threshold level, all MT neurons (cf. ECMT Fig. 6)", ylabel="fraction of spikes")
    return plots.png(fig)


class ECMTSection(Section):
    title = "Spikes per threshold level (ECMT)"
    plots = (("levels", "spikes per threshold level", _plot_levels),)

    def __init__(self, context: Context):
        super().__init__(context)
        spikes_of = {node.name: name for name, node in self.neurons.items()}
        self.levels = {
            spikes_of[n["node"]]: _Levels(
                n["levels"], np.asarray(n["theta_neg"], np.float64) / np.asarray(n["theta_pos"], np.float64)
            )
            for n in context.record.report.neurons or []
        }

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        super().add(values)
        for name, levels in self.levels.items():
            levels.add(values[name])

    def sites(self) -> list[dict]:
        rows = super().sites()
        samples = self.context.samples
        for row in rows:
            levels = self.levels[row["source"]]
            row.update(
                levels=levels.levels,
                positive=levels.positive.tolist(),
                negative=levels.negative.tolist(),
                split={
                    "positive spikes (θ1·2^k)": int(levels.positive.sum()) / samples,
                    "negative spikes (−θ2·2^k)": int(levels.negative.sum()) / samples,
                },
            )
        return rows

    def finish(self) -> dict:
        """Spikes per threshold level over all neuron sites (ECMT Fig. 6)."""
        levels = max((f.levels for f in self.levels.values()), default=0)
        positive = sum(
            (np.pad(f.positive, (0, levels - f.levels)) for f in self.levels.values()), np.zeros(levels, np.int64)
        )
        negative = sum(
            (np.pad(f.negative, (0, levels - f.levels)) for f in self.levels.values()), np.zeros(levels, np.int64)
        )
        total = max(int(positive.sum() + negative.sum()), 1)
        return {
            "levels": levels,
            "positive": positive.tolist(),
            "negative": negative.tolist(),
            "positive_fraction": (positive / total).tolist(),
            "negative_fraction": (negative / total).tolist(),
            # how the compile chose T, where it measured it (spikec/equilibrium.py)
            "compile_timesteps_search": self.context.record.report.timesteps_search,
        }

    @staticmethod
    def html(data: dict, img: Callable[..., str]) -> list[str]:
        lv = data["section"]
        total = sum(lv["positive"]) + sum(lv["negative"])
        base = (lv["positive"][0] + lv["negative"][0]) / total if total else 0.0
        search = lv.get("compile_timesteps_search")
        chosen = f" The compile chose T={search['timesteps']}: {bound_line(search)}." if search else ""
        return [
            f"<p>Spikes per threshold level (|code| = 2^k; negative codes are −θ2/θ1·2^k): {base:.1%} of all "
            f"spikes use the base thresholds θ1 / −θ2 (ECMT Fig. 6 reports the same clustering).{chosen}</p>",
            img("levels"),
            "<details><summary>levels per MT neuron site</summary>"
            + table(
                ["neuron input", "+ levels k=0..", "− levels k=0.."],
                [
                    [s["site"], " ".join(map(str, s["positive"])), " ".join(map(str, s["negative"]))]
                    for s in data["sites"]
                ],
            )
            + "</details>",
        ]
