"""Options declared once: a method's options are a frozen dataclass whose fields carry their default,
their bounds and their command-line flag and help.

The compiler builds them from keyword arguments, the CLI generates its argument groups from the same
fields (spikec/cli.py), and a model records them in its metadata: the API, the CLI and the record
cannot drift apart. Validation runs on construction, so an Options object that exists is valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from spikec.errors import SpikecError


def option(
    default,
    help: str,
    *,
    bounds: tuple[float, float] | None = None,
    open_low: bool = False,
    flag: str | tuple[str, ...] | None = None,
    metavar: str | None = None,
    output: str | None = None,
):
    """A field of an Options dataclass.

    ``bounds`` (inclusive; ``open_low`` excludes the lower one) apply to numbers. ``flag`` names the CLI
    flag (a tuple: with its aliases); by default ``--name-with-dashes``, and for a boolean that defaults
    to True, ``--no-name``. ``output`` says what the command writes to the path the value names (such a
    path is checked like ``-o``)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "bounds": bounds,
            "open_low": open_low,
            "flag": flag,
            "metavar": metavar,
            "output": output,
        },
    )


@dataclass(frozen=True)
class Options:
    """Base of every method's options: checks each field against its type and bounds on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check(self, f.name, getattr(self, f.name), hints[f.name], f.metadata)
        self.check()

    def check(self) -> None:
        """Constraints between fields; a subclass overrides it."""

    @classmethod
    def declared(cls) -> Iterator[dataclasses.Field]:
        return iter(dataclasses.fields(cls))

    @classmethod
    def from_record(cls, values: dict) -> Options:
        """The options a model's record holds (``to_json``'s dict); keys of no field are left out, and a
        field the record lacks takes its default, so records of other versions still read."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def to_json(self) -> dict:
        return {
            f.name: os.fspath(v) if isinstance(v := getattr(self, f.name), os.PathLike) else v
            for f in dataclasses.fields(self)
        }


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    flag = f.metadata.get("flag")
    if flag:
        return (flag,) if isinstance(flag, str) else tuple(flag)
    dashed = f.name.replace("_", "-")
    return (f"--no-{dashed}" if f.default is True else f"--{dashed}",)


def kind_of(options: type[Options], f: dataclasses.Field) -> str:
    """What a command line gives for ``f``: "bool" (a switch), "list" (comma-separated names), "float",
    "str" (a path, or a value the option parses itself, such as a byte size) or "int"."""
    kinds, _ = _allowed(typing.get_type_hints(options)[f.name])
    for kind, types_ in (("bool", {bool}), ("list", {tuple}), ("float", {float}), ("str", {str, os.PathLike})):
        if kinds & types_:
            return kind
    return "int"


class Output(typing.NamedTuple):
    """A path an option names for the command to write."""

    option: str
    flag: str
    path: str | os.PathLike
    what: str  # what is written there

    @property
    def label(self) -> str:
        return f"{self.what} output ({self.flag})"


def outputs_of(options: Options) -> list[Output]:
    return [
        Output(f.name, flags_of(f)[0], getattr(options, f.name), f.metadata["output"])
        for f in dataclasses.fields(options)
        if f.metadata.get("output") and getattr(options, f.name) is not None
    ]


def _allowed(hint) -> tuple[set, bool]:
    """The value types a field's annotation admits (generic aliases by their origin), and whether None is one."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {typing.get_origin(a) or a for a in args if a is not type(None)}, type(None) in args


def _check(owner: Options, name: str, value, hint, metadata) -> None:
    kinds, optional = _allowed(hint)
    if value is None:
        if optional:
            return
        raise SpikecError(f"argument {name}=None: a value is required")
    where = ""
    if metadata.get("bounds") is not None:
        low, high = metadata["bounds"]
        where = f" in {'(' if metadata.get('open_low') else '['}{_number(low)}, {_number(high)}]"
    if bool in kinds:
        if not isinstance(value, (bool, np.bool_)):
            raise SpikecError(f"argument {name}={value!r}: expected true or false")
        return
    if tuple in kinds:
        if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise SpikecError(f"argument {name}={value!r}: expected a list of names")
        object.__setattr__(owner, name, tuple(value))
        return
    if isinstance(value, (str, os.PathLike)) and kinds & {str, os.PathLike}:
        if not os.fspath(value):
            raise SpikecError(f"argument {name}={value!r}: expected a non-empty value")
        return
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if float in kinds:
        if not numeric or not math.isfinite(float(value)):
            raise SpikecError(f"argument {name}={value!r}: expected a number{where}")
    elif int in kinds:
        if not numeric or not float(value).is_integer() or isinstance(value, (float, np.floating)):
            raise SpikecError(f"argument {name}={value!r}: expected an integer{where}")
    else:
        expected = " or ".join(sorted(k.__name__ for k in kinds))
        raise SpikecError(f"argument {name}={value!r}: expected {expected}")
    if metadata.get("bounds") is not None:
        low, high = metadata["bounds"]
        if (value <= low if metadata.get("open_low") else value < low) or value > high:
            raise SpikecError(
                f"argument {name}={value!r}: expected {'a number' if float in kinds else 'an integer'}{where}"
            )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
