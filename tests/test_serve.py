"""`serve` as a real uvicorn server on 127.0.0.1 (an ephemeral port), started by the CLI in a subprocess: keys,
malformed payloads, budgets under concurrent clients, rate limits, restarts, kill -9, extraction alerts, metrics,
ONNX, and `steal --target` through it. All traffic stays on the loopback, every loop is bounded in count and time."""

from __future__ import annotations

import base64
import io
import json
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, invoke
from served import burst_then_kill, served_world

from stages.core.artifacts import open_artifact
from stages.deploy import onnx_export as _onnx
from stages.serving import keys as principals_file
from stages.serving.launch import launch
from stages.serving.limits import Budget
from stages.training import victim as _victim

ROOT = Path(__file__).resolve().parents[1]
NPY = "application/x-npy"
PRINCIPALS = {  # name: budget, rate, burst, action
    "benign": (100_000, 10_000.0, 10_000.0, "log"),
    "thief": (100_000, 10_000.0, 10_000.0, "block"),
    "racer": (300, 10_000.0, 10_000.0, "log"),
    "slow": (100_000, 20.0, 20.0, "log"),
    "stealer": (90, 10_000.0, 10_000.0, "log"),
    "spare": (100_000, 10_000.0, 10_000.0, "log"),
}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Server:
    """`python cli.py serve ... --port 0` in a subprocess; its URL is the line it prints on stdout."""

    def __init__(self, model: Path, keys: Path, ledger: Path, *flags: str):
        self.stderr = open(ledger.with_suffix(f".{time.time_ns()}.stderr"), "w+")
        try:
            self.proc, self.url = launch(model, keys, ledger, *flags, stderr=self.stderr, timeout=60)
        except RuntimeError as e:
            self.stderr.seek(0)
            raise AssertionError(f"{e} {self.stderr.read()[-2000:]}") from None

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key} if key else {}, timeout=30.0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.stderr.close()
        return code

    def log(self) -> str:
        return Path(self.stderr.name).read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return served_world(tmp_path_factory.mktemp("serve"), PRINCIPALS)


@pytest.fixture(scope="module")
def server(world):
    s = Server(world["victim"], world["keys"], world["root"] / "ledger.sqlite")
    yield s
    assert s.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def spent_in_ledger(path: Path, name: str) -> tuple[int, int]:
    """(principal's spent counter, sum of its query rows' images), read by a separate connection."""
    with sqlite3.connect(path) as db:
        spent = db.execute("SELECT spent FROM principals WHERE name = ?", (name,)).fetchone()[0]
        rows = db.execute("SELECT COALESCE(SUM(images), 0) FROM queries WHERE principal = ?", (name,)).fetchone()[0]
    return int(spent), int(rows)


def test_keys_file_holds_hashes_only(world):
    text = world["keys"].read_text()
    assert all(token not in text for token in world["tokens"].values())
    table = principals_file.read(world["keys"])
    assert sorted(p.name for p in table.values()) == sorted(PRINCIPALS)
    auth = principals_file.Authenticator(table)
    assert auth.identify(world["tokens"]["racer"]).budget == 300
    token = world["tokens"]["racer"]
    assert auth.identify(token[:-1] + ("y" if token.endswith("x") else "x")) is None  # one character off
    assert_one_line_error(invoke("serve-key", "racer", "--keys", world["keys"]))  # exists already


def test_answers_match_the_model_and_auth_is_enforced(world, server):
    model, _ = _victim.load(world["victim"])
    x = world["test"][:5]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x).float() / 255.0), 1).numpy()
    with server.client(world["tokens"]["spare"]) as c:
        r = c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["answers"]), expected, atol=1e-5)
        assert int(r.headers["x-budget-remaining"]) == 100_000 - 5
        r = c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY, "Accept": NPY})
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), expected, atol=1e-5)
        body = json.dumps({"images": base64.b64encode(npy(x)).decode()})
        r = c.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
        np.testing.assert_allclose(np.array(r.json()["answers"]), expected, atol=1e-5)
        assert c.get("/v1/usage").json()["spent"] == 15
    with server.client() as anonymous:
        assert anonymous.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY}).status_code == 401
    with server.client(world["tokens"]["spare"][:-2] + "zz") as wrong:
        r = wrong.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY})
        assert r.status_code == 401 and set(r.json()) == {"error"}
    with server.client("not-even-a-key") as wrong:
        assert wrong.get("/v1/usage").status_code == 401


