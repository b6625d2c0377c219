"""`python cli.py serve ...` started as a subprocess on a free loopback port, and the URL it prints once it accepts
connections: how the loopback benchmark, the alert experiments and the tests run a real server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Union


def launch(
    model: Path,
    keys: Path,
    ledger: Union[Path, str],
    *flags: str,
    stderr: Union[int, IO] = subprocess.DEVNULL,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """The server process (one torch thread) and its URL; RuntimeError when no URL came within `timeout` seconds."""
    # the CLI's own file, wherever it is installed (a checkout or site-packages), found without importing it
    cli = importlib.util.find_spec("cli").origin
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            cli,
            "serve",
            "--model",
            str(model),
            "--keys",
            str(keys),
            "--ledger",
            str(ledger),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=timeout)
    if not line or not line[0].startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"serve did not start for {model} (printed {line[:1]})")
    return proc, line[0].strip()
