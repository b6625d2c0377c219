"""The query ledger on PostgreSQL (psycopg 3, a connection pool): the tables and promises of the SQLite ledger,
shared by every `serve` replica pointed at the same database, so budgets, blocks and Idempotency-Keys hold across
them. A batch whose commit loses its connection is looked up by its transaction id before any client is answered.
Reads and writes the database named by a `postgresql://` URL; tables: artifacts/README.md (`ledger.sqlite`).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Optional, Sequence

import numpy as np

from models.params import UserError
from stages.serving.ledger import (
    DURABILITY,
    MARK_COLUMNS,
    MARK_INSERT,
    QUERY_COLUMNS,
    SCHEMA,
    Answered,
    Debit,
    Ledger,
    LedgerUnavailable,
    Mark,
)

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (
    name TEXT PRIMARY KEY, spent BIGINT NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'ok');
CREATE TABLE IF NOT EXISTS queries (
    id BIGSERIAL PRIMARY KEY, principal TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, images INTEGER NOT NULL,
    input_sha256 TEXT NOT NULL, request_id TEXT, max_prob_mean DOUBLE PRECISION NOT NULL,
    max_prob_min DOUBLE PRECISION NOT NULL, entropy_mean DOUBLE PRECISION NOT NULL, ood_images INTEGER NOT NULL,
    classes INTEGER NOT NULL, answers BYTEA NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS queries_request ON queries (principal, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS queries_principal_time ON queries (principal, time);
CREATE TABLE IF NOT EXISTS alerts (
    id BIGSERIAL PRIMARY KEY, principal TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, signal TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL, threshold DOUBLE PRECISION NOT NULL, queries BIGINT NOT NULL,
    action TEXT NOT NULL, details TEXT NOT NULL);
"""
# the watermark's evidence: the SQLite ledger's `watermark` table, made on first use in the same shape
WATERMARK_TABLE = """
CREATE TABLE IF NOT EXISTS watermark (
    id BIGSERIAL PRIMARY KEY, principal TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, marked INTEGER NOT NULL,
    keyed_class INTEGER NOT NULL, confidence DOUBLE PRECISION NOT NULL, classes INTEGER NOT NULL, shape TEXT NOT NULL,
    image BYTEA NOT NULL, fingerprint TEXT NOT NULL, mode TEXT NOT NULL, cell INTEGER NOT NULL, levels INTEGER NOT NULL,
    rate DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS watermark_principal ON watermark (principal, marked);
"""
SCHEMA_LOCK = 0x1E17_1ED6  # advisory lock: replicas starting together create the tables one at a time

# The debit is the reservation, made in the database whichever replica runs it: the batch's principals are locked
# in name order (so two replicas' transactions cannot deadlock), each request is admitted in turn if it fits what
# the locked rows say, and one conditional UPDATE debits the admitted images (`spent + n <= budget` re-checked in
# SQL), committed with the rows. Five round trips per batch, whatever its size: lock, debit, insert, commit (one
# more with watermark evidence). The debit also returns the transaction's id, by which a commit whose
# connection broke is looked up (RESOLVE).
LOCK = "SELECT name, spent, state FROM principals WHERE name = ANY(%s) ORDER BY name FOR UPDATE"
DEBIT = (
    "UPDATE principals AS p SET spent = p.spent + d.n FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
    "AS d(name, n, budget) WHERE p.name = d.name AND p.spent + d.n <= d.budget AND p.state <> 'blocked' "
    "RETURNING p.name, p.spent, p.state, pg_current_xact_id()::text"
)
# PostgreSQL's own answer to "did my COMMIT happen?" after a lost connection (PostgreSQL 13 or later): committed,
# aborted (a transaction in flight when its connection or the server died is rolled back), or still in progress
# (its server process has not yet seen the connection go); looked up for up to RESOLVE_SECONDS, on fresh connections.
RESOLVE = "SELECT pg_xact_status(%s::xid8)"
RESOLVE_SECONDS = 5.0
INSERT = (
    f"INSERT INTO queries ({QUERY_COLUMNS}) VALUES {{}} "
    "ON CONFLICT (principal, request_id) WHERE request_id IS NOT NULL DO NOTHING RETURNING principal, request_id"
)
CREDIT = "UPDATE principals SET spent = spent - %s WHERE name = %s RETURNING spent, state"