def _malformed(shape=(1, 28, 28)) -> list[tuple[str, dict, bytes, int]]:
    ok = np.zeros((2, *shape), dtype=np.uint8)
    bad_float = np.full((2, *shape), 0.5, dtype=np.float32)
    nan, big, negative = bad_float.copy(), bad_float.copy(), bad_float.copy()
    nan[0, 0, 0, 0], big[1, 0, 3, 3], negative[0, 0, 1, 1] = np.nan, 1.5, -0.1
    inf = bad_float.copy()
    inf[0, 0, 0, 0] = np.inf
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    b64 = lambda a: json.dumps({"images": base64.b64encode(npy(a)).decode()}).encode()
    return [
        ("no content type", {}, npy(ok), 415),
        ("text/plain", {"Content-Type": "text/plain"}, npy(ok), 415),
        ("image/png", {"Content-Type": "image/png"}, b"\x89PNG....", 415),
        ("not npy", {"Content-Type": NPY}, b"hello world", 422),
        ("truncated npy", {"Content-Type": NPY}, npy(ok)[:150], 422),
        ("pickled objects", {"Content-Type": NPY}, pickled.getvalue(), 422),
        ("float64", {"Content-Type": NPY}, npy(ok.astype(np.float64)), 422),
        ("int32", {"Content-Type": NPY}, npy(ok.astype(np.int32)), 422),
        ("three dims", {"Content-Type": NPY}, npy(ok[0]), 422),
        ("wrong size", {"Content-Type": NPY}, npy(np.zeros((2, 1, 32, 32), np.uint8)), 422),
        ("wrong channels", {"Content-Type": NPY}, npy(np.zeros((2, 3, 28, 28), np.uint8)), 422),
        ("empty batch", {"Content-Type": NPY}, npy(ok[:0]), 422),
        ("nan", {"Content-Type": NPY}, npy(nan), 422),
        ("inf", {"Content-Type": NPY}, npy(inf), 422),
        ("above one", {"Content-Type": NPY}, npy(big), 422),
        ("negative", {"Content-Type": NPY}, npy(negative), 422),
        ("bad json", {"Content-Type": "application/json"}, b"{not json", 422),
        ("json without images", {"Content-Type": "application/json"}, b'{"pixels": []}', 422),
        ("bad base64", {"Content-Type": "application/json"}, b'{"images": "@@@"}', 422),
        ("json nan", {"Content-Type": "application/json"}, b64(nan), 422),
        ("too many images", {"Content-Type": NPY}, npy(np.zeros((1025, *shape), np.uint8)), 413),
        ("body too large", {"Content-Type": NPY}, b"\x93NUMPY" + b"\0" * (17 * 2**20), 413),
    ]


def test_malformed_payloads_each_get_their_status_and_the_server_keeps_serving(world, server):
    cases = _malformed()
    assert len(cases) >= 15
    with server.client(world["tokens"]["spare"]) as c:
        before = c.get("/v1/usage").json()["spent"]
        for name, headers, body, status in cases:
            r = c.post("/v1/predict", content=body, headers=headers)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert set(r.json()) == {"error"} and "\n" not in r.text and r.json()["error"], name
            assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/v1/usage").json()["spent"] == before  # nothing malformed was counted
        r = c.post("/v1/predict", content=npy(world["test"][:3]), headers={"Content-Type": NPY})
        assert r.status_code == 200 and len(r.json()["answers"]) == 3
        assert c.get("/nowhere").status_code == 404 and c.get("/v1/predict").status_code == 405


def test_eight_clients_racing_past_the_budget_spend_exactly_what_was_answered(world, server):
    key, budget = world["tokens"]["racer"], PRINCIPALS["racer"][0]
    sizes = [1, 3, 7, 11]  # a mix, so the last requests do not fit exactly

    def client(i: int) -> tuple[int, int]:
        answered, refused = 0, 0
        with server.client(key) as c:
            for j in range(40):  # bounded: 8 x 40 requests at most
                n = sizes[(i + j) % len(sizes)]
                r = c.post("/v1/predict", content=npy(world["test"][:n]), headers={"Content-Type": NPY})
                if r.status_code == 200:
                    answered += len(r.json()["answers"])
                else:
                    assert r.status_code == 429 and "budget" in r.json()["error"], r.text
                    assert "retry-after" not in r.headers  # a lifetime budget: waiting does not help
                    refused += 1
                    if int(r.headers["x-budget-remaining"]) == 0:
                        break
        return answered, refused

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    answered = sum(a for a, _ in results)
    assert sum(r for _, r in results) > 0  # they did race past it
    with server.client(key) as c:
        usage = c.get("/v1/usage").json()
    assert usage["spent"] == answered <= budget
    assert usage["remaining"] == budget - answered < max(sizes)
    assert spent_in_ledger(server_ledger(world), "racer") == (answered, answered)


