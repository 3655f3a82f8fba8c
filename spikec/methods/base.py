"""What a conversion method is: its options, its time semantics and its steps in the compile template.

spikec/compiler.py runs one fixed template for every method (load, canonicalize, recognize, prepare,
memory check, calibrate, rewrite, emit, verify, save); a method fills in the steps that are its own, and
names its section of `spikec report` (spikec/report/). A method is one module under spikec/methods/
exporting a ``Method`` and one entry in the registry (spikec/methods/__init__.py).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spikec.passes import options as options_lib
from spikec.passes.dequantize import float_model
from spikec.passes.options import Options
from spikec.passes.patterns import Region, find_regions
from spikec.passes.stats import TapStats
from spikec.runtime.metadata import CompileReport

if TYPE_CHECKING:
    from spikec.report.section import Section

# Time semantics (passes/timing.py); a method without time steps sends spike times between layers.
MEAN, SUM, FIRST_SPIKE = "mean", "sum", "time-to-first-spike"


@dataclass
class Job:
    """One compile as it passes through the template: the ANN (replaced where a method prepares another,
    e.g. SpikeZIP-TF's quantized ANN), its graph and recognized regions, the calibration data, the
    common and the method's options, and the report the steps fill in."""

    ann: onnx.ModelProto
    feeds: Mapping[str, np.ndarray]
    timesteps: int | None  # None: measured once the network is rewritten (spikec/equilibrium.py)
    mode: str
    batch_size: int
    progress: bool
    allow_float: frozenset[str]
    options: Options
    # samples kept from calibration to verify on (None where none could be spared): a method may measure
    # on them what calibration cannot see, e.g. how much unseen data its ranges clip
    held_out: Mapping[str, np.ndarray] | None = None
    graph: gs.Graph = field(init=False)
    regions: list[Region] = field(init=False)
    report: CompileReport = field(default_factory=CompileReport)
    # what the method's prepare step built for its later steps (TTFS: the ANN as its constructions' stages)
    prepared: object = None
    # models written beside the SNN once all are verified, by the output option naming their path
    # (SpikeZIP-TF's QANN: save_qann)
    extra_outputs: dict[str, onnx.ModelProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.recognize(self.ann)

    def recognize(self, ann: onnx.ModelProto) -> None:
        """Make ``ann`` the model to convert: import its graph and recognize its regions."""
        self.ann = ann
        self.graph = gs.import_onnx(ann)
        self.regions = find_regions(self.graph)


@dataclass(frozen=True)
class Calibration:
    """What a method calibrates: statistics of ``taps`` on ``model`` (the job's ANN where None), each
    keeping at most ``max_values`` sampled values. ``neuron_sites`` (tensors that get neurons) and
    ``hidden`` (neurons per element where not one) size the memory estimate."""

    taps: list[str]
    neuron_sites: list[str]
    hidden: dict[str, int] = field(default_factory=dict)
    model: onnx.ModelProto | None = None
    max_values: int = 2_000_000


@dataclass(frozen=True)
class Bound:
    """What a method's SNN should reach on held-out data (a fidelity measure of spikec.evaluate): at least
    ``limit`` for a similarity, at most ``limit`` for an error. Below it, compile warns."""

    measure: str  # "cosine" or "relative_max_error"
    limit: float

    def met(self, value: float) -> bool:
        return value >= self.limit if self.measure == "cosine" else value <= self.limit

    def rank(self, value: float) -> float:
        """Higher for a value nearer the bound's side; a NaN measure ranks below every number."""
        return -math.inf if math.isnan(value) else value if self.measure == "cosine" else -value

    def worst(self, values: Iterable[float]) -> float:
        return min(values, key=self.rank)

    def __str__(self) -> str:
        return f"{self.measure.replace('_', ' ')} {'>=' if self.measure == 'cosine' else '<='} {self.limit:g}"


class Method(ABC):
    """A conversion method. Subclasses set the class attributes and implement ``calibration`` and ``rewrite``."""

    name: str
    paper: str
    Options: type[Options]
    semantics: str
    modes: tuple[str, ...] = ("unrolled", "stateful")
    # what its SNN should reach against ``reference`` on held-out samples (None: no warning), and what to
    # try where it does not
    bound: Bound | None = None
    advice = "raise --timesteps"
    reference = "ANN"
    # T where --timesteps is not given and the method measures none (methods without time steps ignore
    # it); where it measures one, the fewest steps the search for its bound tries (None: sum semantics,
    # the steps until no neuron fires; spikec/equilibrium.py)
    default_timesteps: int | None = 8

    def measures_timesteps(self, options: options_lib.Options) -> bool:
        """Whether a compile with ``options`` and without --timesteps measures T on the rewritten network
        (spikec/equilibrium.py), which only a network whose rewrite does not depend on T allows."""
        return self.default_timesteps is None

    # options_lib.Options: in the class body the name Options is the class attribute above
    def advise(self, verification: dict, options: options_lib.Options) -> str:
        """What to try where the SNN compiled with ``options`` misses ``bound`` on ``verification``'s
        samples (verify's measures)."""
        return self.advice

    def fewer_steps(self, options: options_lib.Options) -> str:
        """The option of this method, if any, that lets the SNN compiled with ``options`` reach its bound in
        fewer steps ('' where there is none)."""
        return ""

    def verification_reference(self, ann: onnx.ModelProto, options: options_lib.Options) -> tuple[onnx.ModelProto, str]:
        """The model (and its name in messages) that the SNN compiled from ``ann`` with ``options`` is held
        to on held-out samples."""
        return ann, self.reference

    @property
    def stepped(self) -> bool:
        """Whether the SNN runs over time steps (unrolled or stateful), as rate and sum codes do."""
        return self.semantics != FIRST_SPIKE

    def prepare(self, job: Job) -> None:
        """Turn the ANN into the model this method converts (default: the ANN as it is; a static QDQ model
        without its activation quantizers, `passes.dequantize.float_model`)."""
        if any(r.kind == "quantizer" for r in job.regions):
            job.recognize(float_model(job.ann, self.name))

    @abstractmethod
    def calibration(self, job: Job) -> Calibration:
        """What to calibrate; raises SpikecError where the model has nothing this method converts."""

    @abstractmethod
    def rewrite(self, job: Job, stats: dict[str, TapStats]) -> dict:
        """Rewrite ``job.graph`` into the SNN (spikec ops, no time structure yet); returns the report's
        method-specific part (CompileReport.update takes it in)."""

    def report_section(self) -> type[Section]:
        """This method's section of `spikec report` (spikec/report/section.py). The default counts the
        spikes of the model's neuron ops, a nonzero output being a spike."""
        from spikec.report.section import Section

        return Section
