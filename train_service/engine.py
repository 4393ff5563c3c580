"""The engine: one thread that runs all torch work, fairly across models.

Each model (training model or sampler) has a FIFO queue, so its operations run in submission
order. The thread takes one unit of work from each queue with work in turn (round robin), so a busy
session cannot starve another. A job that is a generator (sampling) runs one step per turn.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger("bios.engine")


class _Job:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: Future = Future()
        self.steps = None  # the running generator of a generator job


class Engine:
    def __init__(self, name: str = "bios-engine"):
        self._queues: dict[str, collections.deque[_Job]] = {}
        self._ready: collections.deque[str] = collections.deque()  # keys with queued work, in turn order
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, fn: Callable[[], Any]) -> Future:
        """Queue `fn` behind everything already queued under `key`; the future holds its result."""
        job = _Job(fn)
        with self._cond:
            if self._stopping:
                job.future.set_exception(RuntimeError("engine: shutting down"))
                return job.future
            queue = self._queues.setdefault(key, collections.deque())
            if not queue:
                self._ready.append(key)
            queue.append(job)
            self._cond.notify()
        return job.future

    def queue_depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values()) + int(self._busy)

    def drop(self, key: str) -> None:
        """Forget a key's queue (its model is gone); queued jobs fail."""
        with self._cond:
            for job in self._queues.pop(key, ()):
                job.future.set_exception(RuntimeError(f"{key}: closed"))
            if key in self._ready:
                self._ready.remove(key)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next(self) -> tuple[str, _Job] | None:
        with self._cond:
            while not self._ready:
                if self._stopping:
                    return None
                self._cond.wait()
            key = self._ready.popleft()
            self._busy = True
            return key, self._queues[key][0]

    def _run(self) -> None:
        while (item := self._next()) is not None:
            key, job = item
            finished = self._step(job)
            with self._cond:
                self._busy = False
                queue = self._queues.get(key)
                if queue is not None:
                    if finished:
                        queue.popleft()
                    if queue:
                        self._ready.append(key)
                    else:
                        del self._queues[key]

    @staticmethod
    def _step(job: _Job) -> bool:
        """Run one unit of `job`; True when it is finished."""
        if job.future.done():  # cancelled while queued
            return True
        try:
            if job.steps is None:
                if not job.future.set_running_or_notify_cancel():
                    return True
                result = job.fn()
                if not inspect.isgenerator(result):
                    job.future.set_result(result)
                    return True
                job.steps = result
            next(job.steps)
            return False
        except StopIteration as stop:
            job.future.set_result(stop.value)
        except BaseException as exc:  # noqa: BLE001 - the failure belongs to this job only
            job.future.set_exception(exc)
        return True
