"""The victim behind a prediction API (`serve`), as a thief meets it: `open_target` reads the API's model card and
the key's budget and returns a graph-like callable, images -> probabilities, that posts to /v1/predict; `steal`
puts it inside the same budgeted BlackBox as a local victim, so accounting and the transfer set are the same.

The client (httpx) waits out 429 and 503 answers for their Retry-After, resends a request whose connection broke
with the same Idempotency-Key (the server answers it from its ledger instead of counting it twice), and ends the
attack (BudgetExhausted) when the key's budget is spent or the key is blocked.

A thief who knows the monitor (`steal --target-move`) can also spread its queries over several keys (sybil: each
key answers at most `per_key` images, a blocked key is dropped for the next), dilute them with benign-looking filler
(mix: that share of every request, drawn from its own most confidently answered queries, shifted and noised, the
least answered classes first, and not returned to the attack), and keep under a rate (paced: images per second).
Filler counts against the keys' budgets.
"""

from __future__ import annotations

import io
import math
import time
import uuid
from dataclasses import asdict, dataclass
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


FILLER_CONFIDENCE = 0.9  # a query answered at least this confidently may be reused, varied, as filler
FILLER_KEPT = 2000  # confidently answered queries kept to draw filler from


@dataclass(frozen=True)
class Moves:
    """How a monitor-aware thief spends its keys (0: the move is off)."""

    per_key: int = 0  # sybil: images (filler included) each key is answered at most
    mix: float = 0.0  # share of every request that is filler
    rate: float = 0.0  # paced: images per second, filler included

    def describe(self) -> dict:
        return asdict(self)


def parse_moves(specs: Optional[list[str]]) -> Moves:
    """`sybil=PER_KEY`, `mix=SHARE`, `paced=RATE` (repeatable), or a one-line error."""
    values = {}
    for spec in specs or []:
        name, _, value = spec.partition("=")
        field = {"sybil": "per_key", "mix": "mix", "paced": "rate"}.get(name.strip())
        try:
            number = int(value) if field == "per_key" else float(value)
        except ValueError:
            field = None
        if field is None:
            raise UserError(f"--target-move {spec!r}: give sybil=PER_KEY, mix=SHARE or paced=RATE")
        values[field] = number
    moves = Moves(**values)
    if moves.per_key < 0 or not 0 <= moves.mix < 1 or moves.rate < 0:
        raise UserError("--target-move: sybil >= 1 image per key, 0 <= mix < 1, paced > 0 images per second")
    return moves