def server_ledger(world) -> Path:
    return world["root"] / "ledger.sqlite"


def test_rate_limit_answers_429_with_retry_after(world, server):
    x = world["test"][:20]  # the whole bucket of `slow` (20 images, 20 per second)
    with server.client(world["tokens"]["slow"]) as c:
        assert c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY}).status_code == 200
        r = c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY})
        assert r.status_code == 429 and "rate" in r.json()["error"]
        wait = float(r.headers["retry-after"])
        assert 1 <= wait <= 2
        time.sleep(wait)
        assert c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY}).status_code == 200
        assert c.get("/v1/usage").json()["spent"] == 40


def _wait_for_alerts(ledger: Path, name: str, seconds: float = 20.0) -> list[tuple]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                "SELECT signal, value, threshold, queries, action FROM alerts WHERE principal = ?", (name,)
            ).fetchall()
        if rows:
            return rows
        time.sleep(0.2)
    return []


def test_a_knockoff_style_client_is_alerted_and_blocked_and_the_benign_replay_is_not(world, server):
    ledger = server_ledger(world)
    with server.client(world["tokens"]["benign"]) as c:
        for start in range(0, len(world["test"]), 10):  # the test split replayed, 10 images a request
            assert (
                c.post(
                    "/v1/predict", content=npy(world["test"][start : start + 10]), headers={"Content-Type": NPY}
                ).status_code
                == 200
            )
    pool = np.random.default_rng(0).integers(0, 256, (300, 1, 28, 28), dtype=np.uint8)  # images unlike the victim's
    refused = None
    with server.client(world["tokens"]["thief"]) as c:
        for start in range(0, len(pool), 10):
            r = c.post("/v1/predict", content=npy(pool[start : start + 10]), headers={"Content-Type": NPY})
            if r.status_code == 403:
                refused = start
                break
            assert r.status_code == 200
            time.sleep(0.02)  # the monitor runs beside the answers; a thief this slow meets the block
    alerts = _wait_for_alerts(ledger, "thief")
    own = [a for a in alerts if not a[0].startswith("linked:")]  # the global signals link it too, with `log`
    assert own and own[0][0] == "ood_share" and own[0][4] == "block"
    assert own[0][1] > own[0][2]  # the share crossed its threshold
    assert refused is not None and refused < len(pool)
    with server.client(world["tokens"]["thief"]) as c:
        r = c.get("/v1/usage")
        assert r.status_code == 403 and "blocked" in r.json()["error"]
    assert _wait_for_alerts(ledger, "benign", seconds=1.0) == []
    alert_lines = [json.loads(line) for line in ledger.with_suffix(".alerts.jsonl").read_text().splitlines()]
    assert [a["principal"] for a in alert_lines if a["principal"] in ("thief", "benign")] == ["thief"] * len(alerts)
    metrics = httpx.get(server.url + "/metrics").text
    ood = sum(a[0] == "ood_share" for a in alerts)
    assert f'ini_alerts_total{{principal="thief",signal="ood_share"}} {float(ood)}' in metrics


def test_metrics_count_what_the_ledger_holds(world, server):
    text = httpx.get(server.url + "/metrics").text
    with sqlite3.connect(server_ledger(world)) as db:
        answered = db.execute("SELECT SUM(images) FROM queries").fetchone()[0]
    assert f"ini_images_answered_total {float(answered)}" in text
    assert "ini_batch_images_bucket" in text and "ini_predict_seconds_bucket" in text
    assert 'ini_principal_spent_images{principal="racer"}' in text


def test_steal_through_the_api_spends_its_budget_once(world, server, tmp_path):
    out = tmp_path / "stolen.h5"
    result = invoke(
        "steal",
        "--target",
        server.url,
        "--api-key",
        world["tokens"]["stealer"],
        "--attack",
        "knockoff",
        "--pool",
        world["data"],
        "--budget",
        500,
        "--epochs",
        1,
        "--batch-size",
        32,
        "--query-batch",
        40,
        "--budget-curve",
        2,
        "--device",
        "cpu",
        "--out",
        out,
        "--victim",
        world["victim"],
    )
    assert result.exit_code == 0, result.stderr
    with open_artifact(out, "surrogate") as f:
        assert int(f.attrs["queries"]) == PRINCIPALS["stealer"][0]  # --budget cut to the key's 90
        assert f["transfer/images"].shape[0] == 90
        assert list(f["curve/queries"][()]) == [23.0, 45.0, 90.0]
        assert "api_key" not in json.loads(f.attrs["params"])
        assert world["tokens"]["stealer"] not in f.attrs["params"]
        assert 0.0 <= f.attrs["fidelity"] <= 1.0
    assert spent_in_ledger(server_ledger(world), "stealer") == (90, 90)
    result = invoke(
        "steal",
        "--target",
        server.url,
        "--api-key",
        world["tokens"]["stealer"],
        "--pool",
        world["data"],
        "--out",
        tmp_path / "again.h5",
    )
    assert "budget is spent" in assert_one_line_error(result)
    metrics = tmp_path / "metrics.h5"
    assert invoke("evaluate", out, "--out", metrics, "--device", "cpu").exit_code == 0
    with open_artifact(metrics, "metrics") as f:
        assert f["rows/queries"][0] == 90


