"""Loopback benchmark of `serve` against the stack's own ceiling, with the ledger on SQLite and on PostgreSQL.

    python benchmarks/bench_serve.py [--victim victim.h5] [--seconds 3] [--smoke] [--graphs]

The ceiling is a bare FastAPI endpoint on the same uvicorn that answers a constant array: HTTP and the framework,
nothing else. Against it, at request batch 1 and 64 with 8 clients: `serve` with its SQLite ledger, and with a
PostgreSQL ledger (a throwaway server, fsync on) as 1 and 2 replicas, each at `--durability full` and `process`;
batch 64 also against the in-process forward pass. Then `serve`'s CPU per request at batch 1, split into its
parts (HTTP and framework, .npy decoding, SHA-256, forward pass, ledger, monitor, encoding), each part timed
in-process on the same bodies; and 2 replicas racing 16 clients past one budget. `--graphs` adds the older
table: undefended, InI and MAD graphs, TorchScript and ONNX.

Without --victim it trains a LeNet-5 on sklearn's digits for one epoch (offline, a minute). Every server is its own
process with one forward thread, its clients raw keep-alive HTTP/1.1 on asyncio in this process (8 principals, one
key per client: the customers of a deployed model); every load lasts `--seconds`. Throughput on a shared machine
depends on the share of CPU it gets: compare ratios within one run, and CPU per request (read from /proc), which
depends on it less.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import Request  # noqa: E402  (module level: the bare endpoint's annotation is resolved here)

from stages import export, prepare, serve_key, train  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.deploy import onnx_export as _onnx  # noqa: E402
from stages.serving.launch import launch  # noqa: E402
from stages.training import jit as _jit  # noqa: E402
from stages.training import victim as _victim  # noqa: E402

LOADS = ((1, 1), (1, 8), (64, 1), (64, 8))  # (images per request, concurrent clients)
LEVEL = {"full": "", "process": ", --durability process"}  # the row names' suffix per durability level


def start(model: Path, keys: Path, ledger) -> tuple[subprocess.Popen, str]:
    try:
        return launch(model, keys, ledger)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def load(url: str, key: str, images: np.ndarray, batch: int, clients: int, seconds: float, pid: int) -> dict:
    import httpx

    buffer = io.BytesIO()
    np.save(buffer, images[:batch])
    body, latencies = buffer.getvalue(), []
    headers = {"X-API-Key": key, "Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0, limits=limits) as client:
        for _ in range(3):  # warm-up: connections, TorchScript's profiling runs
            (await client.post("/v1/predict", content=body)).raise_for_status()
        stop = time.perf_counter() + seconds

        async def one() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post("/v1/predict", content=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        began, server, own = time.perf_counter(), cpu_seconds(pid), time.process_time()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - began
        server, own = cpu_seconds(pid) - server, time.process_time() - own
    return {
        **summary(latencies, batch, elapsed),
        "server_cpu_ms": 1000 * server / max(1, len(latencies)),
        "client_cpu_ms": 1000 * own / max(1, len(latencies)),
    }


def summary(latencies: list[float], batch: int, elapsed: float) -> dict:
    ordered = sorted(latencies)
    return dict(
        images_per_s=len(latencies) * batch / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        requests=len(ordered),
    )


def in_process(model: Path, images: np.ndarray, batch: int, seconds: float) -> dict:
    """The same file's forward pass, called directly on one thread: no HTTP, no ledger, no monitor."""
    x = images[:batch].astype(np.float32) / 255.0
    if model.suffix == ".onnx":
        forward = _onnx.load(model).__call__
    else:
        graph, _ = _jit.load(model)
        tensor = torch.from_numpy(x)

        def forward(_):
            with torch.inference_mode():
                return graph(tensor)

    for _ in range(5):
        forward(x)
    latencies, began, cpu = [], time.perf_counter(), time.process_time()
    while time.perf_counter() - began < seconds:
        t = time.perf_counter()
        forward(x)
        latencies.append(time.perf_counter() - t)
    cpu_ms = 1000 * (time.process_time() - cpu) / len(latencies)
    return {**summary(latencies, batch, time.perf_counter() - began), "cpu_ms": cpu_ms}


