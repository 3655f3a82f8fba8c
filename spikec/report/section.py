"""A method's part of `spikec report`: what it measures on the SNN besides the common fidelity, per-layer
error and energy, and how its page section looks. ``Method.report_section()`` returns the class; the
report builds one instance per run, which accumulates over the batches.

Every section reports its spiking *sites* (one row per neuron layer: neurons per sample, spikes per
sample), from which the page draws the firing plot and the energy model counts spike-driven work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from spikec import graphinfo
from spikec.errors import SpikecError
from spikec.runtime.metadata import SpikecMetadata

# (file name without .png, alt text, function(data) -> PNG bytes drawing it from the report's data)
Plot = tuple[str, str, Callable[[dict], bytes]]


@dataclass
class Context:
    """What a section may read: the SNN, its record, the run's sizes."""

    snn: onnx.ModelProto
    record: SpikecMetadata
    steps: int  # time steps per sample (1 for a TTFS model)
    samples: int

    def initializer(self, name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(next(t for t in self.snn.graph.initializer if t.name == name))


def site_row(
    site: str, kind: str, node: str, source: str, neurons: int, spikes: float, samples: int, steps: int, **extra
) -> dict:
    """One spiking site: ``source`` is the tensor whose spikes reach the next products (energy model);
    ``extra`` may hold ``split``, the spikes per sample by kind (stacked in the firing plot)."""
    per_sample = spikes / samples
    return {
        "site": site,
        "kind": kind,
        "node": node,
        "source": source,
        "neurons": int(neurons),
        "spikes_per_sample": per_sample,
        "spikes_per_neuron_per_step": per_sample / (neurons * steps) if neurons else 0.0,
        **extra,
    }


# neuron ops whose output is one spike code per neuron and step, a nonzero code being one spike (an IF
# neuron's output is k spikes' worth, k up to its burst)
SPIKE_CODE_OPS = ("MTNeuron", "STBIFNeuron")
# neuron ops whose output is the signed number of spikes a neuron fires in a step (bursts of up to k)
SPIKE_COUNT_OPS = ("STBIFIntegerNeuron",)


class Section:
    """The default section: the spikes of every neuron op of SPIKE_CODE_OPS and SPIKE_COUNT_OPS."""

    title = "Spiking neurons"
    plots: tuple[Plot, ...] = ()
    # whether every site's spikes are the per-step counts of this class's add (sites_until)
    counts_per_step = True

    def __init__(self, context: Context):
        self.context = context
        nodes = [
            n
            for n in context.snn.graph.node
            if n.domain == graphinfo.SPIKEC_DOMAIN and graphinfo.base_op(n) in SPIKE_CODE_OPS + SPIKE_COUNT_OPS
        ]
        self.neurons = {n.output[0]: n for n in nodes}
        # the tensor each neuron stands on, as the compile report names it (its input may be gated)
        self.tensor = {n["node"]: n["tensor"] for n in context.record.report.neurons or []}
        # spikes per step (the unrolled layout is step-major), so the energy of every T <= steps is exact
        self.spikes = {name: np.zeros(context.steps, np.int64) for name in self.neurons}
        self.values = dict.fromkeys(self.neurons, 0)

    @classmethod
    def references(cls, ann: str | os.PathLike, qann: str | os.PathLike | None) -> dict[str, str | os.PathLike]:
        """The models the SNN is measured against, the first for the per-layer error too."""
        if qann is not None:
            raise SpikecError("argument --qann: only a spikezip model is compared with a quantized ANN")
        return {"ANN": ann}

    def model(self, snn: onnx.ModelProto) -> onnx.ModelProto:
        """The model the report runs: the SNN, or an in-memory copy with probes added."""
        return snn

    def tensors(self) -> list[str]:
        """SNN tensors to fetch on every batch."""
        return list(self.neurons)

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        for name, node in self.neurons.items():
            value = values[name].reshape(self.context.steps, -1)
            if graphinfo.base_op(node) in SPIKE_COUNT_OPS:
                self.spikes[name] += np.abs(value).sum(axis=1, dtype=np.float64).astype(np.int64)
            else:
                self.spikes[name] += np.count_nonzero(value, axis=1)
            self.values[name] += value.size

    def sites(self) -> list[dict]:
        return self._sites(self.context.steps)

    def _sites(self, steps: int) -> list[dict]:
        c = self.context
        return [
            site_row(
                self.tensor.get(node.name, node.input[0]),
                graphinfo.base_op(node),
                node.name,
                name,
                self.values[name] // (c.steps * c.samples),
                int(self.spikes[name][:steps].sum()),
                c.samples,
                steps,
            )
            for name, node in self.neurons.items()
        ]

    def sites_until(self, steps: int) -> list[dict] | None:
        """The sites as a model run for the first ``steps`` steps only would fire (energy of a smaller T
        from the same run); None where the section counts spikes over all steps only."""
        if steps == self.context.steps:
            return self.sites()
        return self._sites(steps) if self.counts_per_step else None

    def finish(self) -> dict:
        """The section's numbers (data["section"]) beyond the sites."""
        return {}

    def energy_counts(self, sites: list[dict], products: list[dict], steps: int) -> dict[str, dict[str, float]]:
        """Counts of the energy terms the section decides (energy.TERMS) over ``steps`` steps; ``products``
        are the SNN's product nodes as the energy model counted them."""
        return {"neuron_updates": {"AC": steps * sum(s["neurons"] for s in sites)}}

    def claimed_products(self) -> dict[str, str]:
        """SNN product nodes this method counts itself (in energy_counts), and the term they go to."""
        return {}

    @staticmethod
    def html(data: dict, img: Callable[[str], str]) -> list[str]:
        """The section's HTML blocks; ``img(name)`` embeds one of its plots."""
        return []