@pytest.mark.parametrize("durability", ["full", "process"])
def test_kill_9_during_a_burst_loses_no_answer_and_a_restart_keeps_the_ledger(world, tmp_path, durability):
    """At either durability level: `process` leaves a commit with the OS unflushed, which a kill -9 of serve keeps."""
    ledger = tmp_path / "ledger.sqlite"
    first = Server(world["victim"], world["keys"], ledger, "--durability", durability)
    key, x = world["tokens"]["spare"], world["test"]
    received, broken = burst_then_kill(
        lambda: httpx.Client(base_url=first.url, headers={"X-API-Key": key}, timeout=10.0),
        x,
        kill=lambda: first.proc.send_signal(signal.SIGKILL),
        requests=200,
    )
    first.stop()
    assert len(received) >= 100 and broken  # the kill hit requests in flight

    second = Server(world["victim"], world["keys"], ledger)
    replayed = 0
    with second.client(key) as c:
        for request_id, images in broken.items():  # the clients resend what broke, with the same key
            r = c.post("/v1/predict", content=npy(images), headers={"Content-Type": NPY, "Idempotency-Key": request_id})
            assert r.status_code == 200
            replayed += r.headers.get("idempotent-replayed") == "true"
            received[request_id] = len(r.json()["answers"])
        again = c.post("/v1/predict", content=npy(x[:4]), headers={"Content-Type": NPY, "Idempotency-Key": "twice"})
        assert (
            c.post(
                "/v1/predict", content=npy(x[:4]), headers={"Content-Type": NPY, "Idempotency-Key": "twice"}
            ).headers["idempotent-replayed"]
            == "true"
        )
        assert (
            c.post(
                "/v1/predict", content=npy(x[4:8]), headers={"Content-Type": NPY, "Idempotency-Key": "twice"}
            ).status_code
            == 422
        )
        received["twice"] = len(again.json()["answers"])
        usage = c.get("/v1/usage").json()
    total = sum(received.values())
    assert usage["spent"] == total
    assert spent_in_ledger(ledger, "spare") == (total, total)
    with sqlite3.connect(ledger) as db:
        ids = {row[0] for row in db.execute("SELECT request_id FROM queries WHERE principal = 'spare'")}
    assert ids == set(received)  # every answer the clients hold is recorded, and nothing else
    assert second.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)  # graceful on SIGTERM
    assert "Traceback" not in second.log()

    third = Server(world["victim"], world["keys"], ledger)  # a restart resumes every principal's spend
    with third.client(key) as c:
        assert c.get("/v1/usage").json()["spent"] == total
    assert third.stop(signal.SIGINT) == 0
    with sqlite3.connect(ledger) as db:
        runs = [json.loads(v) for (_, v) in sorted(db.execute("SELECT key, value FROM meta WHERE key LIKE 'run.%'"))]
    assert [r["durability"] for r in runs][:1] == [durability] and runs[-1]["durability"] == "full"


def test_the_batcher_waits_for_as_many_requests_as_the_last_batch_held():
    """Three clients that come back together are batched as soon as all three are in, not after --max-wait-ms;
    a lone request still waits the whole of it for a companion."""
    import asyncio

    from stages.serving.batcher import Batcher

    batches: list[int] = []

    def process(jobs):
        batches.append(len(jobs))
        return [None] * len(jobs)

    async def main() -> list[float]:
        batcher = Batcher(process, max_images=256, max_wait=1.0)
        await batcher.start()
        one = np.zeros((1, 1, 8, 8), np.float32)
        await asyncio.gather(*(batcher.submit(one, i) for i in range(3)))  # together: one batch of 3
        took = []
        for gaps in ((0.0, 0.05, 0.1), (0.0,)):
            began, futures = time.perf_counter(), []
            for gap in gaps:
                await asyncio.sleep(max(0.0, began + gap - time.perf_counter()))
                futures.append(batcher.submit(one, gap))
            await asyncio.gather(*futures)
            took.append(time.perf_counter() - began)
        await batcher.stop()
        return took

    staggered, lone = asyncio.run(main())
    assert batches == [3, 3, 1]
    assert staggered < 0.1 + 0.5 and lone >= 1.0  # the third came at 0.1 s: no wait after it; alone: all of it


