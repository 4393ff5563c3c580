"""Futures usable from sync and async code, backed by a background event loop that owns all gRPC I/O."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Coroutine, Generic, TypeVar

from bios.errors import DeadlineExceededError

T = TypeVar("T")
U = TypeVar("U")


class LoopThread:
    """An asyncio loop running in a daemon thread; one per process for the client, one for embedded servers."""

    _instances: dict[str, "LoopThread"] = {}
    _lock = threading.Lock()

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        ready.wait()

    @classmethod
    def named(cls, name: str) -> "LoopThread":
        with cls._lock:
            if name not in cls._instances:
                cls._instances[name] = cls(name)
            return cls._instances[name]

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for it from a thread that is not the loop's."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("LoopThread.run called from its own loop; await the coroutine instead")
        return self.submit(coro).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class APIFuture(Generic[T]):
    """The result of an operation already submitted: `.result(timeout)` blocks, `await fut` suspends."""

    def __init__(self, future: concurrent.futures.Future, transform: Callable[[Any], T] | None = None):
        self._future = future
        self._transform = transform

    def result(self, timeout: float | None = None) -> T:
        try:
            value = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceededError(f"no result within {timeout} s (the operation keeps running)") from None
        return self._transform(value) if self._transform else value

    def __await__(self):
        value = yield from asyncio.wrap_future(self._future).__await__()
        return self._transform(value) if self._transform else value

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel if not started; an operation already running on the server completes."""
        return self._future.cancel()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def then(self, transform: Callable[[T], U]) -> "APIFuture[U]":
        inner = self._transform
        return APIFuture(self._future, (lambda v: transform(inner(v))) if inner else transform)
