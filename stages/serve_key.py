"""Add a principal to `serve`'s keys file: its budget, rate limit and action on an extraction alert, and the
argon2id hash of a new API key. Prints the key on stdout, the one time it exists in clear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from models.params import UserError
from stages.serving import keys as principals_file


def run(
    name: Annotated[str, typer.Argument(help="The principal: letters, digits, '_', '.' or '-' (at most 64).")],
    keys: Annotated[Path, typer.Option(help="Keys file (TOML), created if missing.")] = Path("keys.toml"),
    budget: Annotated[
        int,
        typer.Option(
            min=0,
            help="Images the key may be answered over its lifetime; set it below the queries a thief needs "
            "(evaluate's queries to 50% of benign accuracy).",
        ),
    ] = 10_000,
    rate: Annotated[float, typer.Option(min=0.001, help="Images per second (token bucket refill).")] = 50.0,
    burst: Annotated[
        Optional[float], typer.Option(min=1.0, help="Token bucket size in images [default: rate].")
    ] = None,
    action: Annotated[
        Literal["log", "throttle", "block"],
        typer.Option(help="On an extraction alert: log it, throttle the key's rate, or block the key."),
    ] = "log",
    prior: Annotated[
        Optional[str],
        typer.Option(
            help="Declared share of each class in this key's traffic, comma-separated (a client that mostly sends a "
            "few classes); its class-histogram alert tests against it instead of the benign prior."
        ),
    ] = None,
) -> str:
    """Create a principal and print its API key once."""
    shares = None
    if prior is not None:
        try:
            shares = tuple(float(v) for v in prior.split(","))
        except ValueError:
            raise UserError(f"--prior {prior!r}: give comma-separated numbers, one per class") from None
    return principals_file.add(keys, name, budget, rate, burst, action, shares)
