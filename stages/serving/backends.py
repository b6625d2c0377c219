"""The ledger a `--ledger` (or `--evidence`) value names: a postgresql:// URL (stages/serving/ledger_pg.py, loaded
only then: psycopg is an optional dependency) or a SQLite file (stages/serving/ledger.py)."""

from __future__ import annotations

from pathlib import Path

from stages.serving.ledger import POSTGRES, Ledger, SqliteLedger


def open_ledger(where: str | Path, durability: str = "full", read_only: bool = False) -> Ledger:
    if str(where).startswith(POSTGRES):
        from stages.serving.ledger_pg import PostgresLedger

        return PostgresLedger(str(where), durability=durability, read_only=read_only)
    return SqliteLedger(Path(where), durability=durability, read_only=read_only)