def graphs_table(victim: Path, ini_victim: Path | None, keys: Path, key: str, work: Path, seconds: float) -> str:
    """Every graph and runtime at every load, served beside in-process (one principal, httpx clients)."""
    graphs = {"undefended": (victim, "none"), "InI": (ini_victim or victim, "none"), "MAD": (victim, "mad")}
    rows = []
    for name, (source, defense) in graphs.items():
        images = _data.load(export_data(source), splits=("test",)).splits["test"][0][:64].numpy()
        for fmt in ("torchscript", "onnx"):
            model = export.run(
                victim=source,
                format=fmt,
                defense=defense,
                out=work / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}",
                check_images=64,
            )
            proc, url = start(model, keys, work / f"{name}-{fmt}.sqlite")
            try:
                for batch, clients in LOADS:
                    served = asyncio.run(load(url, key, images, batch, clients, seconds, proc.pid))
                    local = in_process(model, images, batch, seconds)
                    rows.append(dict(graph=name, runtime=fmt, batch=batch, clients=clients, served=served, local=local))
                    log(
                        f"{name:<10} {fmt:<11} batch {batch:>2} clients {clients}: {served['images_per_s']:9.0f} "
                        f"img/s p50 {served['p50_ms']:6.2f} ms p99 {served['p99_ms']:6.2f} ms server CPU "
                        f"{served['server_cpu_ms']:.2f} ms/request | in-process {local['images_per_s']:9.0f} img/s"
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    return table(rows)


# -- the ceiling: the same uvicorn, FastAPI and listening socket as serve, answering a constant array ----------------
def bare_endpoint(port: int, http: str, loop: str) -> None:
    """`bench_serve.py --bare PORT`: POST /v1/predict reads the body and answers zeros (N, 10) as .npy, N told
    apart by the body's length (computed once per length): no decoding, hashing, model or ledger."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from stages.serve import _listen

    app, answers = FastAPI(docs_url=None, redoc_url=None, openapi_url=None), {}

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = await request.body()
        answer = answers.get(len(body))
        if answer is None:
            n = np.load(io.BytesIO(body), allow_pickle=False).shape[0]
            answer = answers[len(body)] = to_npy(np.zeros((n, 10), np.float32))
        return Response(answer, media_type="application/x-npy")

    listener = _listen("127.0.0.1", port)
    print(f"http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=http, loop=loop)
    uvicorn.Server(config).run(sockets=[listener])


def start_bare(http: str = "auto", loop: str = "auto") -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--bare", "0", "--bare-http", http, "--bare-loop", loop],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# -- a raw HTTP/1.1 client: little CPU per request, so the server under test keeps most of the two cores ---------
async def raw_load(
    urls: list[str], keys: list[str], bodies: list[bytes], batch: int, seconds: float, pids: list[int]
) -> dict:
    """len(keys) keep-alive connections, client i on urls[i % len(urls)] with keys[i], each sending the next request
    when its answer has arrived, for `seconds`, its bodies in turn from its own place in `bodies`; every answer must
    be 200."""
    latencies: list[float] = []
    host, port = urls[0].removeprefix("http://").split(":")
    requests = [
        (
            f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {{key}}\r\nContent-Type: application/x-npy\r\n"
            f"Accept: application/x-npy\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        for body in bodies
    ]

    async def client(url: str, key: str, stop: float, start: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        mine = [head.replace("{key}", key).encode() + body for head, body in zip(requests, bodies, strict=True)]
        j = start
        try:
            while True:
                t = time.perf_counter()
                writer.write(mine[j % len(mine)])
                j += 1
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                answer = await reader.readexactly(length)
                if head[9:12] != b"200":
                    raise RuntimeError(f"{url} answered {head[:12].decode()}: {answer[:200]!r}")
                latencies.append(time.perf_counter() - t)
                if t > stop:
                    break
        finally:
            writer.close()

    place = [i * len(bodies) // len(keys) for i in range(len(keys))]
    await asyncio.gather(
        *(client(urls[i % len(urls)], k, time.perf_counter() + 0.3, place[i]) for i, k in enumerate(keys))
    )
    latencies.clear()  # the warm-up: connections, TorchScript's profiling runs
    server, own, began = sum(map(cpu_seconds, pids)), time.process_time(), time.perf_counter()
    stop = began + seconds
    # measured from half way through each client's share: images its warm-up did not send
    later = len(bodies) // (2 * len(keys))
    await asyncio.gather(*(client(urls[i % len(urls)], k, stop, place[i] + later) for i, k in enumerate(keys)))
    elapsed = time.perf_counter() - began
    server, own = sum(map(cpu_seconds, pids)) - server, time.process_time() - own
    return {
        **summary(latencies, batch, elapsed),
        "requests_per_s": len(latencies) / elapsed,
        "server_cpu_ms": 1000 * server / max(1, len(latencies)),
        "client_cpu_ms": 1000 * own / max(1, len(latencies)),
    }


def family_cpu(root: int) -> list[int]:
    """A process and its children (the PostgreSQL server's backends), by /proc."""
    pids = [root]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def formed(url: str, before: tuple[float, float] | None = None):
    """(images, forward passes) so far, from the server's Prometheus histogram; given an earlier reading, the mean
    images per forward pass since."""
    import httpx

    text = httpx.get(url + "/metrics").text
    total = float(text.split("ini_batch_images_sum ")[1].split()[0])
    count = float(text.split("ini_batch_images_count ")[1].split()[0])
    if before is None:
        return total, count
    return (total - before[0]) / max(count - before[1], 1.0)


def cpu_per_call(fn, repeat: int = 300) -> float:
    """CPU milliseconds of one call (process time, so time waiting on a disk flush is not counted)."""
    fn()
    began = time.process_time()
    for _ in range(repeat):
        fn()
    return 1000 * (time.process_time() - began) / repeat


def parts(model: Path, images: np.ndarray, work: Path, size: int, batch: float, pg_url: str | None) -> dict:
    """serve's work per request of `size` images, each part timed in-process; the ledger and the forward pass run
    once per batch of `batch` requests (the mean the server formed), so their share per request is divided by it."""
    from stages.serving import model as served_model
    from stages.serving import payload
    from stages.serving.ledger import Answered, SqliteLedger, summarise
    from stages.serving.monitor import Monitor, Settings, calibrate

    served = served_model.load(model, "none", {}, 1)
    body, n = to_npy(images[:size]), max(1, round(batch))
    x = payload.decode(body, payload.NPY, served.info.input_shape, 1024)
    xs = np.concatenate([x] * n)
    answers = served.predict(xs)
    one = answers[:size]
    out = {
        ".npy decoding": cpu_per_call(lambda: payload.decode(body, payload.NPY, served.info.input_shape, 1024)),
        "SHA-256": cpu_per_call(lambda: payload.digest(x)),
        "forward pass": cpu_per_call(lambda: served.predict(xs), 100) / n,
        ".npy encoding": cpu_per_call(lambda: payload.encode(one, payload.NPY)),
        "JSON encoding (Accept: JSON)": cpu_per_call(lambda: payload.encode(one, None)),
    }

    def rows() -> list[Answered]:  # as serve makes them: each request's summary computed for the whole batch
        summaries = summarise(answers[: n * size], [size] * n)
        return [Answered(f"p{i % 8}", time.time(), "0" * 64, None, one, 0, summary=summaries[i]) for i in range(n)]

    sqlite = SqliteLedger(work / f"parts{size}.sqlite")
    sqlite.enrol([f"p{i}" for i in range(8)])
    out["ledger (SQLite)"] = cpu_per_call(lambda: sqlite.record(rows()), 100) / n
    sqlite.close()
    if pg_url is not None:
        from stages.serving.ledger_pg import PostgresLedger

        pg = PostgresLedger(pg_url)
        pg.enrol([f"p{i}" for i in range(8)])
        out["ledger (PostgreSQL, client side)"] = cpu_per_call(lambda: pg.record(rows()), 100) / n
        pg.close()
    settings = Settings()
    benign = images.astype(np.float32) / 255.0
    monitor = Monitor(settings, calibrate(served.predict, images[:3000], settings, "bench"), int(x[0].size))
    i = iter(range(10**9))
    repeat = 600 if size == 1 else 30

    def observe() -> None:  # 8 principals, each request distinct images
        k = next(i)
        monitor.observe(f"p{k % 8}", benign[(k * size) % (len(benign) - size) :][:size], one, time.time())

    out["monitor"] = cpu_per_call(observe, repeat)
    return out


def race(urls: list[str], key: str, body: bytes, budget: int) -> tuple[int, int]:
    """16 clients over the replicas, batch 1, until each is refused twice: (images answered, refusals)."""
    import httpx

    answered, refused = [0] * 16, [0] * 16
    headers = {"X-API-Key": key, "Content-Type": "application/x-npy", "Accept": "application/x-npy"}

    def client(i: int) -> None:
        with httpx.Client(headers=headers, timeout=30) as c:
            for j in range(4 * budget):
                r = c.post(urls[(i + j) % len(urls)] + "/v1/predict", content=body)
                if r.status_code == 200:
                    answered[i] += 1
                elif r.status_code == 429:
                    refused[i] += 1
                    if refused[i] == 2:
                        return
                else:
                    raise RuntimeError(r.text)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    return sum(answered), sum(refused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, help="undefended victim.h5 [default: a LeNet-5 on digits]")
    parser.add_argument("--ini-victim", type=Path, help="InI victim.h5, for --graphs [default: the undefended graph]")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load")
    parser.add_argument("--smoke", action="store_true", help="0.3 s loads: a CI check that it runs")
    parser.add_argument("--graphs", action="store_true", help="also every graph and runtime, beside in-process")
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)  # run the ceiling's server on this port
    parser.add_argument("--bare-http", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--bare-loop", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare is not None:
        return bare_endpoint(args.bare, args.bare_http, args.bare_loop)
    torch.set_num_threads(1)
    seconds = 0.3 if args.smoke else args.seconds
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    victim = args.victim
    if victim is None:
        data = prepare.run(dataset="sklearn-digits", out=work / "digits.h5")
        victim = train.run(dataset=str(data), out=work / "victim.h5", epochs=1, device="cpu")
    keys_file = work / "keys.toml"
    keys = [serve_key.run(f"client{i}", keys_file, budget=10**12, rate=1e9, burst=1e9, action="log") for i in range(8)]
    racer_budget = 400
    racer = serve_key.run("racer", keys_file, budget=racer_budget, rate=1e9, burst=1e9, action="log")
    # distinct images, as benign clients send them (a client's repeats would be near-duplicates to the monitor):
    # up to 10,000 of the victim's data, test split first
    prepared = _data.load(export_data(victim), splits=("test", "val", "train"))
    pool = np.concatenate([prepared.splits[s][0].numpy() for s in ("test", "val", "train")])[:10_000]
    images = pool[:64]
    model = export.run(victim=victim, format="torchscript", defense="none", out=work / "victim.pt", check_images=64)
    bodies = {b: [to_npy(pool[i : i + b]) for i in range(0, len(pool) - b + 1, b)] for b in (1, 64)}
    rows: dict[str, dict[int, dict]] = {}
    batches: dict[str, float] = {}  # serve, SQLite: requests per forward pass (the histogram counts images)

    def measure(name: str, urls: list[str], pids: list[int]) -> None:
        rows[name] = {}
        for b, body in bodies.items():
            asyncio.run(raw_load(urls, keys, body, b, min(seconds, 1.0), pids))  # warm-up: TorchScript's shapes
            before = formed(urls[0]) if name.startswith("serve") else None
            rows[name][b] = r = asyncio.run(raw_load(urls, keys, body, b, seconds, pids))
            if before is not None:  # the first replica's: each replica forms its own
                r["per_pass"] = formed(urls[0], before) / b
            if name == "serve, SQLite":
                batches[b] = r["per_pass"]
            log(
                f"{name:<42} batch {b:>2} x 8 clients: {r['requests_per_s']:8.0f} requests/s "
                f"{r['images_per_s']:8.0f} img/s p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms, server CPU "
                f"{r['server_cpu_ms']:.3f} ms/request, client CPU {r['client_cpu_ms']:.3f}"
            )

    for label, http, loop in (("bare endpoint (h11, asyncio)", "h11", "asyncio"), ("bare endpoint", "auto", "auto")):
        proc, url = start_bare(http, loop)
        try:
            measure(label, [url], [proc.pid])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    procs = []
    try:
        for level in ("full", "process"):
            proc, url = launch(model, keys_file, work / f"ledger-{level}.sqlite", "--durability", level)
            procs.append(proc)
            measure("serve, SQLite" + LEVEL[level], [url], [proc.pid])
            proc.terminate()
            proc.wait(timeout=60)
        pg_url, race_result = None, None
        try:
            import psycopg  # noqa: F401  (the ledger's driver, an optional extra)

            from stages.serving.throwaway_pg import ThrowawayPostgres

            pg = ThrowawayPostgres(fsync=True).start()
        except (ImportError, OSError, RuntimeError) as e:
            log(f"PostgreSQL rows skipped: {e}")
            pg = None
        if pg is not None:
            try:
                postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
                for level in ("full", "process"):
                    pg_url = pg.create(f"bench_{level}")
                    replicas = []
                    for i in range(2):
                        flags = ("--alerts", work / f"alerts-{level}{i}.jsonl", "--durability", level)
                        proc, url = launch(model, keys_file, pg_url, *flags)
                        procs.append(proc)
                        replicas.append((proc, url))
                    one, both = [replicas[0][0].pid], [p.pid for p, _ in replicas]
                    measure(
                        "serve, PostgreSQL, 1 replica" + LEVEL[level], [replicas[0][1]], [*one, *family_cpu(postmaster)]
                    )
                    measure(
                        "serve, PostgreSQL, 2 replicas" + LEVEL[level],
                        [u for _, u in replicas],
                        [*both, *family_cpu(postmaster)],
                    )
                    if level == "full":  # the budget race, on the default level's replicas
                        race_result = race([u for _, u in replicas], racer, bodies[1][0], racer_budget)
                        with __import__("psycopg").connect(pg_url) as db:
                            spent = db.execute("SELECT spent FROM principals WHERE name = 'racer'").fetchone()[0]
                        race_result = (*race_result, spent)
                    for proc, _ in replicas:
                        proc.terminate()
                        proc.wait(timeout=60)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(timeout=60)
                costs = {b: parts(model, pool, work, b, batches[b], pg_url) for b in bodies}
                pg.stop("immediate")
                pg._remove()
        else:
            costs = {b: parts(model, pool, work, b, batches[b], None) for b in bodies}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    local = in_process(model, images, 64, seconds)
    print(report(rows, local, costs, batches, race_result, racer_budget))
    if args.graphs:
        print(graphs_table(victim, args.ini_victim, keys_file, keys[0], work, seconds))


def report(rows: dict, local: dict, costs: dict, batches: dict, race_result, budget: int) -> str:
    ceiling = rows["bare endpoint"]
    lines = [
        "| server | batch | requests/s | img/s | p50 ms | p99 ms | server CPU ms/request | requests per forward pass "
        "| / bare endpoint | / in-process batch 64 | CPU per image, in-process batch 64 / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_image = local["cpu_ms"] / 64
    for name, loads in rows.items():
        for b, r in loads.items():
            per_pass = f"{r['per_pass']:.1f}" if "per_pass" in r else ""
            lines.append(
                f"| {name} | {b} | {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['server_cpu_ms']:.3f} | {per_pass} | "
                f"{r['requests_per_s'] / ceiling[b]['requests_per_s']:.2f} | "
                f"{r['images_per_s'] / local['images_per_s']:.2f} | {per_image / (r['server_cpu_ms'] / b):.2f} |"
            )
    lines.append(
        f"| in-process forward pass | 64 | | {local['images_per_s']:,.0f} | | | {local['cpu_ms']:.3f} | | | 1.00 "
        "| 1.00 |"
    )
    if "serve, PostgreSQL, 2 replicas" in rows:
        one, two = rows["serve, PostgreSQL, 1 replica"], rows["serve, PostgreSQL, 2 replicas"]
        lines.append("")
        lines.append(
            "2 replicas / 1 replica on PostgreSQL: "
            + ", ".join(f"batch {b} {two[b]['images_per_s'] / one[b]['images_per_s']:.2f}x" for b in one)
            + f" (on {os.cpu_count()} cores, shared with the clients and the database)"
        )
    for b, parts in costs.items():
        served, http = rows["serve, SQLite"][b]["server_cpu_ms"], ceiling[b]["server_cpu_ms"]
        lines += [
            "",
            f"serve's CPU per request of {b} image(s), 8 clients, {batches[b]:.1f} requests per forward pass:",
            "| part | CPU ms/request | share of serve (SQLite) |",
            "|---|---|---|",
            f"| HTTP and framework (the bare endpoint's server CPU) | {http:.3f} | {http / served:.0%} |",
        ]
        accounted = http
        for name, ms in parts.items():
            lines.append(f"| {name} | {ms:.3f} | {ms / served:.0%} |")
            if "JSON" not in name and "PostgreSQL" not in name:
                accounted += ms
        rest = served - accounted
        lines.append(f"| the rest (keys, admission, batcher, threads) | {rest:.3f} | {rest / served:.0%} |")
        lines.append(f"| serve, SQLite, measured | {served:.3f} | 100% |")
    if race_result is not None:
        answered, refused, spent = race_result
        lines += [
            "",
            f"budget {budget} raced by 16 clients over 2 replicas: {answered} images answered, {refused} refusals, "
            f"{spent} spent in the ledger ({'exact' if answered == spent == budget else 'NOT EXACT'})",
        ]
    return "\n".join(lines)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def export_data(victim: Path) -> str:
    _, info = _victim.load(victim)
    return str(json.loads(info.provenance["params"])["dataset"])


def table(rows: list[dict]) -> str:
    lines = [
        "| graph | runtime | batch | clients | served img/s | p50 ms | p99 ms | server CPU ms/request | client CPU "
        "ms/request | in-process img/s | served / in-process batch 64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ceiling = {
        (r["graph"], r["runtime"]): r["local"]["images_per_s"] for r in rows if r["batch"] == 64 and r["clients"] == 1
    }
    for r in rows:
        s, top = r["served"], ceiling.get((r["graph"], r["runtime"]), float("nan"))
        lines.append(
            f"| {r['graph']} | {r['runtime']} | {r['batch']} | {r['clients']} | {s['images_per_s']:,.0f} | "
            f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['server_cpu_ms']:.2f} | {s['client_cpu_ms']:.2f} | "
            f"{r['local']['images_per_s']:,.0f} | "
            f"{s['images_per_s'] / top:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
