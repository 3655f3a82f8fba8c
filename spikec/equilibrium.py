"""T for a sum-semantics SNN compiled without --timesteps: the steps until no neuron fires, measured.

SpikeZIP-TF's SNN equals its quantized ANN once it is quiet (T_eq), and T_eq is a property of the model
and the data, not of the method: a 16-level PTQ model is quiet after a few dozen steps, a uint8 QDQ
model (256 levels, one spike per neuron and step) after hundreds. Any fixed default T is too short for
some models, which then compile to a warned, broken SNN, or longer than others need. So the compile runs
the rewritten network stateful, until quiet, on the samples it verifies on, and unrolls (or records,
stateful) that many steps with a margin for samples it has not seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec import modelio
from spikec.evaluate import run_dataset
from spikec.passes import emit
from spikec.runtime import weights
from spikec.runtime.layout import SPIKES_OUTPUT, STEPS_SUFFIX
from spikec.runtime.metadata import SpikecMetadata
from spikec.runtime.session import equilibrium_steps

# T = the largest T_eq measured times this, rounded up to a multiple of ROUND_TO: the samples measured
# are few (those compile verifies on: one in eight, at most 32), and an unseen one may take longer
MARGIN = 1.25
ROUND_TO = 8
# steps a measurement runs at most: a 256-level model at one spike a step is quiet after a few hundred
CAP = 1024


def measured_timesteps(
    graph: gs.Graph,
    template: onnx.ModelProto,
    method: str,
    semantics: str,
    options: dict,
    layouts: emit.BatchLayouts,
    feeds: Mapping[str, np.ndarray],
    *,
    cap: int = CAP,
    held_out: bool,
    batch_size: int,
    progress: bool,
    external: bool,
) -> dict:
    """Run a stateful copy of the rewritten ``graph`` (``method``'s, of time ``semantics``, compiled with
    ``options``, the method's Options as JSON) on ``feeds`` until no neuron fires, at most ``cap`` steps
    (CAP, or fewer where an unrolled model of more would not fit its memory budget), and choose T from the
    steps each sample took, at most ``cap``.
    Returns the report's ``equilibrium`` part: the samples (``held_out``: kept from calibration), their
    T_eq (None: still firing at step ``cap``), and the T chosen. ``external``: the copy is emitted with
    its weights in a temporary file beside it, as the compile writes a model whose input keeps its
    weights beside it (or that is past protobuf's limit)."""
    probe = graph.copy()
    emit.emit_stateful(probe, semantics, layouts)
    record = SpikecMetadata(method, "stateful", semantics, cap, options)
    with _emitted(probe, template, record.to_props(), external) as model:
        outputs = run_dataset(model, feeds, batch_size=batch_size, timesteps=cap, until_quiet=True, progress=progress)
    steps = equilibrium_steps(outputs[SPIKES_OUTPUT + STEPS_SUFFIX])
    reached = [s for s in steps if s is not None]
    longest = max(reached) if len(reached) == len(steps) else cap
    return {
        "samples": len(steps),
        "held_out": held_out,
        "steps_to_quiet": steps,
        "cap": cap,
        "margin": MARGIN,
        "timesteps": min(cap, ROUND_TO * math.ceil(longest * MARGIN / ROUND_TO)),
    }


def equilibrium_line(equilibrium: dict) -> str:
    """How a measured T was chosen, in words."""
    steps = equilibrium["steps_to_quiet"]
    kind = "held-out calibration" if equilibrium["held_out"] else "calibration"
    samples = f"{len(steps)} {kind} sample{'s' if len(steps) != 1 else ''}"
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
