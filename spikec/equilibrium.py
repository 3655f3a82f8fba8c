"""T for an SNN compiled without --timesteps, measured on the rewritten network.

SpikeZIP-TF's SNN equals its quantized ANN once it is quiet (T_eq), and T_eq is a property of the model
and the data, not of the method: a 16-level PTQ model is quiet after a few dozen steps, a uint8 QDQ
model (256 levels, one spike per neuron and step) after hundreds. ECMT's SNN approaches its ANN as T
grows, and how fast is the model's too: most models meet ECMT's bound after 8 steps, Gemma 2 after 16,
Swin-v2 after 24 (docs/conformance.md). Any fixed default T is too short for some models, which then
compile to a warned SNN short of its bound, or longer than others need. So the compile runs a stateful
copy of the rewritten network on the samples it verifies on, and unrolls (or records, stateful):

- sum semantics (`steps_to_quiet`): the steps until no neuron fires, with a margin for samples it has
  not seen;
- a method with a fidelity bound (`fewest_steps_meeting_bound`): the fewest steps, a multiple of
  ROUND_TO from the method's default T, at which every output meets the bound.

A stateful model's output after step t is the output of the model unrolled for t steps, so one run
measures every T up to its length.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec import modelio
from spikec.evaluate import measures, open_session, run_dataset
from spikec.methods.base import Method
from spikec.passes import emit
from spikec.passes.options import Options
from spikec.runtime import weights
from spikec.runtime.layout import SPIKES_OUTPUT, STEPS_SUFFIX
from spikec.runtime.metadata import SpikecMetadata
from spikec.runtime.session import InferenceSession, equilibrium_steps

# T = the largest T_eq measured times this, rounded up to a multiple of ROUND_TO: the samples measured
# are few (those compile verifies on: one in eight, at most 32), and an unseen one may take longer
MARGIN = 1.25
ROUND_TO = 8
# steps a measurement runs at most: a 256-level model at one spike a step is quiet after a few hundred
CAP = 1024
# the most steps the search for a bound runs: past them a rate code has lost the low latency that is its
# method's point, and a model short of its bound there needs other thresholds, not more steps
BOUND_CAP = 64


@dataclass(frozen=True)
class Probe:
    """What a measurement runs: a stateful copy of the rewritten ``graph`` (``method``'s, compiled with
    ``options``) on ``feeds``, ``held_out`` from calibration or not, for at most ``cap`` steps (fewer where
    an unrolled model of more would not fit its memory budget). ``external``: the copy is emitted with its
    weights in a temporary file beside it, as the compile writes a model whose input keeps its weights
    beside it (or that is past protobuf's limit)."""

    graph: gs.Graph
    template: onnx.ModelProto
    method: Method
    options: Options
    layouts: emit.BatchLayouts
    feeds: Mapping[str, np.ndarray]
    cap: int
    held_out: bool
    batch_size: int
    progress: bool
    external: bool

    @contextlib.contextmanager
    def session(self) -> Iterator[InferenceSession]:
        copy = self.graph.copy()
        emit.emit_stateful(copy, self.method.semantics, self.layouts)
        record = SpikecMetadata(self.method.name, "stateful", self.method.semantics, self.cap, self.options.to_json())
        with _emitted(copy, self.template, record.to_props(), self.external) as model:
            yield open_session(model)

    def run(self, session: InferenceSession, timesteps: int, until_quiet: bool = False) -> dict[str, np.ndarray]:
        return run_dataset(
            session,
            self.feeds,
            batch_size=self.batch_size,
            timesteps=timesteps,
            until_quiet=until_quiet,
            progress=self.progress,
        )


def steps_to_quiet(probe: Probe) -> dict:
    """Run ``probe`` until no neuron fires and choose T from the steps each sample took, at most its cap.
    Returns the report's ``equilibrium`` part: the samples, their T_eq (None: still firing at the cap),
    and the T chosen."""
    cap = probe.cap
    with probe.session() as session:
        outputs = probe.run(session, cap, until_quiet=True)
    steps = equilibrium_steps(outputs[SPIKES_OUTPUT + STEPS_SUFFIX])
    reached = [s for s in steps if s is not None]
    longest = max(reached) if len(reached) == len(steps) else cap
    return {
        "samples": len(steps),
        "held_out": probe.held_out,
        "steps_to_quiet": steps,
        "cap": cap,
        "margin": MARGIN,
        "timesteps": min(cap, ROUND_TO * math.ceil(longest * MARGIN / ROUND_TO)),
    }


def fewest_steps_meeting_bound(probe: Probe, reference: onnx.ModelProto, reference_name: str) -> dict:
    """The fewest steps, a multiple of ROUND_TO from the method's default T up to the probe's cap, at
    which every output of the probe meets the method's bound against ``reference`` on its samples; where
    none does, the T that comes closest. The probe runs rounds of doubling length (each measures every
    T up to its own), so a model that meets the bound early costs few steps.
    Returns the report's ``timesteps_search`` part: the samples, the bound, the worst output's measure
    at each T tried, and the T chosen."""
    bound = probe.method.bound
    assert bound is not None and probe.method.default_timesteps is not None, "a method that measures T by its bound"
    want = run_dataset(reference, probe.feeds, batch_size=probe.batch_size)
    tried: list[tuple[int, float]] = []
    start, cap = probe.method.default_timesteps, probe.cap
    with probe.session() as session:
        length = start
        while True:
            got = probe.run(session, length)
            for t in range(start, length + 1, ROUND_TO):
                values = [measures(want[n], got[n + STEPS_SUFFIX][t - 1])[bound.measure] for n in want if n in got]
                tried.append((t, bound.worst(values)))
                if bound.met(tried[-1][1]):
                    break
            if bound.met(tried[-1][1]) or length == cap:
                break
            start, length = length + ROUND_TO, min(cap, 2 * length)
    # the rounds stop at the first T that meets the bound: only the last tried can
    met = bound.met(tried[-1][1])
    return {
        "samples": len(next(iter(probe.feeds.values()))),
        "held_out": probe.held_out,
        "reference": reference_name,
        "bound": str(bound),
        "measure": bound.measure,
        "tried": [[t, value] for t, value in tried],
        "cap": cap,
        "met": met,
        "timesteps": tried[-1][0] if met else max(tried, key=lambda tried_t: bound.rank(tried_t[1]))[0],
    }


def _samples(measured: dict) -> str:
    kind = "held-out calibration" if measured["held_out"] else "calibration"
    return f"{measured['samples']} {kind} sample{'s' if measured['samples'] != 1 else ''}"


def bound_line(search: dict) -> str:
    """How a T searched for a bound was chosen, in words."""
    values = dict(search["tried"])
    measure = search["measure"].replace("_", " ")
    if not search["met"]:
        return (
            f"no T from {search['tried'][0][0]} to {search['cap']} meets {search['bound']} against the "
            f"{search['reference']} on {_samples(search)}; the closest, {measure} {values[search['timesteps']]:.4g}"
        )
    line = (
        f"the fewest steps (a multiple of {ROUND_TO}) at which the SNN meets {search['bound']} against the "
        f"{search['reference']} on {_samples(search)} ({measure} {values[search['timesteps']]:.4g}"
    )
    shorter = [f"{value:.4g} at T={t}" for t, value in search["tried"] if t < search["timesteps"]]
    return line + (f"; {', '.join(shorter)})" if shorter else ")")


def equilibrium_line(equilibrium: dict) -> str:
    """How a measured T was chosen, in words."""
    steps = equilibrium["steps_to_quiet"]
    samples = _samples(equilibrium)
    if None in steps:
        return f"{steps.count(None)} of {samples} still fire at step {equilibrium['cap']}"
    line = f"the steps until no neuron fires on {samples}, at most {max(steps)}, "
    margin = f"plus {round(100 * (equilibrium['margin'] - 1))} %"
    if equilibrium["timesteps"] == equilibrium["cap"] < CAP:
        return line + f"{margin} up to the T an unrolled model fits in its memory budget"
    return line + margin


@contextlib.contextmanager
def _emitted(
    graph: gs.Graph, template: onnx.ModelProto, props: dict[str, str], external: bool
) -> Iterator[onnx.ModelProto | str]:
    if not external:
        yield emit.to_model(graph, template, props)
        return
    with modelio.staging(None) as staged:
        with weights.DataFile(staged.data) as data:
            model = emit.to_model(graph, template, props, data)
        staged.save_references(model)
        del model
        yield str(staged.path)
