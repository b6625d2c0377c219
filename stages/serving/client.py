"""The victim behind a prediction API (`serve`), as a thief meets it: `open_target` reads the API's model card and
the key's budget and returns a graph-like callable, images -> probabilities, that posts to /v1/predict; `steal`
puts it inside the same budgeted BlackBox as a local victim, so accounting and the transfer set are the same.

The client (httpx) waits out 429 and 503 answers for their Retry-After, resends a request whose connection broke
with the same Idempotency-Key (the server answers it from its ledger instead of counting it twice), and ends the
attack (BudgetExhausted) when the key's budget is spent or the key is blocked.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.params import UserError
from stages.attacks.blackbox import BudgetExhausted
from stages.serving.payload import NPY, to_npy
from stages.training.victim import VictimInfo

TIMEOUT = 120.0  # seconds for one request: a busy server answers a large batch late, not never
RECONNECT = 60.0  # seconds a broken connection is retried before the run fails (a server restart fits)


class Endpoint:
    """`endpoint(images)`: float images in [0, 1], (N, C, H, W) -> probabilities (N, K), over HTTP."""

    def __init__(self, url: str, key: str, max_images: int):
        import httpx

        self._httpx = httpx
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, headers={"X-API-Key": key}, timeout=TIMEOUT)
        self.max_images = max_images
        self.waited = 0.0  # seconds spent honouring Retry-After
        self.retried = 0  # requests resent after a broken connection

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().numpy()
        grid = np.rint(x * 255.0)
        if np.abs(grid - x * 255.0).max(initial=0.0) < 1e-3:  # 8-bit images travel as uint8: a quarter of the bytes
            x = grid.astype(np.uint8)
        parts = [self._post(x[i : i + self.max_images]) for i in range(0, len(x), self.max_images)]
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0)

    def _post(self, x: np.ndarray) -> np.ndarray:
        body, request_id = to_npy(x), uuid.uuid4().hex
        headers = {"Content-Type": NPY, "Accept": NPY, "Idempotency-Key": request_id}
        broken_since: Optional[float] = None
        while True:
            try:
                r = self._client.post("/v1/predict", content=body, headers=headers)
            except self._httpx.TransportError as e:
                broken_since = broken_since or time.monotonic()
                if time.monotonic() - broken_since > RECONNECT:
                    raise UserError(f"{self.url}: no answer for {RECONNECT:.0f} s ({type(e).__name__})") from None
                self.retried += 1
                time.sleep(0.5)
                continue
            broken_since = None
            if r.status_code == 200:
                return np.load(io.BytesIO(r.content), allow_pickle=False)
            message = _error(r)
            if r.status_code in (429, 503) and "retry-after" in r.headers:
                wait = float(r.headers["retry-after"])
                self.waited += wait
                time.sleep(wait)
                continue
            if r.status_code in (429, 403):  # the budget is spent (no Retry-After), or the key is blocked
                raise BudgetExhausted(f"{self.url}: {message}")
            raise UserError(f"{self.url}: {r.status_code} {message}")

    def get(self, path: str) -> dict:
        try:
            r = self._client.get(path)
        except self._httpx.TransportError as e:
            raise UserError(f"{self.url}: cannot connect ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise UserError(f"{self.url}{path}: {r.status_code} {_error(r)}")
        return r.json()


def _error(r) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text[:200]


def open_target(url: str, key: Optional[str], budget: int) -> tuple[Endpoint, VictimInfo, int]:
    """The endpoint, the victim as its model card declares it, and the budget cut to what the key has left."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--target {url!r}: give the API's URL, http://HOST:PORT")
    if not key:
        raise UserError("--target needs --api-key (or $INI_API_KEY)")
    endpoint = Endpoint(url, key, 1)
    card = endpoint.get("/v1/model")
    left = int(endpoint.get("/v1/usage")["remaining"])
    if left < 1:
        raise UserError(f"{url}: the key's budget is spent")
    try:
        endpoint.max_images = int(card["max_images"])
        sha = str(card["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{url}/v1/model: not an ini-toolkit model card (lacks {e})") from None
    info = VictimInfo.from_card(
        {**card, "objective": "?", "defense": "served"}, Path(url), sha, f"{url}/v1/model: the model card"
    )
    return endpoint, info, min(budget, left)
