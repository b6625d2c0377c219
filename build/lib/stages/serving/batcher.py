"""Micro-batching: concurrent requests share one forward pass.

Requests queue on the event loop; the collector takes the first, then whatever else arrives within `max_wait`
seconds, up to `max_images`, and hands the batch to one worker thread (the model runs there, releasing the GIL,
while the loop keeps accepting requests). While a batch runs the queue fills, so under load batches grow by
themselves and the wait only costs latency when the server is idle.
"""

from __future__ import annotations

import asyncio
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
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect())

    def submit(self, images: np.ndarray, context: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Job(images, context, future))
        return future

    async def _next_batch(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        size = len(jobs[0].images)
        deadline = loop.time() + self.max_wait
        while size < self.max_images:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            size += len(job.images)
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
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._worker.shutdown(wait=True)
