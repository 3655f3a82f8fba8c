"""What a spikec model says about itself: the metadata the compiler writes and every reader reads.

One record type, written and read here only: key names, types and their validation live in one place,
and a model whose record was tampered with fails with one line naming the file and the key."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import onnx

from spikec.errors import SpikecError

PREFIX = "spikec."
# how messages name a model given as a ModelProto, not a file
IN_MEMORY = "<in-memory model>"
MODES = ("unrolled", "stateful", "ttfs")
SEMANTICS = ("mean", "sum", "time-to-first-spike")
# The float32 step counter t is exact up to 2^24.
MAX_TIMESTEPS = 2**24


def model_label(model) -> str:
    """How messages name ``model``: its path, or IN_MEMORY for a ModelProto."""
    return IN_MEMORY if isinstance(model, onnx.ModelProto) else os.fspath(model)


@dataclass
class CompileReport:
    """What a compile did, as ``spikec.report`` records it: each step's part, typed. A field left None was
    not reported (the method has no such part) and is absent from the JSON; keys a method reports beyond
    these (its own counts and flags) are kept in ``extra`` and written as they are, so the JSON is one
    object of the known keys and the extras (the schema of docs/architecture.md)."""

    semantics: str | None = None  # the method's time semantics (SEMANTICS)
    regions: list[dict] | None = None  # recognized regions (passes/patterns.describe)
    neurons: list[dict] | None = None  # neuron sites: tensor, node, and the neuron's parameters
    compensated: list[dict] | None = None  # regions run in float on accumulated values (passes/timing.py)
    encoders: list[dict] | None = None  # STA's X2X encoder sites
    ugos: list[dict] | None = None  # STA's UGO replacements, by region
    layernorms_kept_float: list[str] | None = None  # STA: LayerNorm regions no UGO replaced
    activations_kept_exact: list[dict] | None = None  # STA: activations their UGO does not fit (region, errors)
    ttfs: dict | None = None  # TTFS: sites, constructions, clipping, float nodes
    quantization: list[dict] | None = None  # SpikeZIP-TF: the quantizers its prepare step inserted
    calibration: dict | None = None  # ECMT: the calibration statistics the thresholds came from
    verification: dict | None = None  # the held-out run (spikec/verify.py)
    equilibrium: dict | None = None  # a T measured where none was given (spikec/equilibrium.py)
    timesteps_search: dict | None = None  # ECMT: the fewest steps meeting its bound, where no T was given (the same)
    # weight digests (runtime/weights.digest) of the model compiled ("input") and of each model the compile wrote
    # for an output option (its option name): what eval and report check the models they are given against
    source: dict | None = None
    extra: dict[str, typing.Any] = field(default_factory=dict)

    @classmethod
    def known(cls) -> dict[str, type]:
        """The typed keys and the JSON type each holds (from the annotations: ``list[dict] | None`` holds a list)."""
        hints = typing.get_type_hints(cls)
        return {
            f.name: typing.get_origin(kind) or kind
            for f in fields(cls)
            if f.name != "extra"
            for kind in [typing.get_args(hints[f.name])[0]]
        }

    def update(self, part: Mapping[str, typing.Any]) -> None:
        """Take in a step's part (e.g. a method's rewrite result): typed keys to their fields, the rest to extra."""
        known = self.known()
        for key, value in part.items():
            if key in known:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    @classmethod
    def from_json(cls, data: Mapping[str, typing.Any]) -> CompileReport:
        """The report from its JSON object; a typed key holding the wrong JSON type is a ValueError naming it."""
        report = cls()
        for key, kind in cls.known().items():
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise ValueError(key)
        report.update(data)
        return report

    def to_json(self) -> dict[str, typing.Any]:
        return {**self.extra, **{key: value for key in self.known() if (value := getattr(self, key)) is not None}}


@dataclass(frozen=True)
class SpikecMetadata:
    method: str
    mode: str  # MODES: how the model runs its time (ttfs: one pass)
    semantics: str  # SEMANTICS: what a per-step tensor means
    timesteps: int  # T of an unrolled model; the default T of a stateful one; 1 for ttfs
    options: dict  # the method's options (its Options.to_json())
    allow_float: tuple[str, ...] = ()  # op types and node names kept in floating point
    report: CompileReport = field(default_factory=CompileReport)  # what the compile did (spikec.report)

    def to_props(self) -> dict[str, str]:
        return {
            f"{PREFIX}method": self.method,
            f"{PREFIX}mode": self.mode,
            f"{PREFIX}semantics": self.semantics,
            f"{PREFIX}timesteps": str(self.timesteps),
            f"{PREFIX}options": json.dumps(self.options, sort_keys=True),
            f"{PREFIX}allow_float": json.dumps(sorted(self.allow_float)),
            f"{PREFIX}report": json.dumps(self.report.to_json(), sort_keys=True, default=_json_default),
        }

    def write(self, model: onnx.ModelProto) -> None:
        """Set this record on ``model``, replacing any spikec record it had (properties sorted by key)."""
        kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
        del model.metadata_props[:]
        for key, value in sorted([*kept, *self.to_props().items()]):
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))

    @classmethod
    def read(cls, model: onnx.ModelProto, where: str = IN_MEMORY) -> SpikecMetadata | None:
        """The record of a spikec model, None for a model without one (an ANN)."""
        return cls.from_props({p.key: p.value for p in model.metadata_props}, where)

    @classmethod
    def from_props(cls, props: Mapping[str, str], where: str) -> SpikecMetadata | None:
        """The record from a model's metadata properties (a session's custom_metadata_map), checked: a
        value spikec cannot have written (the file was edited) is a one-line SpikecError naming the key,
        not a crash where it is first used. None where there is no spikec record."""
        raw = {k: v for k, v in props.items() if k.startswith(PREFIX)}
        if not raw:
            return None

        def refuse(key: str, expected: str):
            shown = raw.get(PREFIX + key)
            shown = "missing" if shown is None else repr(shown if len(shown) <= 40 else shown[:37] + "...")
            raise SpikecError(
                f"model {where}: metadata {PREFIX}{key} is {shown}, expected {expected}; the file was "
                f"changed after spikec wrote it: compile it again"
            )

        method = raw.get(PREFIX + "method", "")
        if not method:
            refuse("method", "a method name")
        for key, allowed in (("mode", MODES), ("semantics", SEMANTICS)):
            if raw.get(PREFIX + key) not in allowed:
                refuse(key, "one of " + ", ".join(allowed))
        steps = raw.get(PREFIX + "timesteps", "")
        if not (steps.isascii() and steps.isdigit() and 1 <= int(steps) <= MAX_TIMESTEPS):
            refuse("timesteps", f"an integer in 1..{MAX_TIMESTEPS}")
        parsed = {}
        for key, kind, default in (("options", dict, "{}"), ("report", dict, "{}"), ("allow_float", list, "[]")):
            try:
                parsed[key] = json.loads(raw.get(PREFIX + key, default))
            except ValueError:
                parsed[key] = None
            if not isinstance(parsed[key], kind):
                refuse(key, "a JSON object" if kind is dict else "a JSON list")
        if not all(isinstance(name, str) for name in parsed["allow_float"]):
            refuse("allow_float", "a JSON list of names")
        try:
            report = CompileReport.from_json(parsed["report"])
        except ValueError as exc:
            refuse("report", f"a JSON object whose {exc} is a JSON {CompileReport.known()[str(exc)].__name__}")
        if raw[PREFIX + "mode"] == "ttfs" and report.ttfs is None:
            refuse("report", "a JSON object with the ttfs sites")
        return cls(
            method,
            raw[PREFIX + "mode"],
            raw[PREFIX + "semantics"],
            int(steps),
            parsed["options"],
            tuple(parsed["allow_float"]),
            report,
        )


def _json_object(text: str) -> dict:
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return parsed


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
