"""What a spikec model says about itself: the metadata the compiler writes and every reader reads.

One record type, written and read here only: key names, types and their validation live in one place,
and a model whose record was tampered with fails with one line naming the file and the key."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from spikec.errors import SpikecError

PREFIX = "spikec."
MODES = ("unrolled", "stateful", "ttfs")
SEMANTICS = ("mean", "sum", "time-to-first-spike")
# The float32 step counter t is exact up to 2^24.
MAX_TIMESTEPS = 2**24


@dataclass(frozen=True)
class SpikecMetadata:
    method: str
    mode: str  # MODES: how the model runs its time (ttfs: one pass)
    semantics: str  # SEMANTICS: what a per-step tensor means
    timesteps: int  # T of an unrolled model; the default T of a stateful one; 1 for ttfs
    options: dict  # the method's options (its Options.to_json())
    allow_float: tuple[str, ...] = ()  # op types and node names kept in floating point
    report: dict = field(default_factory=dict)  # what the compile did (spikec.report)

    def to_props(self) -> dict[str, str]:
        return {f"{PREFIX}method": self.method, f"{PREFIX}mode": self.mode, f"{PREFIX}semantics": self.semantics,
                f"{PREFIX}timesteps": str(self.timesteps),
                f"{PREFIX}options": json.dumps(self.options, sort_keys=True),
                f"{PREFIX}allow_float": json.dumps(sorted(self.allow_float)),
                f"{PREFIX}report": json.dumps(self.report, sort_keys=True, default=_json_default)}

    def write(self, model: onnx.ModelProto) -> None:
        """Set this record on ``model``, replacing any spikec record it had (properties sorted by key)."""
        kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
        del model.metadata_props[:]
        for key, value in sorted([*kept, *self.to_props().items()]):
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))

    @classmethod
    def read(cls, model: onnx.ModelProto, where: str = "<in-memory model>") -> SpikecMetadata | None:
        """The record of a spikec model, None for a model without one (an ANN)."""
        props = {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
        if f"{PREFIX}method" not in props:
            return None

        def value(key: str, parse=None, default=None):
            text = props.get(f"{PREFIX}{key}")
            if text is None:
                if default is not None:
                    return default
                raise SpikecError(f"{where}: spikec metadata lacks '{PREFIX}{key}'")
            try:
                return parse(text) if parse else text
            except (ValueError, TypeError):
                raise SpikecError(f"{where}: spikec metadata '{PREFIX}{key}' is invalid ({text[:60]!r})") from None

        mode, semantics = value("mode"), value("semantics")
        for key, got, allowed in (("mode", mode, MODES), ("semantics", semantics, SEMANTICS)):
            if got not in allowed:
                raise SpikecError(f"{where}: spikec metadata '{PREFIX}{key}' is {got!r}, not one of {', '.join(allowed)}")
        timesteps = value("timesteps", int)
        if not 1 <= timesteps <= MAX_TIMESTEPS:
            raise SpikecError(f"{where}: spikec metadata '{PREFIX}timesteps' is {timesteps}, not in 1..{MAX_TIMESTEPS}")
        options, report = value("options", _json_object, {}), value("report", _json_object, {})
        allow_float = value("allow_float", json.loads, [])
        if not isinstance(allow_float, list) or not all(isinstance(a, str) for a in allow_float):
            raise SpikecError(f"{where}: spikec metadata '{PREFIX}allow_float' is not a list of names")
        return cls(value("method"), mode, semantics, timesteps, options, tuple(allow_float), report)


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
