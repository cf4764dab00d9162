"""Micro-batching: image batches from concurrent requests share one encoder forward.

    batcher = EncodeBatcher(retriever.encode, max_batch=64)
    features = batcher.encode(retriever.prepare([image]))   # from any thread; blocks until done

No worker thread: each caller queues its images, then waits for the forward lock. Whoever holds it
takes every queued batch (up to ``max_batch`` images, oldest first) and runs them as one forward, so
a lone request encodes on its own thread at once, and requests that arrive while a forward runs are
merged into the next one (their callers find their features ready when they get the lock).
:meth:`EncodeBatcher.submit` and :meth:`EncodeBatcher.result` split that in two, for a caller on the
event loop that yields between them so that requests already received join its forward.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Job:
    images: torch.Tensor  # uint8 [B,3,H,W]
    features: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatcherStats:
    """Forwards run, images encoded, requests served, and the most requests merged into one forward."""

    forwards: int = 0
    images: int = 0
    jobs: int = 0
    most_jobs: int = 0


@dataclass
class EncodeBatcher:
    """Runs ``encode`` (uint8 [B,3,H,W] -> features [B,D]) over the batches waiting at each forward."""

    encode_batch: Callable[[torch.Tensor], torch.Tensor]
    max_batch: int = 64
    stats: BatcherStats = field(default_factory=BatcherStats)
    _queue: deque[_Job] = field(default_factory=deque, repr=False)
    _queue_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _forward_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The features [B, D] of ``images``, encoded alone or with other callers' images; the encoder's
        error is raised in every caller whose images were in the failed forward."""
        return self.result(self.submit(images))

    def submit(self, images: torch.Tensor) -> _Job:
        """Queue ``images`` for the next forward; :meth:`result` gives their features."""
        job = _Job(images)
        with self._queue_lock:
            self._queue.append(job)
        return job

    def result(self, job: _Job) -> torch.Tensor:
        """The features of a submitted job: ready if another caller's forward took it, else this
        caller runs the next forward (with every job queued by then)."""
        while not job.done:
            with self._forward_lock:
                if not job.done:
                    self._forward(self._take())
        if job.error is not None:
            raise job.error
        return job.features

    def _take(self) -> list[_Job]:
        """The oldest queued jobs, up to ``max_batch`` images (at least one job)."""
        with self._queue_lock:
            jobs = [self._queue.popleft()]
            count = len(jobs[0].images)
            while self._queue and count + len(self._queue[0].images) <= self.max_batch:
                job = self._queue.popleft()
                jobs.append(job)
                count += len(job.images)
        return jobs

    def _forward(self, jobs: list[_Job]) -> None:
        try:
            features = self.encode_batch(torch.cat([job.images for job in jobs]))
        except Exception as exc:  # every merged request gets the error; later forwards go on
            for job in jobs:
                job.error, job.done = exc, True
            return
        self.stats.forwards += 1
        self.stats.images += len(features)
        self.stats.jobs += len(jobs)
        self.stats.most_jobs = max(self.stats.most_jobs, len(jobs))
        start = 0
        for job in jobs:
            job.features, job.done = features[start : start + len(job.images)], True
            start += len(job.images)
