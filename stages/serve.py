"""Serve a defended model behind an HTTP prediction API (FastAPI on uvicorn): principals with hashed keys, budgets
and rate limits, micro-batched answers recorded in a crash-safe SQLite ledger, and extraction alerts (volume, share
of OOD-looking answers, PRADA) calibrated on benign traffic; the machinery lives in `stages/serving/`.

Reads victim.pt, victim.onnx or victim.h5 (+ --defense), a keys file and benign images to calibrate on; writes the
ledger (and alert JSON lines beside it). Prints its URL on stdout once it accepts connections.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
import uvicorn
from rich.console import Console

from models.params import UserError
from stages.core import options as _options
from stages.core.artifacts import describe_inputs, prepare_output, versions
from stages.data import prepared as _data
from stages.deploy import defense as _defense
from stages.serving import app as api
from stages.serving import keys as principals_file
from stages.serving import model as served_model
from stages.serving import watermark as _watermark
from stages.serving.backends import open_ledger
from stages.serving.detectors import DUPLICATE_DISTANCE, GlobalSettings, check_prior
from stages.serving.ledger import POSTGRES
from stages.serving.monitor import Monitor, Settings, calibrate
from stages.serving.monitor import check as check_settings

console = Console(stderr=True)


def run(
    model: Annotated[
        Path,
        typer.Option(
            help="victim.pt (TorchScript), victim.onnx or victim.h5 (with --defense); only load files you trust."
        ),
    ],
    keys: Annotated[Path, typer.Option(help="Principals' keys file (TOML), made by `serve-key`.")] = Path("keys.toml"),
    ledger: Annotated[
        str,
        typer.Option(
            help="Query ledger: a SQLite file (WAL; one server per file), or postgresql://... (shared by every "
            "replica pointed at it); a restart resumes it."
        ),
    ] = "artifacts/ledger.sqlite",
    durability: Annotated[
        Literal["full", "process"],
        typer.Option(
            help="How far each batch's commit goes before its answers leave: full, to the disk (SQLite synchronous "
            "FULL, PostgreSQL synchronous_commit on); process, to the operating system or the database server "
            "(SQLite synchronous NORMAL, PostgreSQL synchronous_commit off): a kill -9 of serve loses nothing, a "
            "power loss (SQLite) or a database server crash (PostgreSQL) can lose the last commits. "
            "docs/serving.md, Durability."
        ),
    ] = "full",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port (0: any free port; the URL printed says which).")
    ] = 8000,
    defense: _options.DefenseName = "none",
    defense_param: _options.DefenseParams = None,
    calibration_data: Annotated[
        Optional[str],
        typer.Option(
            help="Benign images the alert thresholds are calibrated on: a prepared dataset [default: the victim's]."
        ),
    ] = None,
    calibration_split: Annotated[
        Literal["train", "val", "test"],
        typer.Option(help="Split of --calibration-data (val: held out from training and from a test-split replay)."),
    ] = "val",
    ood_quantile: Annotated[
        float, typer.Option(min=1e-4, max=0.5, help="Share of benign answers the OOD threshold lets look OOD.")
    ] = 0.01,
    ood_threshold: Annotated[
        Optional[float],
        typer.Option(min=0.0, max=1.0, help="Top probability below which an answer looks OOD [default: calibrated]."),
    ] = None,
    prada_delta: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="PRADA's Shapiro-Wilk threshold [default: calibrated].")
    ] = None,
    ood_window: Annotated[int, typer.Option(min=10, help="Answers per principal the OOD share is read over.")] = 200,
    min_images: Annotated[int, typer.Option(min=1, help="Answers before a principal's OOD share is judged.")] = 50,
    alpha: Annotated[
        float, typer.Option(min=1e-15, max=0.5, help="False-alert probability of one judgement of a benign OOD window.")
    ] = 1e-6,
    volume_limit: Annotated[
        int, typer.Option(min=1, help="Images per --volume-window before a volume alert.")
    ] = 10_000,
    volume_window: Annotated[float, typer.Option(min=1.0, help="Seconds of the volume window.")] = 3600.0,
    duplicate_distance: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="RMS distance per pixel (images in [0, 1]) within which a query, at a shift of up to 2 pixels, "
            "is a near-duplicate of one of the key's last --ood-window distinct queries: counted once by the OOD "
            "share, class, volume and global signals (0: every query counts).",
        ),
    ] = DUPLICATE_DISTANCE,
    max_images: Annotated[int, typer.Option(min=1, help="Images per request (413 beyond).")] = 1024,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Request body limit in MB (413 beyond).")] = 16.0,
    batch_images: Annotated[int, typer.Option(min=1, help="Images per forward pass the micro-batcher aims at.")] = 256,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="How long a batch waits for companions of its first request (less once it holds as many "
            "requests as the last batch).",
        ),
    ] = 2.0,
    global_rate: Annotated[
        float, typer.Option(min=0.0, help="Images per second over all principals (0: no global limit).")
    ] = 0.0,
    max_pending: Annotated[int, typer.Option(min=1, help="Images admitted and not yet answered (503 beyond).")] = 8192,
    throttle_factor: Annotated[
        float, typer.Option(help="A throttled principal's rate, as a share of its own (0 < f <= 1).")
    ] = 0.1,
    global_window: Annotated[
        float, typer.Option(help="Seconds of traffic, over all principals, the global alerts read.")
    ] = 3600.0,
    link_alpha: Annotated[
        float,
        typer.Option(help="Under a global alert, a key whose own answers stand out at this level is linked to it."),
    ] = 1e-3,
    global_action: Annotated[
        Literal["log", "throttle", "block"],
        typer.Option(help="On a global alert, for the keys it links: log, throttle or block them."),
    ] = "log",
    alerts: Annotated[
        Optional[Path],
        typer.Option(
            help="Alert JSON lines, appended [default: the SQLite ledger's path with .alerts.jsonl; none for "
            "PostgreSQL, whose alerts table and stderr hold them]."
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(min=1, help="Threads of the forward pass, and of the monitor's matrix products (BLAS).")
    ] = 1,
    watermark_key: Annotated[
        Optional[Path],
        typer.Option(
            help="Mark answers with the watermark under this secret key file (created 0600 when absent), outside "
            "the served graph, and keep each marked answer with its image and principal in the ledger; `verify` "
            "reads them. Only the key's fingerprint is recorded."
        ),
    ] = None,
) -> None:
    """Serve the defended model over HTTP with budgets, a query ledger and extraction alerts."""
    defense_params = _defense.parse(defense, defense_param)
    if defense == "watermark":
        raise UserError("serve marks answers with --watermark-key FILE, outside the served graph, not --defense")
    shared = ledger.startswith(POSTGRES)
    if not shared:
        ledger = prepare_output(Path(ledger))
        alerts = alerts or ledger.with_suffix(".alerts.jsonl")
    alerts = prepare_output(alerts) if alerts is not None else None
    table = principals_file.read(keys)
    served = served_model.load(model, defense, defense_params, threads)
    blas = limit_blas(threads)  # noqa: F841  (the limit holds while the object lives: the whole run)
    settings = Settings(
        ood_quantile=ood_quantile,
        ood_window=ood_window,
        min_images=min_images,
        alpha=alpha,
        volume_limit=volume_limit,
        volume_window=volume_window,
        duplicate_distance=duplicate_distance,
    )
    global_settings = GlobalSettings(window=global_window, alpha=alpha, link_alpha=link_alpha, min_images=min_images)
    check_settings(settings, global_settings, throttle_factor)
    classes = len(served.info.classes)
    priors = {
        p.name: check_prior(p.prior, classes, f"{keys}: principal {p.name!r}")
        for p in table.values()
        if p.prior is not None
    }
    listener = _listen(host, port)  # before calibration: a port in use fails in one line before any work
    book = open_ledger(ledger, durability)  # so does an unreachable or foreign database

    source = calibration_data or served.info.dataset_path
    benign = _data.load(source, splits=(calibration_split,))
    images = benign.splits[calibration_split][0]
    if tuple(images.shape[1:]) != tuple(served.info.input_shape):
        raise UserError(
            f"--calibration-data {benign.path} holds {list(images.shape[1:])} images; the model takes "
            f"{list(served.info.input_shape)}"
        )
    labels = benign.splits[calibration_split][1].numpy()
    calibration = calibrate(
        served.predict, images.numpy(), settings, f"{benign.path}:{calibration_split}", labels=labels
    )
    if ood_threshold is not None:
        calibration.ood_threshold = ood_threshold
    if prada_delta is not None:
        calibration.prada_delta = prada_delta
    monitor = Monitor(settings, calibration, int(images[0].numel()), priors, global_settings)

    book.put_meta(
        {
            f"run.{time.time():.0f}" + (f".{socket.gethostname()}.{os.getpid()}" if shared else ""): dict(
                model=str(model),
                sha256=served.info.sha256,
                durability=durability,
                defense=served.info.baked_defense,
                defense_params=defense_params,
                inputs=describe_inputs([model, keys, benign.path]),
                **monitor.describe(),
                versions=versions(),
            )
        }
    )
    options = api.Options(
        max_images=max_images,
        max_body=int(max_body_mb * 2**20),
        batch_images=batch_images,
        max_wait=max_wait_ms / 1000.0,
        global_rate=global_rate,
        global_burst=global_rate,
        max_pending=max_pending,
        throttle_factor=throttle_factor,
        global_action=global_action,
        alerts_path=alerts,
    )
    service = api.Service(served, table, book, monitor, options)
    if watermark_key is not None:
        service.marker = _watermark.Marker(watermark_key, calibration.ood_threshold)
        book.put_meta({f"watermark.{time.time():.0f}": service.marker.describe()})
    console.print(
        f"serve: {served.info.arch} on {served.info.dataset} ({served.runtime}, defense {served.info.baked_defense}), "
        f"{len(table)} principals, ledger {book.name if shared else ledger}"
    )
    console.print(
        f"calibrated on {calibration.images:,} benign images ({calibration.source}): an answer looks OOD "
        f"below top probability {calibration.ood_threshold:.4f} ({calibration.benign_ood_share:.2%} of them); "
        f"PRADA alerts below W = {calibration.prada_delta:.3f} (benign minimum "
        f"{calibration.benign_prada_min:.3f}); {_steps_text(calibration.step_radii)}"
    )
    config = uvicorn.Config(api.build(service), log_level="warning", access_log=False, timeout_graceful_shutdown=30)
    try:
        _Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down gracefully on: the run is complete
        pass


def limit_blas(threads: int):
    """Cap numpy's BLAS at `threads` threads. The monitor's matrix products are small: on two threads they take
    about twice the CPU on a machine whose cores are busy (measured: 9.0-9.3 against 4.6 ms a request of 64)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _steps_text(radii: list[float]) -> str:
    read = [r for r in radii if r > 0]
    if not read:
        return "no step radius (too few benign images per class: cohort_steps never alerts)"
    unread = f", none for {len(radii) - len(read)} classes with too few benign images" if len(read) < len(radii) else ""
    return f"a young key's query is a step within L2 {min(read):.2f}-{max(read):.2f} of an earlier one{unread}"


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol must say IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections of
    such sockets, and without it a kept-alive connection waits out the client's delayed ACK (40 ms) per answer."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listener


class _Server(uvicorn.Server):
    """uvicorn's server, printing the URL on stdout once it accepts connections."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = sockets[0].getsockname()[:2]
            print(f"http://{host}:{port}", flush=True)
