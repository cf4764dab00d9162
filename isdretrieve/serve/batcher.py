"""Micro-batching: image batches submitted by concurrent requests share one encoder forward.

    batcher = EncodeBatcher(retriever.encode, max_batch=64)
    features = batcher.submit(retriever.prepare([image])).result()   # from any thread

One worker thread runs the forwards. When it is free it takes every job waiting at that moment (up to
``max_batch`` images) and runs them as one batch, so a lone request never waits for company, and
requests that arrive while a forward runs are merged into the next one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


@dataclass
class _Job:
    images: torch.Tensor  # uint8 [B,3,H,W]
    future: Future[torch.Tensor] = field(default_factory=Future)


@dataclass
class BatcherStats:
    """Forwards run, images encoded, requests served, and the largest number of requests in one forward."""

    forwards: int = 0
    images: int = 0
    jobs: int = 0
    most_jobs: int = 0


class EncodeBatcher:
    """Runs ``encode`` (uint8 [B,3,H,W] -> features [B,D]) on a worker thread over merged submissions."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._encode, self.max_batch = encode, max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.stats = BatcherStats()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="isd-encode-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: torch.Tensor) -> Future[torch.Tensor]:
        """Queue a uint8 image batch; the future holds its features [B, D] (or the encoder's error)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        job = _Job(images)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Finish the queued jobs and stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._queue.get()
            pending = None
            if job is None:
                return
            jobs, count = [job], len(job.images)
            while count < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or count + len(more.images) > self.max_batch:
                    pending = more  # the stop marker, or a job for the next forward
                    break
                jobs.append(more)
                count += len(more.images)
            self._forward(jobs)

    def _forward(self, jobs: list[_Job]) -> None:
        try:
            features = self._encode(torch.cat([job.images for job in jobs]))
        except BaseException as exc:  # every waiting request gets the error; the worker keeps running
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats.forwards += 1
        self.stats.images += sum(len(job.images) for job in jobs)
        self.stats.jobs += len(jobs)
        self.stats.most_jobs = max(self.stats.most_jobs, len(jobs))
        start = 0
        for job in jobs:
            job.future.set_result(features[start : start + len(job.images)])
            start += len(job.images)
