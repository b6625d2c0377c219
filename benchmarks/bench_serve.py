"""Loopback benchmark of `serve`: images/s and p50/p99 latency at request batch 1 and 64, with 1 and 8 concurrent
clients, for the undefended, InI and MAD graphs, served from TorchScript and from ONNX Runtime, beside the
in-process forward pass of the same file (the ceiling a server can approach).

    python benchmarks/bench_serve.py [--victim victim.h5] [--ini-victim victim-ini.h5] [--seconds 3] [--smoke]

Without --victim it trains a LeNet-5 on sklearn's digits for one epoch (offline, a minute); without --ini-victim
the InI row serves the undefended victim's graph, which is what InI deploys (its protection is in the weights: the
same architecture, one plain forward pass). Each server is `python cli.py serve` in its own process with one
forward thread, its clients asyncio httpx in this process; every request goes to 127.0.0.1 and every load lasts
`--seconds`. The target of micro-batching: 8 clients of batch 1 served at half the in-process batch-64 rate or more.
Throughput on a shared machine depends on the share of CPU it gets, so the table also gives the server's and the
clients' CPU time per request (the server's read from /proc), which do not.
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

from stages import export, prepare, serve_key, train  # noqa: E402
from stages.data import prepared as _data  # noqa: E402
from stages.deploy import onnx_export as _onnx  # noqa: E402
from stages.serving.launch import launch  # noqa: E402
from stages.training import jit as _jit  # noqa: E402
from stages.training import victim as _victim  # noqa: E402

LOADS = ((1, 1), (1, 8), (64, 1), (64, 8))  # (images per request, concurrent clients)


def start(model: Path, keys: Path, ledger: Path) -> tuple[subprocess.Popen, str]:
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
    latencies, began = [], time.perf_counter()
    while time.perf_counter() - began < seconds:
        t = time.perf_counter()
        forward(x)
        latencies.append(time.perf_counter() - t)
    return summary(latencies, batch, time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, help="undefended victim.h5 [default: a LeNet-5 on digits]")
    parser.add_argument("--ini-victim", type=Path, help="InI victim.h5 [default: the undefended graph]")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load")
    parser.add_argument("--smoke", action="store_true", help="0.3 s loads, TorchScript only: a CI check that it runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds = 0.3 if args.smoke else args.seconds
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    victim = args.victim
    if victim is None:
        data = prepare.run(dataset="sklearn-digits", out=work / "digits.h5")
        victim = train.run(dataset=str(data), out=work / "victim.h5", epochs=1, device="cpu")
    keys = work / "keys.toml"
    key = serve_key.run("bench", keys, budget=10**12, rate=1e9, burst=1e9, action="log")
    graphs = {"undefended": (victim, "none"), "InI": (args.ini_victim or victim, "none"), "MAD": (victim, "mad")}
    formats = ("torchscript",) if args.smoke else ("torchscript", "onnx")
    rows = []
    for name, (source, defense) in graphs.items():
        images = _data.load(export_data(source), splits=("test",)).splits["test"][0][:64].numpy()
        for fmt in formats:
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
                    print(
                        f"{name:<10} {fmt:<11} batch {batch:>2} clients {clients}: {served['images_per_s']:9.0f} img/s "
                        f"p50 {served['p50_ms']:6.2f} ms p99 {served['p99_ms']:6.2f} ms server CPU "
                        f"{served['server_cpu_ms']:.2f} ms/request | in-process "
                        f"{local['images_per_s']:9.0f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(table(rows))


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
