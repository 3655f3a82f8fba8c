"""The report's plots: helpers every section uses and the plots every report has (fidelity, per-layer
error, firing per site, energy). Each plot function draws from the report's data alone."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

LOG_NOTE = (
    "Log axes: where a series holds exact zeros (an exact layer, a step without spikes) the axis is "
    "symlog, linear from 0 up to the smallest positive value and logarithmic above, so the zeros show at "
    "0 and do not set the range."
)


def figure(rows: int = 1, cols: int = 1, size=(10, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def png(fig) -> bytes:
    """The figure as PNG bytes (the page embeds them; the report writes them with its other files)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def log_axis(ax, values, axis: str = "y") -> None:
    """A log axis for ``values`` (see LOG_NOTE); linear where nothing is positive."""
    values = np.asarray(list(values), np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if (values == 0).any():
        setter("symlog", linthresh=float(positive.min()))
    else:
        setter("log")


def empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def site_ticks(ax, names: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(names)), [short(n) for n in names], rotation=75, fontsize=7 if len(names) <= 50 else 5)


def plot_fidelity(data: dict) -> bytes:
    if not data["stepped"]:
        return _plot_scatter(data)
    from matplotlib.ticker import MaxNLocator

    references = data["fidelity"]
    rows = [r for ref in references.values() for o in ref["outputs"].values() for r in o["per_t"]]
    panels = [("cosine", "cosine similarity"), ("relative_max_error", "relative max error")]
    panels += [
        (key, title)
        for key, title in (("top1_agreement", "top-1 agreement"), ("accuracy", "accuracy"))
        if any(key in r for r in rows)
    ]
    fig, axes = figure(1 + (len(panels) > 2), 2, (10, 3.4 * (1 + (len(panels) > 2))))

    def tag(label: str, name: str) -> str:
        return label + (f" · {name}" if len(data["fidelity"][label]["outputs"]) > 1 else "")

    for ax, (key, title) in zip(axes.ravel(), panels):
        plotted = []
        # the SNN's accuracy does not depend on the reference: one line, each reference's accuracy dashed
        lines = [(data["references"][0], "SNN")] if key == "accuracy" else [(label, "vs ") for label in references]
        for label, prefix in lines:
            for name, output in references[label]["outputs"].items():
                points = [r for r in output["per_t"] if key in r]
                ax.plot(
                    [r["t"] for r in points],
                    [r[key] for r in points],
                    "o-",
                    label=prefix + ("" if prefix == "SNN" else tag(label, name)),
                )
                plotted += [r[key] for r in points]
        if key == "accuracy":
            for label, reference in references.items():
                for name, output in reference["outputs"].items():
                    if "accuracy" in output:
                        ax.axhline(output["accuracy"], ls="--", color=f"C{len(ax.lines)}", label=tag(label, name))
        if key == "relative_max_error":
            log_axis(ax, plotted)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel="time steps T")
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    return png(fig)


def _plot_scatter(data: dict) -> bytes:
    """One pass (TTFS): SNN output against the reference's, value by value."""
    reference = data["fidelity"][data["references"][0]]
    outputs = list(reference["outputs"].items())[:4]
    fig, axes = figure(1, len(outputs), (5 * len(outputs), 4.5))
    for ax, (name, output) in zip(axes[0], outputs):
        x, y = np.asarray(output["scatter"]["reference"]), np.asarray(output["scatter"]["snn"])
        ax.scatter(x, y, s=4, alpha=0.5)
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([low, high], [low, high], color="gray", lw=1, ls="--", label="SNN = ANN")
        row = output["per_t"][-1]
        ax.set(
            title=f"{short(name)}: cosine {row['cosine']:.5f}, rel. max error {row['relative_max_error']:.2g}",
            xlabel=f"{data['references'][0]} value",
            ylabel="SNN value",
        )
        ax.legend(fontsize=8)
    return png(fig)


