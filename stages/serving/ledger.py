"""The query ledger: one row per answered request, budget counters and alerts. The interface every backend keeps,
and the embedded one: SQLite in WAL mode, one serving process per file (ledger_pg holds PostgreSQL, for replicas).

A batch of answers is recorded in one transaction that debits each request's images from its principal (only if
they fit: `spent + n <= budget`, so the database itself refuses an overspend), inserts its row and the watermark
evidence of the requests it recorded; the answers leave the server only after that transaction commits. So no
image is answered without being counted, a retried request (same Idempotency-Key) is answered from its row, never
counted twice, and evidence exists only for answers that were counted. How far a commit has gone before the
answer leaves is the durability level (DURABILITY; docs/serving.md, "Durability"). Tables: artifacts/README.md
(`ledger.sqlite`). The `watermark` table (marked answers and their controls, the evidence `verify` reads) is
created by the first batch `serve --watermark-key` marks.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from models.params import UserError

SCHEMA = "ledger/1"
# What a commit has reached when `record` returns, and so when the answers leave: "full", the disk (SQLite
# synchronous=FULL, PostgreSQL synchronous_commit=on); "process", the operating system or the database server
# (SQLite synchronous=NORMAL in WAL mode, PostgreSQL synchronous_commit=off): a kill -9 of the serving process
# loses nothing, a crash of the machine (SQLite) or of the database server (PostgreSQL) can lose the last commits.
DURABILITY = ("full", "process")
SQLITE_SYNCHRONOUS = {"full": "FULL", "process": "NORMAL"}
TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (
    name TEXT PRIMARY KEY, spent INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'ok');
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL, time REAL NOT NULL, images INTEGER NOT NULL,
    input_sha256 TEXT NOT NULL, request_id TEXT, max_prob_mean REAL NOT NULL, max_prob_min REAL NOT NULL,
    entropy_mean REAL NOT NULL, ood_images INTEGER NOT NULL, classes INTEGER NOT NULL, answers BLOB NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS queries_request ON queries (principal, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS queries_principal_time ON queries (principal, time);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL, time REAL NOT NULL, signal TEXT NOT NULL,
    value REAL NOT NULL, threshold REAL NOT NULL, queries INTEGER NOT NULL, action TEXT NOT NULL,
    details TEXT NOT NULL);
"""


QUERY_COLUMNS = (
    "principal, time, images, input_sha256, request_id, max_prob_mean, max_prob_min, entropy_mean, ood_images, "
    "classes, answers"
)


@dataclass
class Answered:
    """One answered request, as recorded."""

    principal: str
    time: float
    input_sha256: str
    request_id: Optional[str]
    answers: np.ndarray  # float32 (N, K), what the client receives
    ood_images: int  # answers whose OOD score crossed the calibrated threshold
    budget: int = 2**62  # the principal's lifetime budget: the debit is refused beyond it
    summary: Optional[tuple[float, float, float]] = None  # from `summarise`, else computed by `row`

    def row(self) -> tuple:
        """The `queries` row, in the order of QUERY_COLUMNS."""
        p = self.answers.astype(np.float32, copy=False)
        top_mean, top_min, entropy_mean = self.summary or summarise(p, [len(p)])[0]
        return (
            self.principal,
            self.time,
            len(p),
            self.input_sha256,
            self.request_id,
            top_mean,
            top_min,
            entropy_mean,
            int(self.ood_images),
            p.shape[1],
            p.tobytes(),
        )


def summarise(answers: np.ndarray, counts: list[int]) -> list[tuple[float, float, float]]:
    """Each request's mean and least top probability and mean entropy, for a batch's answers and its requests'
    image counts (in order): a few array operations per batch instead of per request (at batch 1, 0.022 ms of the
    ledger's 0.045 ms per request were these, request by request)."""
    p = answers.astype(np.float32, copy=False)
    top = p.max(1)
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
    starts = np.cumsum([0, *counts[:-1]])
    n = np.asarray(counts, dtype=np.float64)
    means = np.add.reduceat(top.astype(np.float64), starts) / n
    lows = np.minimum.reduceat(top, starts)
    entropies = np.add.reduceat(entropy.astype(np.float64), starts) / n
    return [(float(a), float(b), float(c)) for a, b, c in zip(means, lows, entropies, strict=True)]


@dataclass(frozen=True)
class Debit:
    """What the ledger did with one answered request, and its principal's standing after the transaction, read
    from the row the debit updated (so it counts what every replica spent)."""

    refused: Optional[str]  # None: recorded and debited; else "budget", "blocked" or "duplicate" (key in flight)
    spent: int
    state: str


class LedgerUnavailable(Exception):
    """The database cannot be reached, or the connection broke and the batch did not commit (or whether it did could
    not be checked: `uncertain`); its clients get 503 and retry. With their Idempotency-Key a batch that did commit
    is replayed, never debited twice."""

    def __init__(self, message: str, uncertain: bool = False):
        super().__init__(message)
        self.uncertain = uncertain