def where(url: str) -> str:
    """The database a URL names, for messages: host or socket folder, port and database, never a password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # an unparsable URL: say only its scheme
        return url.split(":", 1)[0] + "://..."
    database, host, port = info.get("dbname", "?"), info.get("host", "localhost"), info.get("port", 5432)
    return f"postgresql database {database} on {host}:{port}"


class PostgresLedger(Ledger):
    """A small pool of connections: the batch worker's transactions, the monitor's alerts, the event loop's replays."""

    def __init__(self, url: str, connect_timeout: float = 5.0, durability: str = "full", read_only: bool = False):
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise UserError("--ledger postgresql://... needs psycopg 3: pip install 'ini-toolkit[postgres]'") from None
        if durability not in DURABILITY:
            raise UserError(f"--durability {durability}: one of {', '.join(DURABILITY)}")
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self.name = where(url)
        settings = {"full": "on", "process": "off"}[durability]
        options = f"-c synchronous_commit={settings}" + (" -c default_transaction_read_only=on" if read_only else "")
        try:
            psycopg.connect(url, connect_timeout=max(1, round(connect_timeout))).close()  # says why, where a pool
        except psycopg.ProgrammingError as e:  # would only time out
            raise UserError(f"--ledger: not a PostgreSQL URL ({_reason(e)})") from None
        except psycopg.Error as e:
            raise UserError(f"{self.name}: cannot connect ({_reason(e)})") from None
        self._pool = ConnectionPool(
            url,
            min_size=1 if read_only else 2,
            max_size=4,
            kwargs={
                "application_name": "ini-serve",
                "connect_timeout": max(1, round(connect_timeout)),
                "options": options,
            },
            timeout=1.0,  # a request waits this long for a connection (the database gone), then gets 503
            # the pool retries a lost connection with doubling delays; giving up after 5 s lets the next request
            # that finds no connection open a fresh one at once, instead of waiting out a delay grown during an outage
            reconnect_timeout=5.0,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except Exception as e:
            self._pool.close()
            raise UserError(f"{self.name}: cannot connect ({_reason(e)})") from None
        row = ("missing",)
        try:
            with self._pool.connection() as db, db.transaction():
                if db.info.server_version < 130000:
                    raise UserError(f"{self.name}: PostgreSQL {db.info.server_version // 10000}; the ledger needs 13+")
                if read_only:
                    if db.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
                        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() or row
                    raise _Checked
                db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                db.execute(TABLES)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('schema', %s)", (SCHEMA,))
                # a table of ours that CREATE ... IF NOT EXISTS left in another shape fails here, not mid-request
                db.execute(f"SELECT {QUERY_COLUMNS} FROM queries LIMIT 0")
                db.execute("SELECT name, spent, state FROM principals LIMIT 0")
        except _Checked:
            pass
        except psycopg.Error as e:
            self._pool.close()
            raise UserError(f"{self.name}: not a usable ledger ({_reason(e)})") from None
        except UserError:
            self._pool.close()
            raise
        if row is not None and row[0] != SCHEMA:
            self._pool.close()
            raise UserError(f"{self.name}: ledger schema {row[0]}, this tool reads {SCHEMA}")
        self._marks_ready = False

    @contextlib.contextmanager
    def _connection(self):
        """A pooled connection checked with one empty round trip. A stale one (the database restarted) goes back
        to the pool, which replaces it, and the next is tried at once: the pool's own check sleeps a second first."""
        for _ in range(self._pool.max_size + 1):
            db = self._pool.getconn()
            try:
                self._pool.check_connection(db)
            except self._errors:
                self._pool.putconn(db)
                continue
            try:
                with db:
                    yield db
            finally:
                self._pool.putconn(db)
            return
        raise LedgerUnavailable(f"{self.name}: no working connection")

    def close(self) -> None:
        self._pool.close()

    def enrol(self, names: list[str]) -> dict[str, tuple[int, str]]:
        with self._unavailable(), self._connection() as db, db.transaction():
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO principals (name) VALUES (%s) ON CONFLICT DO NOTHING", [(n,) for n in sorted(names)]
                )
            rows = db.execute("SELECT name, spent, state FROM principals").fetchall()
        return {name: (int(spent), str(state)) for name, spent, state in rows}

    def record(self, batch: list[Answered], marks: Sequence[Mark] = ()) -> list[Debit]:
        if marks and not self._marks_ready:
            self._prepare_marks()
        attempt = _Attempt()
        try:
            with self._unavailable(), self._connection() as db, db.transaction():
                self._record(db, batch, marks, attempt)
        except LedgerUnavailable as e:
            if attempt.xid is None:  # nothing was debited: the transaction never reached its debit
                raise
            status = self._resolve(attempt.xid)
            if status == "committed":
                return attempt.debits
            if status == "aborted":
                raise LedgerUnavailable(f"{e}; the batch was not recorded") from e
            raise LedgerUnavailable(f"{e}; whether the batch was recorded is unknown", uncertain=True) from e
        return attempt.debits

    def _record(self, db, batch: list[Answered], marks: Sequence[Mark], attempt: "_Attempt") -> None:
        rows = [a.row() for a in batch]
        names = sorted({a.principal for a in batch})
        standing = {name: [int(spent), str(state)] for name, spent, state in db.execute(LOCK, (names,))}
        budgets, admitted, refused = {}, {}, {}
        for i, a in enumerate(batch):
            spent, state = standing[a.principal]
            n = rows[i][2]
            if state == "blocked" or spent + admitted.get(a.principal, 0) + n > a.budget:
                refused[i] = "blocked" if state == "blocked" else "budget"
                continue
            admitted[a.principal] = admitted.get(a.principal, 0) + n
            budgets[a.principal] = a.budget
        debited = {}
        if admitted:
            debit = [list(admitted), list(admitted.values()), [budgets[p] for p in admitted]]
            for name, sp, st, xid in db.execute(DEBIT, debit):
                debited[name] = [int(sp), str(st)]
                attempt.xid = xid
            if debited.keys() != admitted.keys():  # the rows are locked: this cannot happen
                raise RuntimeError(f"ledger debit refused for {sorted(set(admitted) - set(debited))}")
        keep = [i for i in range(len(batch)) if i not in refused]
        inserted = set()
        if keep:
            values = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(keep))
            params = [v for i in keep for v in rows[i]]
            inserted = {(p, r) for p, r in db.execute(INSERT.format(values), params)}
        for i in keep:
            a = batch[i]
            if a.request_id is not None and (a.principal, a.request_id) not in inserted:
                # another replica answered this Idempotency-Key meanwhile: no second debit
                spent, state = db.execute(CREDIT, (rows[i][2], a.principal)).fetchone()
                debited[a.principal] = [int(spent), str(state)]
                refused[i] = "duplicate"
        kept = [m.row(batch[m.request].time) for m in marks if m.request not in refused]
        if kept:
            values = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(kept))
            db.execute(MARK_INSERT + values, [v for row in kept for v in row])
        final = {**standing, **debited}  # every principal's standing once the transaction commits
        attempt.debits = [Debit(refused.get(i), *final[a.principal]) for i, a in enumerate(batch)]

    def _resolve(self, xid: str) -> Optional[str]:
        """'committed' or 'aborted', as the database tells on a fresh connection; None when it cannot tell within
        RESOLVE_SECONDS (the database unreachable, or the transaction still in progress)."""
        deadline = time.monotonic() + RESOLVE_SECONDS
        while time.monotonic() < deadline:
            try:
                with self._unavailable(), self._connection() as db:
                    status = db.execute(RESOLVE, (xid,)).fetchone()[0]
            except LedgerUnavailable:
                time.sleep(0.2)
                continue
            if status in ("committed", "aborted"):
                return status
            if status is None:  # too old to be known: cannot happen seconds after the commit
                return None
            time.sleep(0.02)  # in progress: its server process is finishing it
        return None

    def standing(self, principal: str) -> tuple[int, str]:
        with self._unavailable(), self._connection() as db:
            spent, state = db.execute("SELECT spent, state FROM principals WHERE name = %s", (principal,)).fetchone()
        return int(spent), str(state)

    def replay(self, principal: str, request_id: str) -> Optional[tuple[str, np.ndarray]]:
        with self._unavailable(), self._connection() as db:
            row = db.execute(
                "SELECT input_sha256, images, classes, answers FROM queries WHERE principal = %s AND request_id = %s",
                (principal, request_id),
            ).fetchone()
        if row is None:
            return None
        sha, n, k, blob = row
        return sha, np.frombuffer(bytes(blob), dtype=np.float32).reshape(n, k)

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
        with self._unavailable(), self._connection() as db, db.transaction():
            db.execute(
                "INSERT INTO alerts (principal, time, signal, value, threshold, queries, action, details) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (principal, time, signal, value, threshold, queries, action, json.dumps(details, sort_keys=True)),
            )
            if state is not None:  # a block stays a block, whichever replica throttles later
                db.execute(
                    "UPDATE principals SET state = %s WHERE name = %s AND state <> 'blocked'", (state, principal)
                )

    def recent_answers(self, principal: str, images: int) -> list[tuple[float, np.ndarray]]:
        out, held = [], 0
        with self._unavailable(), self._connection() as db:
            cursor = db.execute(
                "SELECT time, images, classes, answers FROM queries WHERE principal = %s ORDER BY id DESC", (principal,)
            )
            for t, n, k, blob in cursor:
                if held >= images:
                    break
                out.append((float(t), np.frombuffer(bytes(blob), dtype=np.float32).reshape(n, k)))
                held += n
        return out[::-1]

    def answers_since(self, since: float) -> list[tuple[str, float, np.ndarray]]:
        with self._unavailable(), self._connection() as db:
            rows = db.execute(
                "SELECT principal, time, images, classes, answers FROM queries WHERE time >= %s ORDER BY id", (since,)
            ).fetchall()
        return [(str(p), float(t), np.frombuffer(bytes(b), dtype=np.float32).reshape(n, k)) for p, t, n, k, b in rows]

    def _prepare_marks(self) -> None:
        with self._unavailable(), self._connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            db.execute(WATERMARK_TABLE)
        self._marks_ready = True

    def marks(self, principal: Optional[str]) -> Optional[list[tuple]]:
        where, args = ("WHERE principal = %s", (principal,)) if principal is not None else ("", ())
        with self._unavailable(), self._connection() as db:
            if db.execute("SELECT to_regclass('watermark')").fetchone()[0] is None:
                return None
            rows = db.execute(f"SELECT {MARK_COLUMNS} FROM watermark {where} ORDER BY id", args).fetchall()
        return [(*r[:4], bytes(r[4]), *r[5:]) for r in rows]

    def meta(self) -> dict[str, str]:
        with self._unavailable(), self._connection() as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())

    def put_meta(self, values: dict[str, object]) -> None:
        with self._unavailable(), self._connection() as db, db.transaction(), db.cursor() as cur:
            cur.executemany(
                "INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v, default=str)) for k, v in values.items()],
            )

    def _unavailable(self):
        return _Translate(self._errors, self.name)


class _Checked(Exception):
    """A read-only ledger's check is done: leave its transaction."""


class _Attempt:
    """What one `record` got to: the transaction's id once it debited, and the debits it would commit."""

    def __init__(self):
        self.xid: Optional[str] = None
        self.debits: list[Debit] = []


class _Translate:
    """Connection-level failures (the server gone, a broken socket, no connection within the pool's timeout)
    become LedgerUnavailable; errors in the SQL itself stay what they are."""

    def __init__(self, errors: tuple, name: str):
        from psycopg_pool import PoolTimeout

        self.errors, self.name = (*errors, PoolTimeout), name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if error is not None and isinstance(error, self.errors):
            raise LedgerUnavailable(f"{self.name}: {_reason(error)}") from error
        return False


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(e).__name__
