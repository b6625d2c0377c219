"""The FastAPI application: authentication, admission (budget, rate, global limits), micro-batched answers
recorded in the ledger before they leave, extraction monitoring in its own thread, Prometheus metrics.

Admission runs on the event loop, so budget reservations never race; the forward pass and the ledger's
transaction run on the batch worker thread; the monitor consumes answered batches on a third thread and its
alerts act back on the loop (throttle: the principal's rate times `throttle_factor`; block: 403 from then on).
Until a key's first `min_images` answers are judged, its answers wait for the monitor before they leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from stages.serving import payload
from stages.serving.batcher import Batcher, Job
from stages.serving.keys import ACTIONS, Authenticator, Principal
from stages.serving.ledger import Answered, Debit, Ledger, LedgerUnavailable, summarise
from stages.serving.limits import Budget, TokenBucket
from stages.serving.model import Served
from stages.serving.monitor import Monitor
from stages.serving.payload import ApiError

STATE_OF_ACTION = {"log": None, "throttle": "throttled", "block": "blocked"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
REFUSED = {  # a debit the ledger refused at commit (another replica spent the budget, or blocked the principal)
    "budget": (429, "budget: spent meanwhile (a lifetime budget: waiting does not help)"),
    "blocked": (403, "blocked after an extraction alert"),
    "duplicate": (409, "a request with this Idempotency-Key was being answered; resend it to get its answers"),
}


@dataclass
class Options:
    max_images: int = 1024  # per request (413 beyond)
    max_body: int = 16 * 2**20  # bytes per request (413 beyond)
    batch_images: int = 256  # images per forward pass the batcher aims at
    max_wait: float = 0.002  # seconds the batcher waits for companions of a lone request
    global_rate: float = 0.0  # images per second over all principals (0: no limit)
    global_burst: float = 0.0
    max_pending: int = 8192  # images admitted and not yet answered (503 beyond)
    throttle_factor: float = 0.1
    global_action: str = "log"  # on a global alert, for the keys it links: log, throttle or block
    alerts_path: Optional[Path] = None  # JSON lines, appended


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ini_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.images = Counter("ini_images_answered", "Images answered", registry=r)
        self.latency = Histogram(
            "ini_predict_seconds",
            "Latency of answered predict requests",
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.batch = Histogram(
            "ini_batch_images",
            "Images per forward pass",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.spent = Gauge("ini_principal_spent_images", "Images spent per principal", ["principal"], registry=r)
        self.alerts = Counter("ini_alerts", "Extraction alerts", ["principal", "signal"], registry=r)


class Service:
    """Everything a request touches, owned by the event loop (the monitor thread reaches it via
    call_soon_threadsafe)."""

    marker = None  # a watermark.Marker when `serve --watermark-key` marks answers

    def __init__(
        self, served: Served, principals: dict[str, Principal], ledger: Ledger, monitor: Monitor, options: Options
    ):
        self.served, self.ledger, self.monitor, self.options = served, ledger, monitor, options
        self.auth = Authenticator(principals)
        self.metrics = Metrics()
        now = time.monotonic()
        spent = ledger.enrol([p.name for p in principals.values()])
        self.principals = {p.name: p for p in principals.values()}
        self.budgets = {p.name: Budget(p.budget, spent[p.name][0]) for p in principals.values()}
        self.states = {p.name: spent[p.name][1] for p in principals.values()}
        self.buckets = {p.name: TokenBucket(self._rate(p), p.burst, now) for p in principals.values()}
        self._spent_gauge = {name: self.metrics.spent.labels(name) for name in self.budgets}  # looked up once
        for name, budget in self.budgets.items():
            self._spent_gauge[name].set(budget.spent)
        self.global_bucket = (
            TokenBucket(options.global_rate, max(options.global_burst, 1.0), now) if options.global_rate > 0 else None
        )
        self.seen = {p.name: spent[p.name][0] for p in principals.values()}  # answers the monitor has judged
        # answers this process sent, in the same count (a shared ledger's spend includes other replicas' answers,
        # which this monitor never sees: judgement waits for this replica's own)
        self.answered = dict(self.seen)
        self.waiting: dict[str, list[tuple[int, asyncio.Future]]] = {}  # requests held for their judgement
        self._resume(spent)
        self.pending = 0
        self.in_flight: set[tuple[str, str]] = set()
        self.batcher = Batcher(self._answer, options.batch_images, options.max_wait)
        self._observations: queue.Queue = queue.Queue(maxsize=4096)  # full: the worker waits (backpressure)
        self._monitor_thread = threading.Thread(target=self._watch, name="monitor", daemon=True)
        self._posts: list[tuple] = []  # the monitor thread's: state changes and judgements for the loop
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def _rate(self, p: Principal) -> float:
        return p.rate * (self.options.throttle_factor if self.states.get(p.name) == "throttled" else 1.0)

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.batcher.start()
        self._monitor_thread.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._observations.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._monitor_thread.join)
        self.ledger.close()

    # -- the worker thread: forward pass and ledger ----------------------------------------------------------
    def _answer(self, jobs: list[Job]) -> list[tuple[np.ndarray, Debit]]:
        images = np.concatenate([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images
        answers, marks = self.served.predict(images), []
        if self.marker is not None:  # keyed marks outside the served graph (stages/serving/watermark.py)
            answers, marks = self.marker.mark(images, answers, [(j.context[0], len(j.images)) for j in jobs])
        flags = answers.max(1) < self.monitor.calibration.ood_threshold
        now, rows, out, start = time.time(), [], [], 0
        summaries = summarise(answers, [len(j.images) for j in jobs])
        for job, summary in zip(jobs, summaries, strict=True):
            n = len(job.images)
            part = answers[start : start + n]
            name, request_id, sha = job.context
            ood = int(flags[start : start + n].sum())
            rows.append(Answered(name, now, sha, request_id, part, ood, self.principals[name].budget, summary))
            out.append(part)
            start += n
        try:
            debits = self.ledger.record(rows, marks)  # committed before any of these answers is sent
        except BaseException:
            if self.marker is not None:
                self.marker.settle(marks, set(range(len(jobs))))
            raise
        if self.marker is not None:
            self.marker.settle(marks, {i for i, d in enumerate(debits) if d.refused is not None})
        self.metrics.batch.observe(len(images))
        judged = [(j.context[0], j.images, part) for j, part, d in zip(jobs, out, debits, strict=True) if not d.refused]
        if judged:  # one hand-off per batch: the monitor thread wakes, and wakes the loop, once for all its requests
            self._observations.put((judged, now))
        return list(zip(out, debits, strict=True))

    # -- the monitor thread ----------------------------------------------------------------------------------
    def _resume(self, spent: dict[str, tuple[int, str]]) -> None:
        """Refill the monitor from the ledger: each principal's last OOD window of answers, and every answer of the
        global window (PRADA and the volume window start empty: docs/method.md, "What a restart forgets")."""
        for name in self.principals:
            for t, answers in self.ledger.recent_answers(name, self.monitor.settings.ood_window):
                self.monitor.warm(name, answers, t)
        rows = self.ledger.answers_since(time.time() - self.monitor.global_settings.window)
        before = {name: spent[name][0] for name in self.principals}
        for name, _, answers in rows:
            before[name] = before.get(name, 0) - len(answers)
        for name, t, answers in rows:
            self.monitor.warm_global(name, answers, t, before[name])
            before[name] += len(answers)
        self.monitor.all.armed = dict.fromkeys(self.monitor.all.armed, True)  # still crossed: alerts at the next answer

    def _watch(self) -> None:
        while (item := self._observations.get()) is not None:
            batch, now = item
            self._posts = []  # what the loop does once this batch is judged, in order
            for name, images, answers in batch:
                try:
                    alerts = self.monitor.observe(name, images, answers, now)
                except Exception as e:  # a monitoring bug must not stop serving; it is logged
                    print(f"monitor: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    alerts = []
                for alert in alerts:
                    if alert.get("scope") == "global":
                        self._raise_global(now, alert)
                    else:
                        self._raise_alert(name, now, alert)
                self._posts.append((self._judged, name, len(answers)))  # after its alerts' states
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._apply, self._posts)

    @staticmethod
    def _apply(posts: list[tuple]) -> None:
        for fn, *args in posts:
            fn(*args)

    def _judged(self, name: str, n: int) -> None:
        self.seen[name] += n
        held = self.waiting.get(name)
        if held:
            for target, waiter in held:
                if target <= self.seen[name] and not waiter.done():
                    waiter.set_result(None)
            self.waiting[name] = [(t, w) for t, w in held if not w.done()]

    def _raise_global(self, now: float, alert: dict) -> None:
        """A global alert: recorded under principal '*', then each linked key alerted with the global action."""
        action = self.options.global_action
        linked = alert.pop("linked")
        alert.pop("scope")
        if not alert.pop("continued", False):
            self._raise_alert("*", now, {**alert, "details": {**alert["details"], "linked": linked}}, action)
        for name in linked:
            if name in self.principals:  # a key's own action caps the global one: a `log` key is never blocked
                own = ACTIONS.index(self.principals[name].action)
                link = dict(signal=f"linked:{alert['signal']}", value=alert["value"], threshold=alert["threshold"])
                self._raise_alert(
                    name,
                    now,
                    {**link, "queries": self.seen[name], "details": {}},
                    ACTIONS[min(own, ACTIONS.index(action))],
                )

    def _raise_alert(self, name: str, now: float, alert: dict, action: Optional[str] = None) -> None:
        action = action or self.principals[name].action
        state = STATE_OF_ACTION[action]
        self.ledger.alert(
            name,
            now,
            alert["signal"],
            alert["value"],
            alert["threshold"],
            alert["queries"],
            action,
            alert["details"],
            state,
        )
        line = json.dumps(
            {"event": "extraction_alert", "time": now, "principal": name, **alert, "action": action}, sort_keys=True
        )
        print(line, file=sys.stderr, flush=True)
        if self.options.alerts_path is not None:
            with open(self.options.alerts_path, "a") as f:
                f.write(line + "\n")
        self.metrics.alerts.labels(name, alert["signal"]).inc()
        if state is not None and name in self.principals:
            self._posts.append((self._set_state, name, state))

    def _set_state(self, name: str, state: str) -> None:
        if self.states[name] == "blocked":
            return  # a block is final until an operator clears it in the ledger
        self.states[name] = state
        self.buckets[name].rate = self._rate(self.principals[name])

    # -- the event loop: admission ---------------------------------------------------------------------------
    def identify(self, request: Request) -> Principal:
        key = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if key is None and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        principal = self.auth.identify(key)
        if principal is None:
            raise ApiError(
                401, "missing or wrong API key (X-API-Key or Authorization: Bearer)", {"WWW-Authenticate": "Bearer"}
            )
        if self.states[principal.name] == "blocked":
            raise ApiError(
                403, f"principal {principal.name} is blocked after an extraction alert", self._left(principal)
            )
        return principal

    def _left(self, principal: Principal) -> dict[str, str]:
        return {"X-Budget-Remaining": str(self.budgets[principal.name].remaining)}

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        principal = self.identify(request)
        headers = self._left(principal)
        try:
            body = await self._body(request)
            images = payload.decode(
                body, request.headers.get("content-type"), self.served.info.input_shape, self.options.max_images
            )
        except ApiError as e:
            e.headers.update(headers)
            raise
        sha = payload.digest(images)
        request_id = request.headers.get("idempotency-key")
        if request_id is not None:
            replayed = self._replay(principal, request_id, sha, headers)
            if replayed is not None:
                return self._respond(replayed, request, {**headers, "Idempotent-Replayed": "true"})
        answers = await self._admit_and_answer(principal, images, request_id, sha)
        self.metrics.latency.observe(time.perf_counter() - started)
        return self._respond(answers, request, self._left(principal))

    def _replay(self, principal: Principal, request_id: str, sha: str, headers: dict) -> Optional[np.ndarray]:
        if not REQUEST_ID.match(request_id):
            raise ApiError(422, "Idempotency-Key must be 1-128 letters, digits or _ . : -", headers)
        if (principal.name, request_id) in self.in_flight:
            raise ApiError(409, "a request with this Idempotency-Key is being answered", headers)
        try:
            earlier = self.ledger.replay(principal.name, request_id)
        except LedgerUnavailable as e:
            raise ApiError(503, f"ledger unavailable: {e}", {**headers, "Retry-After": "1"}) from None
        if earlier is None:
            return None
        if earlier[0] != sha:
            raise ApiError(422, "this Idempotency-Key was used for other images", headers)
        return earlier[1]

    async def _admit_and_answer(
        self, principal: Principal, images: np.ndarray, request_id: Optional[str], sha: str
    ) -> np.ndarray:
        name, n, now = principal.name, len(images), time.monotonic()
        budget, bucket = self.budgets[name], self.buckets[name]
        hold = self.seen[name] < self.monitor.settings.min_images  # not judged yet: see _judgement
        if not budget.reserve(n):
            raise ApiError(
                429,
                f"budget: {n} images asked, {budget.remaining} of {budget.budget} left "
                "(a lifetime budget: waiting does not help)",
                self._left(principal),
            )
        try:
            wait = max(bucket.wait(n, now), self.global_bucket.wait(n, now) if self.global_bucket else 0.0)
        except BaseException:  # a reservation never outlives its request
            budget.settle(n, answered=False)
            raise
        over = "rate" if wait > 0 else None
        if over is None and self.pending + n > self.options.max_pending:
            over, wait = "server busy", 1.0
        if over is not None:
            budget.settle(n, answered=False)
            status = 503 if over == "server busy" else 429
            raise ApiError(
                status,
                f"{over}: retry in {wait:.2f} s",
                {**self._left(principal), "Retry-After": str(max(1, math.ceil(wait)))},
            )
        bucket.take(n)
        if self.global_bucket:
            self.global_bucket.take(n)
        self.pending += n
        key = (name, request_id) if request_id is not None else None
        if key:
            self.in_flight.add(key)

        def settle(future: asyncio.Future) -> None:  # runs when the batch ends, even if the client went away
            debit = None if future.cancelled() or future.exception() is not None else future.result()[1]
            answered = debit is not None and debit.refused is None
            budget.settle(n, answered, debit.spent if debit is not None else None)
            self.pending -= n
            self.in_flight.discard(key)
            if debit is not None and debit.state != self.states[name]:
                self._set_state(name, debit.state)  # a state another replica's alert set
            if answered:
                self.answered[name] += n
                self.metrics.images.inc(n)
                self._spent_gauge[name].set(budget.spent)

        future = self.batcher.submit(images, (name, request_id, sha))
        future.add_done_callback(settle)
        try:
            answers, debit = await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except LedgerUnavailable as e:
            what = "whether it was counted is unknown" if e.uncertain else "nothing answered or counted"
            raise ApiError(
                503, f"ledger unavailable, {what}: {e}", {**self._left(principal), "Retry-After": "1"}
            ) from None
        except Exception as e:
            raise ApiError(
                500, f"the model failed on this batch ({type(e).__name__}); nothing was counted", self._left(principal)
            ) from None
        if debit.refused is not None:
            status, message = REFUSED[debit.refused]
            raise ApiError(status, message, self._left(principal))
        await self._judgement(principal, 0 if hold else n)
        return answers

    async def _judgement(self, principal: Principal, own: int = 0) -> None:
        """Hold a request's answers until the monitor has judged every image the key was answered before it (`own`
        0: and its own, for a key not judged yet); if that judgement blocked the key, the answers never leave (they
        stay counted: the forward pass ran). So no key receives more than `min_images` answers before its first
        judgement, however large its requests, and after an alert at most the one request it was judged on."""
        name, target = principal.name, self.answered[principal.name] - own
        if self.seen[name] < target:
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(name, []).append((target, waiter))
            await waiter
        if self.states[name] == "blocked":
            raise ApiError(403, f"principal {name} is blocked after an extraction alert", self._left(principal))

    async def _body(self, request: Request) -> bytes:
        limit = self.options.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"payload of {int(length)} bytes; at most {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"payload over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _respond(self, answers: np.ndarray, request: Request, headers: dict[str, str]) -> Response:
        body, media = payload.encode(answers, request.headers.get("accept"))
        return Response(body, media_type=media, headers=headers)

    def usage(self, request: Request) -> dict:
        """The principal's standing read from the ledger's row (what every replica spent), not this replica's view."""
        p = self.identify(request)
        try:
            spent, state = self.ledger.standing(p.name)
        except LedgerUnavailable as e:
            raise ApiError(503, f"ledger unavailable: {e}", {**self._left(p), "Retry-After": "1"}) from None
        b = self.budgets[p.name]
        b.settle(0, False, spent)
        if state != self.states[p.name]:
            self._set_state(p.name, state)
        return dict(
            principal=p.name,
            budget=b.budget,
            spent=b.spent,
            reserved=b.reserved,
            remaining=b.remaining,
            rate=self.buckets[p.name].rate,
            burst=p.burst,
            state=self.states[p.name],
        )


def build(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="ini-toolkit prediction API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    metrics = service.metrics

    def error(status: int, message: str, headers: dict | None, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error(e.status, e.message, e.headers, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405 from routing
        return error(e.status_code, str(e.detail), getattr(e, "headers", None), "other")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error(500, f"internal error: {type(e).__name__}", None, request.url.path)

    @app.get("/healthz")
    async def healthz():
        metrics.requests.labels("/healthz", "200").inc()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model(request: Request):
        p = service.identify(request)
        metrics.requests.labels("/v1/model", "200").inc()
        return JSONResponse(
            {**service.served.card(), "max_images": service.options.max_images}, headers=service._left(p)
        )

    @app.get("/v1/usage")
    async def usage(request: Request):
        body = service.usage(request)
        metrics.requests.labels("/v1/usage", "200").inc()
        return JSONResponse(body, headers={"X-Budget-Remaining": str(body["remaining"])})

    answered = metrics.requests.labels("/v1/predict", "200")  # the hot path's counter, looked up once

    @app.post("/v1/predict")
    async def predict(request: Request):
        response = await service.predict(request)
        answered.inc()
        return response

    return app