class Ledger(ABC):
    """A ledger backend. Its promise is `record`: one transaction per batch, committed before any answer leaves."""

    @abstractmethod
    def enrol(self, names: list[str]) -> dict[str, tuple[int, str]]:
        """Make sure every principal has a row; return each one's (spent, state), as left by any earlier run."""

    name: str  # the database, for messages and provenance (never a password)

    @abstractmethod
    def record(self, batch: list[Answered], marks: Sequence["Mark"] = ()) -> list[Debit]:
        """Debit and insert each request of the batch that fits its principal's budget, and the watermark evidence
        of those requests (`Mark.request`: the index in `batch`), in one transaction."""

    @abstractmethod
    def standing(self, principal: str) -> tuple[int, str]:
        """The principal's (spent, state) as the database holds it now."""

    @abstractmethod
    def replay(self, principal: str, request_id: str) -> Optional[tuple[str, np.ndarray]]:
        """The input hash and answers of an earlier request with this Idempotency-Key, if it was answered."""

    @abstractmethod
    def alert(
        self,
        principal: str,
        time: float,
        signal: str,
        value: float,
        threshold: float,
        queries: int,
        action: str,
        details: dict,
        state: Optional[str],
    ) -> None:
        """Store an alert and, in the same transaction, the principal's new state (throttled, blocked)."""

    @abstractmethod
    def recent_answers(self, principal: str, images: int) -> list[tuple[float, np.ndarray]]:
        """The principal's last requests holding at least `images` answers (or all of them), oldest first: what the
        monitor's windows are refilled from after a restart."""

    @abstractmethod
    def answers_since(self, since: float) -> list[tuple[str, float, np.ndarray]]:
        """Every request answered at or after `since` (seconds since the epoch), oldest first."""

    @abstractmethod
    def marks(self, principal: Optional[str]) -> Optional[list[tuple]]:
        """The watermark evidence, oldest first, as MARK_COLUMNS (one principal's, or all); None without a
        `watermark` table."""

    @abstractmethod
    def put_meta(self, values: dict[str, object]) -> None:
        """Values (JSON) under their keys in `meta`, replacing earlier ones."""

    @abstractmethod
    def meta(self) -> dict[str, str]:
        """Every `meta` value, as stored."""

    @abstractmethod
    def close(self) -> None: ...


WATERMARK_TABLE = """
CREATE TABLE IF NOT EXISTS watermark (
    id INTEGER PRIMARY KEY AUTOINCREMENT, principal TEXT NOT NULL, time REAL NOT NULL, marked INTEGER NOT NULL,
    keyed_class INTEGER NOT NULL, confidence REAL NOT NULL, classes INTEGER NOT NULL, shape TEXT NOT NULL,
    image BLOB NOT NULL, fingerprint TEXT NOT NULL, mode TEXT NOT NULL, cell INTEGER NOT NULL, levels INTEGER NOT NULL,
    rate REAL NOT NULL);
CREATE INDEX IF NOT EXISTS watermark_principal ON watermark (principal, marked);
"""


# what `verify` reads from the `watermark` table, in this order
MARK_COLUMNS = "marked, keyed_class, confidence, shape, image, classes, fingerprint, mode, cell, levels, rate"
MARK_INSERT = (
    "INSERT INTO watermark (principal, time, marked, keyed_class, confidence, classes, shape, image, fingerprint, "
    "mode, cell, levels, rate) VALUES "
)


@dataclass
class Mark:
    """One answer kept as watermark evidence: marked, or an unmarked control of the same principal."""

    request: int  # the index of its request in the batch: stored only if that request is recorded
    principal: str
    marked: bool
    keyed_class: int  # the class the mark points to (for a control: would have pointed to)
    confidence: float  # the victim's top probability before marking
    classes: int
    image: np.ndarray  # uint8 (C, H, W), as queried
    fingerprint: str  # of the key; never the key
    mode: str
    cell: int
    levels: int
    rate: float

    def row(self, time: float) -> tuple:
        """The `watermark` row, in its columns' order (principal ... rate)."""
        return (
            self.principal,
            time,
            int(self.marked),
            self.keyed_class,
            self.confidence,
            self.classes,
            ",".join(str(v) for v in self.image.shape),
            self.image.astype(np.uint8).tobytes(),
            self.fingerprint,
            self.mode,
            self.cell,
            self.levels,
            self.rate,
        )


POSTGRES = ("postgresql://", "postgres://")


def _connect(path: Path, durability: str, read_only: bool) -> sqlite3.Connection:
    target = f"file:{path}?mode=ro" if read_only else str(path)
    db = sqlite3.connect(target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=read_only)
    if not read_only:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS[durability]}")
    return db


