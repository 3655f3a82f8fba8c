"""SpikeZIP-TF's report section: the SNN against the quantized ANN (QANN) it is equivalent to, the steps
until the network is quiet (T_eq) and the spikes per step."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from spikec.equilibrium import equilibrium_line
from spikec.errors import SpikecError
from spikec.report import plots
from spikec.report.page import note
from spikec.report.section import Context, Section
from spikec.runtime.layout import SPIKES_OUTPUT, STEPS_SUFFIX
from spikec.runtime.session import equilibrium_steps

SPIKES_STEPS = SPIKES_OUTPUT + STEPS_SUFFIX


def is_quantized(path: str | os.PathLike) -> bool:
    """Whether the model has activation quantizers (QDQ pairs or spikec's own): a QANN."""
    import onnx_graphsurgeon as gs

    from spikec.passes.canonicalize import canonicalize
    from spikec.passes.patterns import find_regions
    from spikec.report.build import load

    return any(r.kind == "quantizer" for r in find_regions(gs.import_onnx(canonicalize(load(path, "ANN")))))


def _plot_steps(data: dict) -> bytes:
    z = data["section"]
    steps = len(z["spikes_per_step"])
    fig, axes = plots.figure(1, 2, (12, 4))
    ax = axes[0, 0]
    t = np.arange(1, steps + 1)
    ax.plot(t, z["spikes_per_step"], "o-")
    plots.log_axis(ax, z["spikes_per_step"])
    ax.set(title="spikes per sample at each step (all ST-BIF+ neurons)", xlabel="step t", ylabel="spikes / sample")
    ax = axes[0, 1]
    ax.bar(t, z["t_eq_histogram"], label="quiet after T_eq")
    if z["not_quiet"]:
        ax.bar([steps + 1], [z["not_quiet"]], color="tab:red", label=f"still firing at T={steps}")
    ax.set(title="T_eq: the last step with a spike, per sample", xlabel="T_eq", ylabel="samples")
    ax.legend(fontsize=8)
    return plots.png(fig)


class SpikeZIPSection(Section):
    title = "Equilibrium steps and spikes per step (SpikeZIP-TF)"
    plots = (("steps", "spikes per step and T_eq", _plot_steps),)

    def __init__(self, context: Context):
        super().__init__(context)
        self.per_step: list[np.ndarray] = []

    @classmethod
    def references(cls, ann: str | os.PathLike, qann: str | os.PathLike | None) -> dict[str, str | os.PathLike]:
        """The QANN first (the SNN equals it once quiet), then the float ANN where there is one."""
        if qann is not None:
            return {"QANN": qann, "float ANN": ann}
        if not is_quantized(ann):
            raise SpikecError(
                f"ANN {ann}: a spikezip SNN is measured against the quantized ANN it is equivalent "
                f"to, and this model has no activation quantizers; pass the QANN with --qann (written "
                f"by `spikec compile --save-qann` or `spikec quantize`), or give it as ANN"
            )
        return {"QANN": ann}

    def tensors(self) -> list[str]:
        return [*super().tensors(), SPIKES_STEPS]

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        super().add(values)
        self.per_step.append(values[SPIKES_STEPS])

    def finish(self) -> dict:
        counts = np.concatenate(self.per_step, axis=1)  # [T, samples]
        t_eq = equilibrium_steps(counts)
        reached = [t for t in t_eq if t is not None]
        steps = counts.shape[0]
        return {
            "spikes_per_step": counts.mean(axis=1).tolist(),
            "t_eq": t_eq,
            "t_eq_histogram": np.bincount(reached, minlength=steps + 1)[1:].tolist(),
            "not_quiet": len(t_eq) - len(reached),
            "mean_t_eq": float(np.mean(reached)) if reached else None,
            "max_t_eq": max(reached) if reached else None,
            # how the compile chose T, where it measured it (spikec/equilibrium.py)
            "compile_equilibrium": self.context.record.report.equilibrium,
        }

    @staticmethod
    def html(data: dict, img: Callable[..., str]) -> list[str]:
        z = data["section"]
        steps = len(z["spikes_per_step"])
        quiet = len(z["t_eq"]) - z["not_quiet"]
        mean = f"mean T_eq {z['mean_t_eq']:.2f}, max {z['max_t_eq']}" if quiet else "no sample became quiet"
        equal = (
            "the integer QANN's bit for bit"
            if data["options"].get("integer")
            else "the QANN's (up to float rounding at level boundaries)"
        )
        measured = z.get("compile_equilibrium")
        chosen = f" The compile chose T={measured['timesteps']}: {equilibrium_line(measured)}." if measured else ""
        return [
            f"<p>{quiet} of {len(z['t_eq'])} samples became quiet within T={steps} ({mean}): after T_eq no "
            f"neuron fires again and the outputs equal {equal}; "
            f"{z['not_quiet']} still fired at step {steps}. A stateful model run until quiet "
            f"(<code>spikec run --until-quiet</code>) stops there.{chosen}</p>",
            img("steps"),
            note(
                "Spike counts per ST-BIF+ site: the firing table above (spikes / sample). The energy below "
                "counts all T steps the unrolled model runs."
            ),
        ]
