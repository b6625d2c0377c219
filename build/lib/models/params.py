"""What `models/` and `stages/` both build on: the error a user's bad input raises, and the `KEY=VALUE`
parameters registry entries declare (`--defense-param`, `--attack-param`), checked against their spec."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 1, no traceback."""


class Param(NamedTuple):
    """One parameter: default, allowed closed range, int or float, help."""

    default: float
    low: float
    high: float
    integer: bool
    help: str


def describe(registry: dict, details: bool = False) -> str:
    """`name (key=default, ...)` for every entry whose class has `PARAMS`: the --help text of the flag; with
    `details`, `name: key=default (help) / ...`, entries apart by ` | `."""
    parts = []
    for name, cls in registry.items():
        if details:
            keys = " / ".join(f"{k}={p.default:g} ({p.help})" for k, p in cls.PARAMS.items())
            parts.append(f"{name}: {keys}" if keys else name)
            continue
        keys = ", ".join(f"{k}={p.default:g}" for k, p in cls.PARAMS.items())
        parts.append(f"{name} ({keys})" if keys else name)
    return (" | " if details else "; ").join(parts)


def defaults(specs: dict[str, Param]) -> dict[str, float | int]:
    """Every parameter at its default, as int or float."""
    return {k: (int(p.default) if p.integer else float(p.default)) for k, p in specs.items()}


def parse(owner: str, flag: str, specs: dict[str, Param], pairs: Optional[Sequence[str]]) -> dict[str, float | int]:
    """Every parameter in `specs`, the user's values checked (known key, number, integer, in range), the rest
    defaulted."""
    values = defaults(specs)
    seen = set()
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"{flag} {pair!r}: expected KEY=VALUE")
        if key not in specs:
            raise UserError(f"{owner} has no parameter {key!r} (its parameters: {', '.join(specs) or 'none'})")
        if key in seen:
            raise UserError(f"{flag} {key} given twice")
        seen.add(key)
        spec = specs[key]
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{flag} {key}={text}: not a number") from None
        if not (spec.low <= value <= spec.high):  # also rejects nan
            raise UserError(f"{flag} {key}={text}: must be in [{spec.low:g}, {spec.high:g}]")
        if spec.integer and value != int(value):
            raise UserError(f"{flag} {key}={text}: must be an integer")
        values[key] = int(value) if spec.integer else value
    return values
