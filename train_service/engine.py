"""The engine: one thread that runs all torch work, in the order the scheduler gives it.

The scheduler (train_service.scheduler) decides what runs next and coalesces requests; the worker
(train_service.worker) runs passes and decode steps on the device; this loop ties them together and
owns the futures. Work of one key runs in submission order; keys take turns.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable

from bios.errors import UnavailableError
from train_service import worker
from train_service.replay import Mirror
from train_service.sampler import DecodeGroup
from train_service.scheduler import Call, Limits, PassPlan, Scheduler, Work

log = logging.getLogger("bios.engine")


class Engine:
    def __init__(
        self,
        limits: Limits | None = None,
        name: str = "bios-engine",
        mirror: Mirror | None = None,
        heartbeat_s: float | None = None,
    ):
        """`mirror`: on several ranks, what the engine runs is sent to the other ranks first; `heartbeat_s`:
        when idle that long, a no-op is sent, so every rank learns within seconds that another one died."""
        self.limits = limits or Limits()
        self.mirror = mirror or Mirror()
        self.heartbeat_s = heartbeat_s
        self._scheduler = Scheduler(self.limits)
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, work: Work | Callable[[], Any]) -> Future:
        """Queue `work` (or a function, run as a Call) behind everything queued under `key`."""
        if not isinstance(work, Work):
            work = Call(work)
        with self._cond:
            if self._stopping:
                work.future.set_exception(UnavailableError("train engine: shutting down"))
                return work.future
            self._scheduler.add(key, work)
            self._cond.notify()
        return work.future

    def queue_depth(self) -> int:
        with self._cond:
            return self._scheduler.pending()

    def drop(self, key: str, exc: BaseException | None = None) -> None:
        """Forget a key's queue (its model is gone): waiting work fails, samples in progress stop."""
        exc = exc or UnavailableError(f"{key}: closed")
        with self._cond:
            for work in self._scheduler.drop(key):
                if not work.future.done():
                    work.future.set_exception(exc)
            for unit in self._scheduler.ring:
                if isinstance(unit, DecodeGroup):
                    unit.cancel(key, exc)

    def stop(self, timeout: float | None = None) -> bool:
        """Finish queued work, then stop the thread; False if it was still running after `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next(self) -> Any | None:
        with self._cond:
            while True:
                unit = self._scheduler.next()
                if unit is not None:
                    self._busy += 1
                    return unit
                if self._stopping:
                    return None
                if not self._cond.wait(self.heartbeat_s) and self.heartbeat_s is not None:
                    self._busy += 1
                    return Call(lambda: self.mirror.send("noop"))

    def _run(self) -> None:
        while (unit := self._next()) is not None:
            try:
                self._run_unit(unit)
            except BaseException:  # noqa: BLE001 - a bug here must not kill the engine thread
                log.exception("engine: unexpected failure running %r", unit)
            finally:
                with self._cond:
                    self._busy -= 1

    def _run_unit(self, unit: Any) -> None:
        if isinstance(unit, Call):
            finished = unit.step()
            with self._cond:
                self._scheduler.finished(unit) if finished else self._scheduler.release(unit.key)
        elif isinstance(unit, PassPlan):
            answered = worker.run_plan(unit)
            with self._cond:
                for work in answered:
                    self._scheduler.finished(work)
                for work, _, _ in unit.parts:
                    if work not in answered:
                        self._scheduler.release(work.key)
        elif isinstance(unit, (list, DecodeGroup)):
            group = unit if isinstance(unit, DecodeGroup) else DecodeGroup(unit[0].base, unit)
            answered = worker.step_group(group)
            with self._cond:
                for work in answered:
                    self._scheduler.finished(work)
                if group.active:
                    self._scheduler.requeue(group)
