"""Micro-batching: concurrent requests share one forward pass.

Requests queue on the event loop; the collector takes the first, then whatever else arrives within `max_wait`
seconds, up to `max_images`, and hands the batch to one worker thread (the model runs there, releasing the GIL,
while the loop keeps accepting requests). While a batch runs the queue fills, so under load batches grow by
themselves and the wait only costs latency when the server is idle. The wait ends early once the batch holds as
many requests as the last one did (at least two): clients that wait for each answer before sending again come
back together, and once all of them are in, the rest of the wait would be for nobody.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np


@dataclass
class Job:
    images: np.ndarray
    context: Any
    future: asyncio.Future


class Batcher:
    """`submit(images, context)` -> a future of what `process(jobs)` returns for that job (a list, one per job)."""

    def __init__(self, process: Callable[[list[Job]], list[Any]], max_images: int, max_wait: float):
        self._process, self.max_images, self.max_wait = process, int(max_images), float(max_wait)
        self._queue: deque[Job] = deque()
        self._arrival: Optional[asyncio.Future] = None  # set by the next submit while the collector waits
        self._last = 2  # requests in the last batch (at least 2)
        self._task: Optional[asyncio.Task] = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._collect())

    def submit(self, images: np.ndarray, context: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(Job(images, context, future))
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        return future

    async def _arrive(self, deadline: Optional[float]) -> None:
        """Until the next submit, or the loop's clock passes `deadline` (None: no limit)."""
        loop = asyncio.get_running_loop()
        self._arrival = arrival = loop.create_future()
        timer = loop.call_at(deadline, _settle, arrival) if deadline is not None else None
        try:
            await arrival
        finally:
            self._arrival = None
            if timer is not None:
                timer.cancel()

    async def _next_batch(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        while not self._queue:
            await self._arrive(None)
        jobs = [self._queue.popleft()]
        size = len(jobs[0].images)
        deadline = loop.time() + self.max_wait
        while size < self.max_images:
            if not self._queue:
                if len(jobs) >= self._last or loop.time() >= deadline:
                    break
                await self._arrive(deadline)
                continue
            jobs.append(self._queue.popleft())
            size += len(jobs[-1].images)
        self._last = max(2, len(jobs))  # a lone request still waits for a companion, as without this rule
        return jobs

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            try:
                results = await loop.run_in_executor(self._worker, self._process, jobs)
            except Exception as e:  # the batch failed as a whole: nothing of it was recorded or answered
                for job in jobs:
                    job.future.set_exception(e)
                continue
            for job, result in zip(jobs, results, strict=False):
                job.future.set_result(result)

    async def stop(self) -> None:
        """Answer what is queued, then stop (graceful shutdown)."""
        if self._task is None:
            return
        while self._queue:
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._worker.shutdown(wait=True)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