class Endpoint:
    """`endpoint(images)`: float images in [0, 1], (N, C, H, W) -> probabilities (N, K), over HTTP."""

    def __init__(self, url: str, key: str, max_images: int, keys: Optional[list[str]] = None, moves: Moves = Moves()):
        import httpx

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.keys = keys or [key]
        self.key = 0  # index of the key in use
        self._client = httpx.Client(base_url=self.url, headers={"X-API-Key": self.keys[0]}, timeout=TIMEOUT)
        self.max_images = max_images
        self.moves = moves
        self.waited = 0.0  # seconds spent honouring Retry-After
        self.retried = 0  # requests resent after a broken connection
        self.on_key = 0  # images the key in use was answered
        self.filler_sent = 0
        self.blocked_keys = 0
        self.sent = 0
        self.started = time.monotonic()
        self._confident: list[tuple[np.ndarray, int]] = []  # (image, class) answered above FILLER_CONFIDENCE
        self._classes: Optional[np.ndarray] = None  # answers per class on the key in use

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().numpy()
        grid = np.rint(x * 255.0)
        if np.abs(grid - x * 255.0).max(initial=0.0) < 1e-3:  # 8-bit images travel as uint8: a quarter of the bytes
            x = grid.astype(np.uint8)
        if self.moves == Moves():
            parts = [self._post(x[i : i + self.max_images]) for i in range(0, len(x), self.max_images)]
        else:
            parts, start = [], 0
            while start < len(x):
                n = self._room()
                parts.append(self._post_moved(x[start : start + n]))
                start += n
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0)

    def _room(self) -> int:
        """Real queries the next request carries: what the key in use has left, less the filler share."""
        cap = self.max_images
        if self.moves.per_key:
            while self.moves.per_key - self.on_key < 1 / (1 - self.moves.mix):
                self._next_key()
            cap = min(cap, self.moves.per_key - self.on_key)
        return max(1, int(cap * (1 - self.moves.mix)))

    def _next_key(self) -> None:
        if self.key + 1 >= len(self.keys):
            raise BudgetExhausted(f"{self.url}: every one of the {len(self.keys)} keys is spent or blocked")
        self.key += 1
        self.on_key, self._classes = 0, None
        self._client.headers["X-API-Key"] = self.keys[self.key]

    def _post_moved(self, x: np.ndarray) -> np.ndarray:
        fill = self._filler(math.ceil(len(x) * self.moves.mix / (1 - self.moves.mix)) if self.moves.mix else 0, x)
        if len(fill) and fill.dtype != x.dtype:  # 8-bit filler beside float queries (JBDA's steps): both in [0, 1]
            x, fill = _unit(x), _unit(fill)
        batch = np.concatenate([x, fill]) if len(fill) else x
        order = np.random.default_rng(self.sent).permutation(len(batch))  # filler interleaved, not appended
        if self.moves.rate:
            time.sleep(max(0.0, (self.sent + len(batch)) / self.moves.rate - (time.monotonic() - self.started)))
        while True:
            try:
                answers = self._post(batch[order])
                break
            except BudgetExhausted:
                if not self.moves.per_key:
                    raise
                self.blocked_keys += 1
                self._next_key()
        back = np.empty_like(answers)
        back[order] = answers
        self.sent += len(batch)
        self.on_key += len(batch)
        self.filler_sent += len(fill)
        if self._classes is None:
            self._classes = np.zeros(back.shape[1])
        self._classes += np.bincount(back.argmax(1), minlength=back.shape[1])
        confident = back[: len(x)].max(1) >= FILLER_CONFIDENCE
        for image, c in zip(x[confident], back[: len(x)][confident].argmax(1), strict=False):
            if len(self._confident) < FILLER_KEPT:
                self._confident.append((image, int(c)))
        return back[: len(x)]

    def _filler(self, n: int, x: np.ndarray) -> np.ndarray:
        """n benign-looking images: confidently answered earlier queries, the least answered classes first, each
        shifted by up to 2 pixels with mild noise (before any confident answer: none)."""
        if n == 0 or not self._confident:
            return x[:0]
        rng = np.random.default_rng(self.sent + 1)
        by_class: dict[int, list[np.ndarray]] = {}
        for image, c in self._confident:
            by_class.setdefault(c, []).append(image)
        counts = dict.fromkeys(by_class, 0.0)
        if self._classes is not None:
            counts = {c: float(self._classes[c]) for c in by_class}
        out = []
        for _ in range(n):
            c = min(counts, key=counts.get)
            counts[c] += 1
            image = by_class[c][int(rng.integers(len(by_class[c])))]
            shifted = np.roll(image, tuple(int(v) for v in rng.integers(-2, 3, 2)), axis=(-2, -1))
            if shifted.dtype == np.uint8:
                varied = np.clip(shifted.astype(np.int16) + rng.integers(-12, 13, shifted.shape), 0, 255)
                out.append(varied.astype(np.uint8))
            else:
                out.append(np.clip(shifted + rng.uniform(-0.05, 0.05, shifted.shape), 0, 1).astype(shifted.dtype))
        if len({image.dtype for image in out}) > 1:  # drawn from 8-bit and float queries: all in [0, 1]
            out = [_unit(image) for image in out]
        return np.stack(out)

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


def _unit(images: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1] (8-bit ones divided by 255)."""
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def _error(r) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text[:200]


def open_target(url: str, key: Optional[str], budget: int, moves: Moves = Moves()) -> tuple[Endpoint, VictimInfo, int]:
    """The endpoint, the victim as its model card declares it, and the budget cut to what the key has left (with
    sybil, what the keys have left; with mix, less the filler)."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--target {url!r}: give the API's URL, http://HOST:PORT")
    if not key:
        raise UserError("--target needs --api-key (or $INI_API_KEY)")
    keys = [k.strip() for k in key.split(",") if k.strip()] if moves.per_key else [key]
    endpoint = Endpoint(url, keys[0], 1, keys, moves)
    card = endpoint.get("/v1/model")
    left = int(endpoint.get("/v1/usage")["remaining"])
    if moves.per_key:
        left = min(left, moves.per_key) + moves.per_key * (len(keys) - 1)  # the others: checked as they are used
    left = int(left * (1 - moves.mix))
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
