"""`serve --ledger postgresql://...` with two replicas on one throwaway PostgreSQL server (initdb + pg_ctl on a Unix
socket in a temp folder): budgets exact under racing clients, Idempotency-Keys replayed across replicas, a kill -9
of one replica losing nothing answered, the database going away mid-request, a commit whose connection breaks
looked up before the answer, budgets remaining read from the ledger, and databases refused at start.
Skipped, with the reason, where no PostgreSQL server or psycopg is installed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import assert_one_line_error, invoke
from served import burst_then_kill, served_world
from test_serve import NPY, Server, npy

from stages.serving.launch import launch

ROOT = Path(__file__).resolve().parents[1]

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 not installed: pip install 'ini-toolkit[postgres]'")

PRINCIPALS = {  # name: budget, rate, burst, action
    "racer": (240, 10_000.0, 10_000.0, "log"),
    "twice": (100_000, 10_000.0, 10_000.0, "log"),
    "steady": (100_000, 10_000.0, 10_000.0, "log"),
    "crash": (100_000, 10_000.0, 10_000.0, "log"),
    "thief": (100_000, 10_000.0, 10_000.0, "block"),
    "shared": (1_000, 10_000.0, 10_000.0, "log"),
}


class Replica(Server):
    """One `serve` process on the shared ledger; its stderr kept beside the test's files."""

    def __init__(self, world: dict, url: str, name: str, *flags: str):
        self.stderr = open(world["root"] / f"{name}.stderr", "w+")
        alerts = world["root"] / f"{name}.alerts.jsonl"
        try:
            self.proc, self.url = launch(
                world["victim"], world["keys"], url, "--alerts", alerts, *flags, stderr=self.stderr, timeout=60
            )
        except RuntimeError as e:
            self.stderr.seek(0)
            raise AssertionError(f"{e} {self.stderr.read()[-2000:]}") from None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return served_world(tmp_path_factory.mktemp("serve-pg"), PRINCIPALS)


@pytest.fixture(scope="module")
def replicas(world, pg):
    url = pg.create("ledger")
    pair = [Replica(world, url, f"replica{i}") for i in (0, 1)]
    yield url, pair
    for s in pair:
        s.stop()


def spent(url: str, name: str) -> tuple[int, int, int]:
    """(spent counter, sum of the principal's rows' images, its rows), read by a connection of the test's own."""
    with psycopg.connect(url) as db:
        counter = db.execute("SELECT spent FROM principals WHERE name = %s", (name,)).fetchone()[0]
        images, rows = db.execute(
            "SELECT COALESCE(SUM(images), 0), COUNT(*) FROM queries WHERE principal = %s", (name,)
        ).fetchone()
    return int(counter), int(images), int(rows)


def resend(c: httpx.Client, images: np.ndarray, request_id: str) -> int:
    """What a client does with a request that broke or got 503: send it again with its key, after Retry-After;
    the images answered."""
    for _ in range(30):  # bounded: a pool reconnects to a database back from a restart within seconds
        r = c.post("/v1/predict", content=npy(images), headers={"Content-Type": NPY, "Idempotency-Key": request_id})
        if r.status_code == 200:
            return len(r.json()["answers"])
        assert r.status_code == 503 and "ledger unavailable" in r.json()["error"], r.text
        time.sleep(float(r.headers["retry-after"]))
    raise AssertionError(f"{request_id} never answered")


def test_sixteen_clients_racing_over_two_replicas_are_answered_the_budget_exactly(world, replicas):
    url, pair = replicas
    key, budget = world["tokens"]["racer"], PRINCIPALS["racer"][0]
    answered = [[0, 0] for _ in range(16)]  # per client, images answered by replica 0 and 1
    refusals: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        clients = [s.client(key) for s in pair]
        try:
            refused = 0
            for j in range(60):  # bounded: 16 x 60 requests at most, for 240 images
                k = (i + j) % 2  # every client alternates between the replicas, as a round-robin balancer would
                r = clients[k].post("/v1/predict", content=npy(world["test"][j % 50 : j % 50 + 1]),
                                    headers={"Content-Type": NPY})  # fmt: skip
                if r.status_code == 200:
                    answered[i][k] += len(r.json()["answers"])
                    continue
                assert r.status_code == 429 and "budget" in r.json()["error"], r.text
                with lock:
                    refusals.append(r.json()["error"])
                refused += 1
                if refused == 4:
                    return
        finally:
            for c in clients:
                c.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    per_replica = np.array(answered).sum(0)
    assert per_replica.sum() == budget  # not twice the budget, not one image less
    assert per_replica.min() > 0.25 * budget  # both replicas answered a share of it
    assert spent(url, "racer") == (budget, budget, budget)  # batch 1: one row per image
    # a replica whose own count still allowed a request was refused by the database's debit
    assert any("spent meanwhile" in e for e in refusals)


