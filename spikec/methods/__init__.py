"""The conversion methods: one module each, one line each in METHODS."""

from __future__ import annotations

from spikec.errors import SpikecError
from spikec.methods import ecmt, spikezip, sta, ttfs
from spikec.methods.base import Calibration, Job, Method

METHODS: dict[str, Method] = {m.name: m for m in (ecmt.METHOD, spikezip.METHOD, sta.METHOD, ttfs.METHOD)}


def register(method: Method) -> None:
    """Make ``method`` available to compile and the CLI under ``method.name``."""
    if method.name in METHODS:
        raise SpikecError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise SpikecError(f"argument method={name!r}: choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Calibration", "Job", "Method", "get", "register"]