@pytest.mark.parametrize("durability", ["full", "process"])
def test_each_durability_level_sets_what_its_commit_waits_for(ledger_at, durability):
    """`full` flushes to disk (SQLite synchronous FULL, PostgreSQL synchronous_commit on); `process` leaves the
    flush to the OS or the database server (NORMAL, off) on every connection that commits a batch."""
    from stages.serving.backends import open_ledger
    from stages.serving.ledger import Answered

    book = open_ledger(ledger_at, durability)
    try:
        book.enrol(["alice"])
        assert book.record([Answered("alice", 0.0, "0" * 64, None, np.full((3, 10), 0.1, np.float32), 0)])[0].spent == 3
        if ledger_at.startswith("postgresql://"):
            with book._connection() as db:
                setting = db.execute("SHOW synchronous_commit").fetchone()[0]
            assert setting == {"full": "on", "process": "off"}[durability]
        else:
            assert book._db.execute("PRAGMA synchronous").fetchone()[0] == {"full": 2, "process": 1}[durability]
        assert book.standing("alice") == (3, "ok")
    finally:
        book.close()


def test_onnx_export_matches_eager_and_serves_the_same_answers(world, tmp_path):
    onnx_path = tmp_path / "victim.onnx"
    result = invoke("export", "--victim", world["victim"], "--format", "onnx", "--out", onnx_path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(onnx_path)
    model, _ = _victim.load(world["victim"])
    x = world["test"][:64]
    with torch.no_grad():
        eager = torch.softmax(model(torch.from_numpy(x).float() / 255.0), 1).numpy()
    session = _onnx.load(onnx_path)
    assert np.abs(session(x.astype(np.float32) / 255.0) - eager).max() <= 1e-5
    assert session.metadata["format"] == "onnx" and session.metadata["defense"] == "none"
    refused = invoke(
        "export",
        "--victim",
        world["victim"],
        "--format",
        "onnx",
        "--defense",
        "noise",
        "--out",
        tmp_path / "noise.onnx",
    )
    assert "noise" in assert_one_line_error(refused) and not (tmp_path / "noise.onnx").exists()

    served = Server(onnx_path, world["keys"], tmp_path / "ledger.sqlite")
    with served.client(world["tokens"]["spare"]) as c:
        r = c.post("/v1/predict", content=npy(x), headers={"Content-Type": NPY, "Accept": NPY})
        assert np.abs(np.load(io.BytesIO(r.content)) - eager).max() <= 1e-5
    served.stop()


def test_serve_refuses_bad_setups_in_one_line(world, tmp_path):
    assert "no such keys file" in assert_one_line_error(
        invoke("serve", "--model", world["victim"], "--keys", tmp_path / "none.toml")
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[principals.x]\nkey_id = "zz"\n')
    assert_one_line_error(invoke("serve", "--model", world["victim"], "--keys", bad))
    assert_one_line_error(invoke("serve", "--model", tmp_path / "victim.txt", "--keys", world["keys"]))


def test_a_ledger_reading_that_includes_requests_still_reserved_does_not_count_them_twice():
    """Two requests of one key debited in one transaction, settled one after the other: the row the transaction
    returned (spent 10, other replicas' 8 included) is taken once both are settled, so the last images of the budget
    stay answerable; another replica's later debit is seen at the next reading."""
    budget = Budget(budget=12, spent=0)
    assert budget.reserve(1) and budget.reserve(1)
    budget.settle(1, answered=True, spent=10)
    assert budget.remaining >= 1  # the second request is still reserved; the reading waits for it
    budget.settle(1, answered=True, spent=10)
    assert (budget.spent, budget.remaining) == (10, 2)
    assert budget.reserve(2) and not budget.reserve(1)
    budget.settle(2, answered=False, spent=11)  # refused at its debit: another replica spent one meanwhile
    assert (budget.spent, budget.remaining) == (11, 1)


def test_serve_caps_numpy_blas_at_its_threads_for_the_monitor():
    """The BLAS numpy loaded (OpenBLAS here, 2 threads by default on 2 cores) is capped at serve's --threads."""
    from threadpoolctl import threadpool_info

    from stages.serve import limit_blas

    limits = limit_blas(1)
    try:
        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        assert blas and set(blas) == {1}, threadpool_info()
    finally:
        limits.restore_original_limits()