def test_watermark_evidence_is_kept_only_for_answers_the_race_let_through(world, pg):
    """Two marking replicas, 8 clients racing past a budget with images of their own: every image kept as evidence
    (marked or control) was answered; those refused at the debit ("spent meanwhile") left none."""
    url, budget = pg.create("marked"), PRINCIPALS["racer"][0]
    flags = ("--watermark-key", str(world["root"] / "watermark.key"), "--ood-threshold", "1.0")  # all marked at 10 %
    pair = [Replica(world, url, f"marked{i}", *flags) for i in (0, 1)]
    noise = np.random.default_rng(7).integers(0, 256, (8, 80, 1, 1, 28, 28), dtype=np.uint8)
    answered, refused = set(), []
    lock = threading.Lock()

    def client(i: int) -> None:
        clients = [s.client(world["tokens"]["racer"]) for s in pair]
        for j, image in enumerate(noise[i]):
            r = clients[(i + j) % 2].post("/v1/predict", content=npy(image), headers={"Content-Type": NPY})
            with lock:
                if r.status_code == 200:
                    answered.add(image.tobytes())
                else:
                    assert r.status_code == 429, r.text
                    refused.append(r.json()["error"])
        for c in clients:
            c.close()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
    finally:
        for s in pair:
            s.stop()
    with psycopg.connect(url) as db:
        kept = db.execute("SELECT marked, image FROM watermark WHERE principal = 'racer'").fetchall()
    assert len(answered) == budget == spent(url, "racer")[0] and any("spent meanwhile" in e for e in refused)
    marked = sum(m for m, _ in kept)
    assert 5 <= marked <= 60 and len(kept) > marked  # about 10 % of 240 marked, with controls
    assert {bytes(image) for _, image in kept} <= answered


