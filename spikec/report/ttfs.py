"""TTFSFormer's report section: spike times and clipping per site, the constructions' neurons and
operations (the paper's Table 3, which the energy model counts), and the depth in windows."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import onnx

from spikec import graphinfo
from spikec.errors import SpikecError
from spikec.report import plots
from spikec.report.energy import spike_source
from spikec.report.page import note, table
from spikec.report.section import Context, Section, site_row
from spikec.runtime.metadata import SpikecMetadata
from spikec.runtime.ttfs import EMIT

TIME_BINS = 20  # spike-time histogram bins over the emitting window [0, delta)


def spiking_depth(model: onnx.ModelProto) -> int:
    """Layers on the longest path from an input to an output: every emitting stage on it adds one window
    delta, so a sample's last output spike comes depth x delta after its input spikes (T_emit^(n) =
    T_emit^(0) + n delta). Paths that skip layers (residual connections) need delays of as many windows."""
    depth: dict[str, int] = {}
    for node in model.graph.node:  # topologically sorted
        level = max((depth.get(name, 0) for name in node.input), default=0)
        level += node.domain == graphinfo.SPIKEC_DOMAIN and node.op_type.startswith("TTFSEmit")
        for name in node.output:
            depth[name] = level
    return max((depth.get(o.name, 0) for o in model.graph.output), default=0)


def table3(constructions: list[dict], shapes: Mapping[str, list[int]]) -> list[dict]:
    """Neurons and operations per sample of each construction, by Table 3's formulas: MatMul (M x K by
    K x N) MN(K+1) neurons and MN(3K+2) operations, an elementwise product (a gated MLP's act(gate) * up)
    as a MatMul with K = 1 per output element, Softmax over N 2(N+1) and 6N per row, LayerNorm over N 3N+3
    and 9N+1 per row, an activation one neuron and one operation per element. ``shapes``: each site's shape
    per sample."""
    rows = []
    for c in constructions:
        if c["kind"] == "matmul":
            a, b = (shapes[name] for name in c["operands"])
            m, k, n = a[-2], a[-1], b[-1]
            instances = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])), dtype=np.int64))
            neurons, ops = instances * m * n * (k + 1), instances * m * n * (3 * k + 2)
        elif c["kind"] == "product":
            elements = int(
                np.prod(np.broadcast_shapes(*(tuple(shapes[name]) for name in c["operands"])), dtype=np.int64)
            )
            neurons, ops = 2 * elements, 5 * elements
        else:
            shape = shapes[c["output"]]
            count, width = int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])
            neurons, ops = {
                "softmax": (2 * (width + 1), 6 * width),
                "layernorm": (3 * width + 3, 9 * width + 1),
                "activation": (width, width),
            }[c["kind"]]
            neurons, ops = count * neurons, count * ops
        rows.append({**c, "neurons": int(neurons), "operations": int(ops)})
    return rows


def site_activity(
    snn: str | os.PathLike | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, batch_size: int = 32
) -> list[dict]:
    """What every site of a TTFS model does on ``feeds`` (the report's site rows, without a reference
    model): neurons, spikes, spike times and clipping."""
    from spikec.calibrate import run_batches
    from spikec.report.build import load

    model = snn if isinstance(snn, onnx.ModelProto) else load(snn, "SNN")
    record = SpikecMetadata.read(model)
    if record is None or record.method != "ttfs":
        raise SpikecError(
            f"model {snn if not isinstance(snn, onnx.ModelProto) else '(in memory)'}: not a ttfs model "
            f"(compile it with --method ttfs)"
        )
    section = TTFSSection(Context(model, record, 1, len(next(iter(feeds.values())))))
    for values in run_batches(model, feeds, section.tensors(), batch_size=batch_size, progress=False):
        section.add(values)
    return section.sites()


def _plot_spike_times(data: dict) -> bytes:
    from matplotlib.colors import LogNorm

    sites = data["sites"]
    bins = data["section"]["time_bins"]
    fractions = np.array([np.asarray(s["spike_times"], np.float64) / max(sum(s["spike_times"]), 1) for s in sites])
    fig, axes = plots.figure(1, 1, (12, max(4.0, 0.12 * len(sites) + 1.5)))
    ax = axes[0, 0]
    positive = fractions[fractions > 0]
    if positive.size:
        shown = ax.imshow(
            np.ma.masked_equal(fractions, 0),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            norm=LogNorm(vmin=positive.min(), vmax=positive.max()),
        )
        fig.colorbar(shown, ax=ax, label="fraction of the site's neurons")
        ax.set_yticks(
            np.arange(len(sites)), [plots.short(s["site"], 48) for s in sites], fontsize=6 if len(sites) <= 60 else 4
        )
        ax.set_xticks([-0.5, bins / 2 - 0.5, bins], ["0", "δ/2", "no spike"])
    else:
        plots.empty(ax, "no spikes")
    ax.set(title="spike-time histogram per site (u = t − T_emit over the window [0, δ))", xlabel="spike time")
    return plots.png(fig)


def _plot_clipping(data: dict) -> bytes:
    sites = data["sites"]
    fig, axes = plots.figure(1, 1, (12, 4.5))
    ax = axes[0, 0]
    x = np.arange(len(sites))
    low = [s["clipped_low"] for s in sites]
    high = [s["clipped_high"] for s in sites]
    ax.bar(x - 0.2, low, 0.4, label="below a (no spike, read as a)")
    ax.bar(x + 0.2, high, 0.4, label="above b (spike at T_emit, read as b)")
    if any(low) or any(high):
        plots.log_axis(ax, [*low, *high])
    else:
        plots.empty(ax, "no site clipped on these inputs")
    plots.site_ticks(ax, [s["site"] for s in sites])
    ax.legend(fontsize=8)
    ax.set(title="clipping per site: potentials outside the site's range [a, b]", ylabel="fraction of values")
    return plots.png(fig)


class TTFSSection(Section):
    title = "Spike times, clipping, constructions and depth (TTFSFormer)"
    plots = (
        ("spike_times", "spike-time histograms per site", _plot_spike_times),
        ("clipping", "clipping per site", _plot_clipping),
    )
    counts_per_step = False  # one pass: there is no smaller T

    def __init__(self, context: Context):
        super().__init__(context)
        self.ttfs = context.record.report.ttfs
        count = len(self.ttfs["sites"])
        self.histograms = np.zeros((count, TIME_BINS + 1), np.int64)  # the last column: no spike
        self.below, self.above = np.zeros(count, np.int64), np.zeros(count, np.int64)
        self.shapes: list[list[int] | None] = [None] * count

    def tensors(self) -> list[str]:
        return [name for s in self.ttfs["sites"] for name in (s["potential"], s["spikes"])]

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        delta = self.ttfs["delta"]
        for i, site in enumerate(self.ttfs["sites"]):
            potential, spikes = values[site["potential"]], values[site["spikes"]]
            self.shapes[i] = list(spikes.shape[1:])
            fired = spikes < delta  # u = delta: no spike (the value a)
            self.histograms[i, :-1] += np.histogram(spikes[fired], bins=TIME_BINS, range=(0.0, delta))[0]
            self.histograms[i, -1] += int(fired.size - np.count_nonzero(fired))
            inverse = EMIT[site["emit"]].inverse
            # beyond the range by more than the float rounding of a decode/encode round trip
            slack = 1e-5 * (site["upper"] - site["lower"])
            with np.errstate(divide="ignore", invalid="ignore"):
                low, high = inverse(np.float64(site["lower"] - slack)), inverse(np.float64(site["upper"] + slack))
            self.below[i] += int((potential < low).sum())
            self.above[i] += int((potential > high).sum())

    def sites(self) -> list[dict]:
        c = self.context
        producer = {o: n.name for n in c.snn.graph.node for o in n.output}
        rows = []
        for i, site in enumerate(self.ttfs["sites"]):
            values = int(self.histograms[i].sum())
            rows.append(
                site_row(
                    site["site"],
                    site["role"],
                    producer[site["spikes"]],
                    site["spikes"],
                    values // c.samples,
                    values - int(self.histograms[i, -1]),
                    c.samples,
                    c.steps,
                    emit=site["emit"],
                    receives=site["receives"],
                    lower=site["lower"],
                    upper=site["upper"],
                    analytic=site["analytic"],
                    shape=self.shapes[i],
                    clipped_low=int(self.below[i]) / values,
                    clipped_high=int(self.above[i]) / values,
                    clipped_values=int(self.below[i] + self.above[i]),
                    spike_times=self.histograms[i].tolist(),
                )
            )
        return rows

    def constructions(self) -> list[dict]:
        shapes = {s["site"]: shape for s, shape in zip(self.ttfs["sites"], self.shapes) if shape is not None}
        return table3(self.ttfs["constructions"], shapes)

    def finish(self) -> dict:
        return {
            "delta": self.ttfs["delta"],
            "precision": self.ttfs["precision"],
            "margin": self.ttfs["margin"],
            "depth": spiking_depth(self.context.snn),
            "constructions": self.constructions(),
            "float_nodes": self.ttfs["float_nodes"],
            "time_bins": TIME_BINS,
            "clipped_sites": int(np.count_nonzero(self.below + self.above)),
        }

    def energy_counts(self, sites: list[dict], products: list[dict], steps: int) -> dict[str, dict[str, float]]:
        layer_two = [p for p in products if p.get("claimed") and p["counted_as"] == "spike_products"]
        for p in layer_two:
            p["acs"] = p["macs"]
        return {
            "neuron_updates": {"AC": 0},
            "spike_products": {"AC": sum(p["macs"] or 0 for p in layer_two)},
            "ttfs_constructions": {"AC": sum(c["operations"] for c in self.constructions())},
        }

    def claimed_products(self) -> dict[str, str]:
        """Activation x activation products are matmul constructions, counted by Table 3. A weight product
        whose input is no site's spikes reads a construction's output: it is part of that construction's
        layer II weighted sum, whose inputs fire at most once each, so it counts one AC per MAC."""
        model = self.context.snn
        constants = {t.name for t in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        spikes = dict.fromkeys(s["spikes"] for s in self.ttfs["sites"])
        claimed = {}
        for node in (n for n in model.graph.node if n.op_type in graphinfo.PRODUCT_OPS):
            activations = [t for t in node.input[:2] if t not in constants]
            if len(activations) == 2:
                claimed[node.name] = "ttfs_constructions"
            elif activations and spike_source(activations[0], producer, spikes, through_accumulation=False) is None:
                claimed[node.name] = "spike_products"
        return claimed

    @staticmethod
    def html(data: dict, img: Callable[..., str]) -> list[str]:
        s = data["section"]
        precision = "float spike times" if not s["precision"] else f"a clock of {s['precision']} ticks per window"
        return [
            f"<p>Depth: {s['depth']} windows δ = {s['delta']} from the input spikes to the last output spike "
            f"(the longest chain of emitting layers); {precision}; range margin {s['margin']}. "
            f"{s['clipped_sites']} of {len(data['sites'])} sites clipped a potential on these inputs.</p>",
            img("spike_times"),
            note(
                "Spike times u = t − T_emit in each site's emitting window [0, δ), as fractions of the site's "
                "neurons, and the neurons that did not fire (their value is the range's lower end a). Color: "
                "log scale from the smallest nonzero fraction; empty cells are white."
            ),
            img("clipping"),
            "<details><summary>all sites</summary>"
            + table(
                [
                    "site",
                    "role",
                    "emit",
                    "receives",
                    "range [a, b]",
                    "range from",
                    "neurons",
                    "spikes / sample",
                    "below a",
                    "above b",
                    "values clipped",
                ],
                [
                    [
                        x["site"],
                        x["kind"],
                        x["emit"],
                        " ".join(x["receives"]),
                        f"[{x['lower']:.4g}, {x['upper']:.4g}]",
                        "construction" if x["analytic"] else "calibration",
                        x["neurons"],
                        x["spikes_per_sample"],
                        x["clipped_low"],
                        x["clipped_high"],
                        x["clipped_values"],
                    ]
                    for x in data["sites"]
                ],
            )
            + "</details>",
            "<h3>Constructions (Table 3)</h3>",
            table(
                ["construction", "kind", "neurons / sample", "operations / sample"],
                [[c["name"], c["kind"], c["neurons"], c["operations"]] for c in s["constructions"]],
            ),
            *(
                [
                    (
                        "<h3>Ops run in float between a decode and an encode</h3>"
                        + table(["node", "op"], [[f["node"], f["op"]] for f in s["float_nodes"]])
                    )
                ]
                if s["float_nodes"]
                else []
            ),
        ]