def plot_layers(data: dict) -> bytes:
    rows = data["layers"]
    fig, axes = figure(2, 1, (12, 7))
    x = np.arange(len(rows))
    for ax, key, title in (
        (axes[0, 0], "relative_max_error", "relative max error"),
        (axes[1, 0], "cosine", "cosine similarity"),
    ):
        values = np.array([r[key] for r in rows], np.float64)
        ax.plot(x, values, color="lightgray", lw=1)
        for kind, marker in zip(dict.fromkeys(r["estimate"] for r in rows), "os^vD"):
            mask = np.array([r["estimate"] == kind for r in rows], bool)
            ax.scatter(x[mask], values[mask], s=14, marker=marker, label=f"SNN estimate = {kind}")
        neurons = np.array([r["neuron_input"] for r in rows], bool)
        ax.scatter(x[neurons], values[neurons], s=60, facecolors="none", edgecolors="red", label="spiking site")
        if key == "relative_max_error":
            log_axis(ax, values)
        t = f"T={data['timesteps']}" if data["stepped"] else "one pass"
        ax.set(title=f"per-layer {title} vs {data['layers_reference']} ({t})", ylabel=title)
        if len(rows):
            ax.legend(fontsize=8)
        else:
            empty(ax, "no tensor of the reference kept by name")
    axes[1, 0].set_xlabel("reference tensor (graph order; names in the table below)")
    return png(fig)


def plot_firing(data: dict) -> bytes:
    import matplotlib

    sites = data["sites"]
    fig, axes = figure(1, 1, (12, 4.8))
    ax = axes[0, 0]
    x = np.arange(len(sites))
    colors = [matplotlib.colormaps["tab20"](i) for i in range(20)]
    legend: dict[str, object] = {}
    color_of: dict[str, tuple] = {}
    for i, site in enumerate(sites):
        rate = site["spikes_per_neuron_per_step"]
        # a site's spikes split by kind (e.g. sign) stack in one bar; colours by legend entry
        parts = site.get("split") or {site["kind"]: site["spikes_per_sample"]}
        total = sum(parts.values()) or 1.0
        bottom = 0.0
        for label, spikes in parts.items():
            color = color_of.setdefault(label, colors[2 * len(color_of) % len(colors)])
            height = rate * spikes / total
            legend[label] = ax.bar(i, height, bottom=bottom, color=color)
            bottom += height
    if sites:
        ax.legend(legend.values(), legend.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        site_ticks(ax, [s["site"] for s in sites])
    else:
        empty(ax, "no spiking neurons")
    per = "step" if data["stepped"] else "pass"
    t = f" (T={data['timesteps']})" if data["stepped"] else ""
    ax.set(title=f"firing per spiking site{t}", ylabel=f"spikes / neuron / {per}", xlim=(-1, max(len(x), 1)))
    return png(fig)


def plot_energy(data: dict) -> bytes:
    e = data["energy"]
    fig, axes = figure(1, 1, (10, 4.5))
    ax = axes[0, 0]
    for column, model in enumerate(("ann", "snn")):
        bottom = 0.0
        for term in e[model]["terms"]:
            if term["energy_pj"]:
                ax.bar(column, term["energy_pj"] / 1e6, bottom=bottom, label=f"{model.upper()} {term['term']}")
                bottom += term["energy_pj"] / 1e6
    t = f"T={data['timesteps']}" if data["stepped"] else "one pass"
    ax.set_xticks([0, 1], ["ANN", f"SNN ({t})"])
    ax.set(
        ylabel="energy per sample (µJ)",
        title=f"estimated energy: SNN/ANN = {e['ratio']:.3f} (papers' convention {e['ratio_paper_convention']:.3f})",
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return png(fig)


# (file name without .png, alt text, function(data) -> PNG bytes): every report's plots
COMMON = (
    ("fidelity", "output fidelity", plot_fidelity),
    ("layers", "per-layer error", plot_layers),
    ("firing", "firing per site", plot_firing),
    ("energy", "estimated energy", plot_energy),
)