def test_an_idempotency_key_is_answered_once_across_replicas(world, replicas):
    url, (a, b) = replicas
    key, x = world["tokens"]["twice"], world["test"]
    with a.client(key) as ca, b.client(key) as cb:
        first = ca.post("/v1/predict", content=npy(x[:4]), headers={"Content-Type": NPY, "Idempotency-Key": "k-1"})
        again = cb.post("/v1/predict", content=npy(x[:4]), headers={"Content-Type": NPY, "Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
        assert again.json() == first.json()
        other = cb.post("/v1/predict", content=npy(x[4:8]), headers={"Content-Type": NPY, "Idempotency-Key": "k-1"})
        assert other.status_code == 422
    assert spent(url, "twice") == (4, 4, 1)

    def send(c: httpx.Client, i: int) -> int:
        headers = {"Content-Type": NPY, "Idempotency-Key": f"race-{i}"}
        return c.post("/v1/predict", content=npy(x[i : i + 2]), headers=headers).status_code

    def both(i: int) -> list[int]:  # the same key sent to both replicas at once
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(send, (ca, cb), (i, i)))

    with a.client(key) as ca, b.client(key) as cb:
        statuses = [sorted(both(i)) for i in range(12)]
    assert all(s in ([200, 200], [200, 409]) for s in statuses), statuses
    assert spent(url, "twice") == (4 + 2 * 12, 4 + 2 * 12, 1 + 12)  # each key debited once, whoever answered


def test_the_budget_remaining_is_the_ledgers_whichever_replica_answers(world, replicas):
    """X-Budget-Remaining on an answer is the budget less the `spent` its debit returned, and /v1/usage reads the
    principal's row: both count what the other replica spent."""
    url, (a, b) = replicas
    key, x, budget = world["tokens"]["shared"], world["test"], PRINCIPALS["shared"][0]
    with a.client(key) as ca, b.client(key) as cb:
        post = lambda c, n: c.post("/v1/predict", content=npy(x[:n]), headers={"Content-Type": NPY})  # noqa: E731
        assert int(post(ca, 7).headers["x-budget-remaining"]) == budget - 7
        usage = cb.get("/v1/usage")  # replica b has answered nothing of it
        assert usage.json()["spent"] == 7 and int(usage.headers["x-budget-remaining"]) == budget - 7
        assert int(post(ca, 5).headers["x-budget-remaining"]) == budget - 12
        assert int(post(cb, 3).headers["x-budget-remaining"]) == budget - 15
        assert ca.get("/v1/usage").json()["remaining"] == cb.get("/v1/usage").json()["remaining"] == budget - 15
    assert spent(url, "shared") == (15, 15, 3)


class Relay:
    """A Unix-socket relay between a replica and the database, as the network between them: armed, it breaks the
    connection that sends the next COMMIT, `after` relaying it (the server commits; the replica never hears so) or
    `before` (the server rolls the transaction back); with `refuse` seconds it then breaks every connection and
    turns new ones away that long (the database out of reach)."""

    def __init__(self, pg):
        self.folder = Path(tempfile.mkdtemp(prefix="ini-relay-"))
        self.upstream = str(pg.folder / ".s.PGSQL.5432")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.folder / ".s.PGSQL.5432"))
        self.listener.listen(16)
        self.armed: str | None = None
        self.refuse_until = 0.0
        self.broken = threading.Event()
        self.live: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.folder}"

    def arm(self, mode: str, refuse: float = 0.0) -> None:
        self.broken.clear()
        self.armed, self.refuse = mode, refuse

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                client.close()
                continue
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.upstream)
            self.live += [client, server]
            replied, mute = threading.Event(), threading.Event()
            threading.Thread(target=self._down, args=(server, client, replied, mute), daemon=True).start()
            threading.Thread(target=self._up, args=(client, server, replied, mute), daemon=True).start()

    def _down(self, server, client, replied, mute) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if mute.is_set():
                    replied.set()  # the COMMIT's answer, which the replica never gets
                    continue
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.close()

    def _up(self, client, server, replied, mute) -> None:
        buffer, started = b"", False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                buffer += data
                while True:  # whole protocol messages: the startup packet (length first), then type + length
                    head = 0 if started else None
                    size = int.from_bytes(buffer[1:5] if started else buffer[:4], "big") + (1 if started else 0)
                    if len(buffer) < (5 if started else 4) or len(buffer) < size:
                        break
                    message, buffer, started = buffer[:size], buffer[size:], True
                    if head == 0 and self.armed and message[:1] == b"Q" and message[5:11] == b"COMMIT":
                        mode, self.armed = self.armed, None
                        if mode == "after":
                            mute.set()
                            server.sendall(message)
                            replied.wait(10)
                        self.refuse_until = time.monotonic() + self.refuse
                        # said before the break: the replica answers as soon as it sees the broken socket, and on
                        # busy cores that answer has reached the test before this thread ran again
                        self.broken.set()
                        for end in [client, server] + (self.live if self.refuse else []):
                            with contextlib.suppress(OSError):
                                end.shutdown(socket.SHUT_RDWR)
                        return
                    server.sendall(message)
        with contextlib.suppress(OSError):
            server.close()


def test_a_commit_whose_connection_breaks_is_looked_up_before_the_client_is_answered(world, pg):
    """A request without an Idempotency-Key: the replica's connection breaks during its batch's COMMIT. Committed,
    the replica answers it (it is counted once); rolled back, it answers 503 and a resend is counted once; when the
    database cannot be asked within RESOLVE_SECONDS, 503 says whether it was counted is unknown."""
    from stages.serving.ledger_pg import RESOLVE_SECONDS

    pg.create("relayed")
    relay = Relay(pg)
    replica = Replica(world, relay.url("relayed"), "relayed")
    key, x, url = world["tokens"]["steady"], world["test"], pg.url("relayed")
    try:
        with replica.client(key) as c:
            post = lambda n: c.post("/v1/predict", content=npy(x[:n]), headers={"Content-Type": NPY})  # noqa: E731
            assert post(2).status_code == 200
            relay.arm("after")
            r = post(4)
            assert relay.broken.is_set() and r.status_code == 200 and len(r.json()["answers"]) == 4
            assert int(r.headers["x-budget-remaining"]) == PRINCIPALS["steady"][0] - 6
            assert spent(url, "steady") == (6, 6, 2)  # answered and counted once

            relay.arm("before")
            r = post(3)
            assert relay.broken.is_set() and r.status_code == 503, r.text
            assert "nothing answered or counted" in r.json()["error"] and r.headers["retry-after"] == "1"
            assert spent(url, "steady") == (6, 6, 2)
            assert post(3).status_code == 200  # the resend, counted once
            assert spent(url, "steady") == (9, 9, 3)

            relay.arm("after", refuse=RESOLVE_SECONDS + 2)
            began = time.monotonic()
            r = post(1)
            assert relay.broken.is_set() and r.status_code == 503, r.text
            assert "unknown" in r.json()["error"] and time.monotonic() - began >= RESOLVE_SECONDS
            assert spent(url, "steady") == (10, 10, 4)  # it did commit: what a resend without a key would repeat
    finally:
        replica.stop()
        relay.close()


