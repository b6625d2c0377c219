"""What the serving tests share: the world a server serves (a small victim and a keys file of principals), and a
burst of small requests that a killed server breaks off (the kill -9 tests of one server and of a replica pair)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager

import h5py
import httpx
import numpy as np
from tiny_data import write_dataset

from stages import serve_key, train
from stages.serving.payload import NPY, to_npy


def served_world(root: Path, principals: dict[str, tuple], split: int = 300) -> dict:
    """A LeNet-5 victim trained 3 epochs on 28x28 bar images (600 train, `split` val and test) and a keys file with
    each principal (name: serve-key's budget, rate, burst, action[, prior]); the test split's images and labels."""
    data = write_dataset(root / "bars.h5", name="bars", sizes={"train": 600, "val": split, "test": split})
    victim = train.run(dataset=str(data), out=root / "victim.h5", epochs=3, batch_size=32, device="cpu")
    keys = root / "keys.toml"
    tokens = {name: serve_key.run(name, keys, *spec) for name, spec in principals.items()}
    with h5py.File(data, "r") as f:
        test, labels = f["test/images"][()], f["test/labels"][()]
    return dict(root=root, data=data, victim=victim, keys=keys, tokens=tokens, test=test, labels=labels)


def burst_then_kill(
    client: Callable[[], ContextManager[httpx.Client]],
    x: np.ndarray,
    kill: Callable[[], None],
    requests: int,
    answered_first: int = 100,
) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """8 clients each send up to `requests` requests of 1-8 images with fresh Idempotency-Keys; once
    `answered_first` are answered (or 30 s passed), `kill()` runs. Returns the answered requests (id -> images
    received) and those the kill broke off (id -> their images, to resend)."""
    received: dict[str, int] = {}
    broken: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    def burst(i: int) -> None:
        with client() as c:
            for j in range(requests):  # bounded; the kill ends it sooner
                images, request_id = x[(i * 7 + j) % 290 : (i * 7 + j) % 290 + 1 + j % 8], uuid.uuid4().hex
                try:
                    r = c.post(
                        "/v1/predict",
                        content=to_npy(images),
                        headers={"Content-Type": NPY, "Idempotency-Key": request_id},
                    )
                except httpx.TransportError:
                    with lock:
                        broken[request_id] = images
                    return
                assert r.status_code == 200, r.text
                with lock:
                    received[request_id] = len(r.json()["answers"])

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(burst, i) for i in range(8)]
        deadline = time.monotonic() + 30
        while len(received) < answered_first and time.monotonic() < deadline:
            time.sleep(0.01)
        kill()
        for f in futures:
            f.result(timeout=30)
    return received, broken
