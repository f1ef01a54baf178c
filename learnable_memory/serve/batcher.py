"""Micro-batching: chunks of requests that arrive together run as one model pass, one pass at a time.

Chunks wait in a queue bounded by the number of images in it (a request that does not fit gets 503
with ``Retry-After``). One asyncio task forms batches: it takes the first chunk waiting, then more
until the batch holds ``max_batch_size`` images or ``max_wait_s`` has passed since it took the first,
and runs the batch in ONE inference thread, so a single pass runs at a time and the event loop stays
free. A batch holds chunks of one model only (the model current when each request was admitted), so a
hot load or unload never changes the tasks of a batch under way. Chunks whose request has gone (time-
out) are dropped when their turn comes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .inference import Chunk
from .settings import ServeError

T = TypeVar("T")
log = logging.getLogger("learnable_memory.serve")

#: Runs one batch in the inference thread; returns one result per chunk, in order.
BatchFn = Callable[[Sequence[Chunk]], Sequence[Any]]
#: Told about every batch run: its chunks and the seconds the pass took.
BatchObserver = Callable[[Sequence[Chunk], float], None]


class MicroBatcher:
    """Queue, batch former and inference thread.

    Args:
        run: The batch function, called in the inference thread.
        max_batch_size: Most images in one batch (a chunk never holds more).
        max_wait_s: Longest wait for more chunks after the first of a batch.
        max_queue_images: Most images waiting; beyond: 503.
        threads: torch intra-op threads, set in the inference thread before its first pass.
        observe: Optional callback per batch (metrics).
    """

    def __init__(self, run: BatchFn, *, max_batch_size: int, max_wait_s: float, max_queue_images: int,
                 threads: int, observe: BatchObserver | None = None):
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.observe = observe
        self.queued_images = 0
        self._items: collections.deque[Chunk] = collections.deque()
        self._arrived = asyncio.Event()
        self._busy = False
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="learnable-memory-infer",
                                            initializer=torch.set_num_threads, initargs=(threads,))

    def start(self) -> None:
        """Start forming batches (call from the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="learnable-memory-batcher")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the inference thread (between batches), e.g. a warm-up pass."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, chunks: Sequence[Chunk]) -> None:
        """Queue all chunks of one request, or none: 503 while closing or when the queue is full."""
        n = sum(c.n for c in chunks)
        if self._closing:
            raise ServeError(503, "the server is shutting down; send the request to another replica",
                             "unavailable", {"Retry-After": "1"})
        if self.queued_images + n > self.max_queue_images:
            raise ServeError(503, f"the queue is full ({self.queued_images} images waiting, at most "
                             f"{self.max_queue_images}); retry shortly", "overloaded", {"Retry-After": "1"})
        self._items.extend(chunks)
        self.queued_images += n
        self._arrived.set()

    def discard(self, chunks: Sequence[Chunk]) -> None:
        """Take the chunks of a request that gave up (time-out) out of the queue, if they are still in it."""
        for c in chunks:
            if c in self._items:
                self._items.remove(c)
                self.queued_images -= c.n

    async def close(self, timeout: float) -> None:
        """Take no new chunks, let the queued ones run (at most ``timeout`` s), then stop."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._items or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._items:
            self._fail(self._pop(), ServeError(503, "the server shut down before this request ran", "unavailable"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----- the loop -----
    def _pop(self) -> Chunk:
        chunk = self._items.popleft()
        self.queued_images -= chunk.n
        return chunk

    async def _next_batch(self) -> list[Chunk]:
        """Wait for a first chunk, then take more of the same model until the batch is full or the wait is over."""
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        batch = [self._pop()]
        n, deadline = batch[0].n, loop.time() + self.max_wait_s
        while n < self.max_batch_size:
            if not self._items:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            head = self._items[0]
            if head.model is not batch[0].model or n + head.n > self.max_batch_size:
                break
            batch.append(self._pop())
            n += head.n
        return [c for c in batch if not c.future.done()]  # drop chunks whose request timed out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._busy = True
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as err:  # noqa: BLE001 - a failed pass fails its batch, never the server
                log.exception("a batch of %d chunks failed", len(batch))
                error = ServeError(500, f"inference failed: {type(err).__name__}: {err}", "internal")
                for c in batch:
                    self._fail(c, error)
            else:
                if self.observe is not None:
                    self.observe(batch, time.perf_counter() - start)
                for c, r in zip(batch, results, strict=True):
                    if not c.future.done():
                        c.future.set_result(r)
            finally:
                self._busy = False

    @staticmethod
    def _fail(chunk: Chunk, error: Exception) -> None:
        if not chunk.future.done():
            chunk.future.set_exception(error)