def test_a_block_raised_by_one_replica_holds_on_both(world, replicas):
    """The monitors' windows are per replica: a thief spread over both is judged on half its queries by each, so the
    alert comes up to twice as late; once raised, the block is in the ledger and the other replica refuses too."""
    url, pair = replicas
    pool = np.random.default_rng(1).integers(0, 256, (1200, 1, 28, 28), dtype=np.uint8)  # unlike the victim's images
    answered, blocked_at = [0, 0], None
    with pair[0].client(world["tokens"]["thief"]) as c0, pair[1].client(world["tokens"]["thief"]) as c1:
        for j, start in enumerate(range(0, len(pool), 10)):
            r = (c0, c1)[j % 2].post(
                "/v1/predict", content=npy(pool[start : start + 10]), headers={"Content-Type": NPY}
            )
            if r.status_code == 403:
                blocked_at = j % 2
                break
            assert r.status_code == 200, r.text
            answered[j % 2] += 10
            time.sleep(0.02)  # the monitor runs beside the answers; a thief this slow meets the block
        assert blocked_at is not None
        other = (c0, c1)[1 - blocked_at].post("/v1/predict", content=npy(pool[:10]), headers={"Content-Type": NPY})
        assert other.status_code == 403  # refused at its debit, whichever replica's monitor raised the block
    with psycopg.connect(url) as db:
        alerts = db.execute(
            "SELECT signal, queries, action FROM alerts WHERE principal = 'thief' ORDER BY id"
        ).fetchall()
        state, spent = db.execute("SELECT state, spent FROM principals WHERE name = 'thief'").fetchone()
    # the global detectors may log the thief first (their action is log by default); the block is the key's own
    blocks = [a for a in alerts if a[2] == "block"]
    assert blocks and blocks[0][0] == "ood_share" and state == "blocked"
    # a request held for its judgement and then blocked stays counted (its forward pass ran), never answered
    assert sum(answered) <= spent <= sum(answered) + 2 * 10
    # the alerting replica had seen `queries` of them; the thief got at most twice that, and the requests in flight
    assert blocks[0][1] <= max(answered) + 10 and sum(answered) <= 2 * blocks[0][1] + 2 * 10


def test_the_database_going_away_mid_request_answers_503_and_debits_nothing_twice(world, replicas, pg):
    url, pair = replicas
    key, x = world["tokens"]["steady"], world["test"]
    received: dict[str, int] = {}
    unavailable: dict[str, tuple[int, np.ndarray]] = {}  # request id -> (replica, images)
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        with pair[0].client(key) as c0, pair[1].client(key) as c1:
            for j in range(400):  # bounded; the database going away ends it sooner
                if stop.is_set():
                    return
                images, request_id = x[(i + j) % 290 : (i + j) % 290 + 1 + j % 4], uuid.uuid4().hex
                c = (c0, c1)[j % 2]
                r = c.post(
                    "/v1/predict", content=npy(images), headers={"Content-Type": NPY, "Idempotency-Key": request_id}
                )
                with lock:
                    if r.status_code == 200:
                        received[request_id] = len(r.json()["answers"])
                    else:
                        assert r.status_code == 503 and "ledger unavailable" in r.json()["error"], r.text
                        assert int(r.headers["retry-after"]) >= 1
                        unavailable[request_id] = (j % 2, images)
                        stop.set()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        deadline = time.monotonic() + 30
        while len(received) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        pg.stop("immediate")  # the database disappears with transactions in flight
        for f in futures:
            f.result(timeout=60)
    assert len(received) >= 60 and unavailable
    pg.start()
    for request_id, (replica, images) in unavailable.items():  # each client resends after Retry-After, same key
        with pair[replica].client(key) as c:
            received[request_id] = resend(c, images, request_id)
    for replica in pair:  # every replica's pool has reconnected (within seconds, answering 503 meanwhile)
        with replica.client(key) as c:
            request_id = uuid.uuid4().hex
            received[request_id] = resend(c, x[:2], request_id)
    assert set(unavailable) <= set(received)
    total = sum(received.values())
    assert spent(url, "steady") == (total, total, len(received))  # every answer counted once, nothing else
    with psycopg.connect(url) as db:
        ids = {row[0] for row in db.execute("SELECT request_id FROM queries WHERE principal = 'steady'")}
    assert ids == set(received)