class SqliteLedger(Ledger):
    """One writer connection behind a lock (the batch worker and the monitor write), one reader for the event loop.
    `read_only`: the reader only (`verify` reads evidence from a ledger a server may still be writing)."""

    def __init__(self, path: Path, durability: str = "full", read_only: bool = False):
        path = Path(path)
        if durability not in DURABILITY:
            raise UserError(f"--durability {durability}: one of {', '.join(DURABILITY)}")
        if read_only and not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = _connect(path, durability, read_only)
                self._db.executescript(TABLES)
            self._reader = _connect(path, durability, read_only)
            schema = self._reader.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{path}: not a usable ledger ({e})") from None
        if schema is None and not read_only:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
        elif schema is None or schema[0] != SCHEMA:
            raise UserError(f"{path}: ledger schema {schema[0] if schema else 'missing'}, this tool reads {SCHEMA}")
        self._lock = threading.Lock()
        self._marks_ready = False
        self.path, self.name = path, str(path)

    def close(self) -> None:
        if hasattr(self, "_db"):
            with self._lock:
                self._db.close()
        self._reader.close()

    def enrol(self, names: list[str]) -> dict[str, tuple[int, str]]:
        with self._lock:
            self._db.executemany(
                "INSERT INTO principals (name) VALUES (?) ON CONFLICT DO NOTHING", [(n,) for n in names]
            )
            rows = self._db.execute("SELECT name, spent, state FROM principals").fetchall()
        return {name: (int(spent), str(state)) for name, spent, state in rows}

    def record(self, batch: list[Answered], marks: Sequence[Mark] = ()) -> list[Debit]:
        rows, debits = [a.row() for a in batch], []
        with self._lock:
            if marks and not self._marks_ready:
                self._db.executescript(WATERMARK_TABLE)  # outside the transaction: executescript commits first
                self._marks_ready = True
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for a, row in zip(batch, rows, strict=True):
                    n = row[2]
                    standing = self._db.execute(
                        "UPDATE principals SET spent = spent + ? WHERE name = ? AND spent + ? <= ? "
                        "AND state <> 'blocked' RETURNING spent, state",
                        (n, a.principal, n, a.budget),
                    ).fetchone()
                    if standing is None:
                        spent, state = self._db.execute(
                            "SELECT spent, state FROM principals WHERE name = ?", (a.principal,)
                        ).fetchone()
                        debits.append(Debit("blocked" if state == "blocked" else "budget", int(spent), str(state)))
                        continue
                    self._db.execute(f"INSERT INTO queries ({QUERY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                    debits.append(Debit(None, int(standing[0]), str(standing[1])))
                kept = [m.row(batch[m.request].time) for m in marks if debits[m.request].refused is None]
                if kept:
                    self._db.executemany(MARK_INSERT + "(?,?,?,?,?,?,?,?,?,?,?,?,?)", kept)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return debits

    def standing(self, principal: str) -> tuple[int, str]:
        spent, state = self._reader.execute(
            "SELECT spent, state FROM principals WHERE name = ?", (principal,)
        ).fetchone()
        return int(spent), str(state)

    def replay(self, principal: str, request_id: str) -> Optional[tuple[str, np.ndarray]]:
        row = self._reader.execute(
            "SELECT input_sha256, images, classes, answers FROM queries WHERE principal = ? AND request_id = ?",
            (principal, request_id),
        ).fetchone()
        if row is None:
            return None
        sha, n, k, blob = row
        return sha, np.frombuffer(blob, dtype=np.float32).reshape(n, k)

    def alert(
        self,
        principal: str,
        time: float,
        signal: str,
        value: float,
        threshold: float,
        queries: int,
        action: str,
        details: dict,
        state: Optional[str],
    ) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO alerts (principal, time, signal, value, threshold, queries, action, details) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (principal, time, signal, value, threshold, queries, action, json.dumps(details, sort_keys=True)),
            )
            if state is not None:
                self._db.execute("UPDATE principals SET state = ? WHERE name = ?", (state, principal))
            self._db.execute("COMMIT")

    def recent_answers(self, principal: str, images: int) -> list[tuple[float, np.ndarray]]:
        """The principal's last requests holding at least `images` answers (or all of them), oldest first: what the
        monitor's windows are refilled from after a restart."""
        out, held = [], 0
        for t, n, k, blob in self._reader.execute(
            "SELECT time, images, classes, answers FROM queries WHERE principal = ? ORDER BY id DESC", (principal,)
        ):
            if held >= images:
                break
            out.append((float(t), np.frombuffer(blob, dtype=np.float32).reshape(n, k)))
            held += n
        return out[::-1]

    def answers_since(self, since: float) -> list[tuple[str, float, np.ndarray]]:
        """Every request answered at or after `since` (seconds since the epoch), oldest first."""
        rows = self._reader.execute(
            "SELECT principal, time, images, classes, answers FROM queries WHERE time >= ? ORDER BY id", (since,)
        )
        return [(str(p), float(t), np.frombuffer(b, dtype=np.float32).reshape(n, k)) for p, t, n, k, b in rows]

    def put_meta(self, values: dict[str, object]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v, default=str)) for k, v in values.items()],
            )

    def meta(self) -> dict[str, str]:
        return dict(self._reader.execute("SELECT key, value FROM meta").fetchall())

    def marks(self, principal: Optional[str]) -> Optional[list[tuple]]:
        if not self._reader.execute("SELECT name FROM sqlite_master WHERE name = 'watermark'").fetchone():
            return None
        where, args = ("WHERE principal = ?", (principal,)) if principal is not None else ("", ())
        return self._reader.execute(f"SELECT {MARK_COLUMNS} FROM watermark {where} ORDER BY id", args).fetchall()
