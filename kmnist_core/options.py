"""Options defined once: a job's options are a frozen dataclass whose fields carry their CLI flag and help.

The CLI builds each flag from its field (`cli_option`), so defaults and help live in one place; a run
records its options and the arguments that repeat them (`option_args`), from which `status` prints the
command that finishes an interrupted run. Imports nothing heavy: the CLI reads these before torch loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, flag: str, help: str = "", *, repeat: bool = True, repeated_flag: bool = False,
           factory=None) -> Any:
    """A dataclass field with its CLI flag. `repeat`: a resume command carries it when not at its default
    (off for what a resume sets itself, such as --resume or --overwrite). `repeated_flag`: a list given
    as the flag once per value (--export alto), not comma-separated."""
    meta = {"flag": flag, "help": help, "repeat": repeat, "repeated_flag": repeated_flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields_by_name(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def cli_option(cls, name: str, **overrides):
    """The typer Option for field `name` of options class `cls`: its default, flag and help."""
    import typer

    f = fields_by_name(cls)[name]
    default = overrides.pop("default", default_of(f))
    if isinstance(default, (list, tuple)):
        default = None  # typer's list options; the options class turns None into its default
    return typer.Option(default, f.metadata["flag"], help=overrides.pop("help", f.metadata["help"]), **overrides)


def option_args(options: Any) -> list[str]:
    """CLI arguments that repeat `options` where they differ from the defaults (fields marked `repeat`)."""
    args: list[str] = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not f.metadata.get("repeat", False) or value is None or value == default_of(f):
            continue
        if isinstance(value, bool):
            args.append(f.metadata["flag"])
        elif isinstance(value, (list, tuple)) and f.metadata["repeated_flag"]:
            for v in value:
                args += [f.metadata["flag"], str(v)]
        elif isinstance(value, (list, tuple)):
            args += [f.metadata["flag"], ",".join(map(str, value))]
        else:
            args += [f.metadata["flag"], str(value)]
    return args