def test_kill_9_of_one_replica_loses_nothing_answered(world, replicas):
    url, (a, b) = replicas
    key, x = world["tokens"]["crash"], world["test"]
    received, broken = burst_then_kill(
        lambda: a.client(key), x, kill=lambda: a.proc.send_signal(signal.SIGKILL), requests=300
    )
    assert len(received) >= 100 and broken
    with b.client(key) as c:  # the balancer sends the retries to the surviving replica
        for request_id, images in broken.items():
            received[request_id] = resend(c, images, request_id)
    total = sum(received.values())
    assert spent(url, "crash") == (total, total, len(received))
    assert b.proc.poll() is None


def test_unreachable_and_foreign_databases_are_refused_in_one_line(world, pg, tmp_path):
    def serve(url: str):
        return invoke("serve", "--model", world["victim"], "--keys", world["keys"], "--ledger", url, "--port", 0)

    assert "cannot connect" in assert_one_line_error(serve(f"postgresql://postgres@/ledger?host={tmp_path}"))
    assert "cannot connect" in assert_one_line_error(serve(pg.url("no_such_database")))
    old = pg.create("old")
    with psycopg.connect(old, autocommit=True) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', 'ledger/0')")
    assert "ledger schema ledger/0" in assert_one_line_error(serve(old))
    foreign = pg.create("foreign")
    with psycopg.connect(foreign, autocommit=True) as db:
        db.execute("CREATE TABLE queries (id INTEGER, note TEXT)")
    assert "not a usable ledger" in assert_one_line_error(serve(foreign))
    assert "password" not in serve("postgresql://u:password@/x?host=/nonexistent").stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_replicas_example_of_docs_serving_runs_as_written(world, pg):
    """docs/serving.md's two replicas on one database: its bash block, with this test's model, keys, database and
    free ports, answers on both ports and records both answers in the one ledger."""
    text = (ROOT / "docs" / "serving.md").read_text()
    block = re.search(r"## Replicas on PostgreSQL.*?```bash\n(.*?)```", text, re.S).group(1)
    url, ports = pg.create("docs"), (free_port(), free_port())
    for written, ours in (
        ("postgresql://ini@db.internal/ini_ledger", url),
        ("artifacts/victim-ini.pt", str(world["victim"])),
        ("keys.toml", str(world["keys"])),
        ("8001 8002", f"{ports[0]} {ports[1]}"),
    ):
        assert written in block
        block = block.replace(written, ours)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # `python`: this interpreter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": path}
    shell = subprocess.Popen(
        ["bash", "-c", block], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        urls = sorted(shell.stdout.readline().strip() for _ in ports)  # each replica prints its URL once it serves
        assert urls == sorted(f"http://127.0.0.1:{p}" for p in ports)
        for u in urls:
            r = httpx.post(
                u + "/v1/predict",
                content=npy(world["test"][:3]),
                headers={"Content-Type": NPY, "X-API-Key": world["tokens"]["twice"]},
            )
            assert r.status_code == 200, r.text
    finally:
        os.killpg(shell.pid, signal.SIGTERM)  # the shell's process group: its two replicas
        shell.wait(timeout=60)
    assert spent(url, "twice") == (6, 6, 2)
    with psycopg.connect(url) as db:  # each replica's start recorded, though both started within a second
        assert db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'run.%%'").fetchone()[0] == 2
