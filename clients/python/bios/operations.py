"""The client end of a model's operation stream: ordered, pipelined, retried.

Every operation gets the next sequence number at submission and is written to one bidirectional
stream without waiting for earlier results. If the connection drops (UNAVAILABLE), the stream is
reopened with backoff and every unanswered operation is sent again: the server answers numbers it
has seen with their original results, so nothing runs twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
from typing import Any, Callable

import grpc

from bios.errors import from_status
from bios.futures import LoopThread
from bios.v1 import train_pb2, train_pb2_grpc

log = logging.getLogger("bios.operations")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_CLOSE = object()  # in the outbox: half-close the stream (the server answers what it has, then ends it with OK)


class OperationStream:
    def __init__(
        self,
        loop: LoopThread,
        stub: train_pb2_grpc.TrainServiceStub,
        model_id: str,
        metadata: tuple = (),
        max_retries: int = 8,
        track: Callable[[concurrent.futures.Future], Any] = lambda future: future,
    ):
        """`track`: told of every submitted operation's future (the ServiceClient waits for them at close)."""
        self._loop = loop
        self._track = track
        self._stub = stub
        self._model_id = model_id
        self._metadata = metadata
        self._max_retries = max_retries
        self._lock = threading.Lock()
        self._next_seq = 0
        self._pending: dict[int, tuple[train_pb2.OperationRequest, concurrent.futures.Future]] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()  # binds to the client's loop at first use
        self._task: asyncio.Task | None = None
        self._closing = False

    def submit(self, **op: Any) -> concurrent.futures.Future:
        """Queue one operation (e.g. forward_backward=...); the future resolves to its OperationEvent."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # the sequence number and the send order are fixed together
            seq = self._next_seq
            self._next_seq += 1
            request = train_pb2.OperationRequest(seq=seq, model_id=self._model_id, **op)
            self._pending[seq] = (request, future)
            self._loop.call(self._enqueue, request)
        self._track(future)
        return future

    def close(self) -> None:
        """End the stream (a half-close: the server answers what it has, then ends it); unanswered operations
        keep running on the server."""
        self._loop.call(self._request_close)

    async def finish(self, timeout: float = 5.0) -> None:
        """close(), and wait (at most `timeout` s) for the server to end the stream."""
        self._request_close()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)

    def _request_close(self) -> None:
        self._closing = True
        self._outbox.put_nowait(_CLOSE)

    def pending(self) -> list[concurrent.futures.Future]:
        with self._lock:
            return [f for _, f in self._pending.values()]

    def _enqueue(self, request: train_pb2.OperationRequest) -> None:
        self._closing = False
        self._outbox.put_nowait(request)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        """Keep one stream open for the model's lifetime; reconnect on UNAVAILABLE."""
        attempt = 0
        while True:
            with self._lock:
                if not self._pending:
                    return
                resend = [req for req, _ in sorted(self._pending.values(), key=lambda p: p[0].seq)]
            # Drain the outbox: everything pending is about to be (re)sent in order.
            while not self._outbox.empty():
                self._outbox.get_nowait()
            try:
                await self._run_stream(resend)
                attempt = 0
            except grpc.aio.AioRpcError as err:
                if err.code() in RETRYABLE and attempt < self._max_retries:
                    attempt += 1
                    delay = min(10.0, 0.1 * 2**attempt) * (0.5 + random.random())
                    log.warning(
                        "operation stream %s: %s; retry %d in %.1fs", self._model_id, err.code().name, attempt, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                self._fail_all(from_status(err.code(), err.details() or ""))
                return
            except Exception as exc:  # noqa: BLE001
                self._fail_all(exc)
                return

    async def _run_stream(self, resend: list[train_pb2.OperationRequest]) -> None:
        call = self._stub.Operate(metadata=self._metadata)

        async def write() -> None:
            for request in resend:
                await call.write(request)
            while not self._closing:
                request = await self._outbox.get()
                if request is not _CLOSE:
                    await call.write(request)
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for event in call:
                self._resolve(event)
        finally:
            writer.cancel()
            if writer.done() and not writer.cancelled() and (failure := writer.exception()) is not None:
                raise failure
            call.cancel()

    def _resolve(self, event: train_pb2.OperationEvent) -> None:
        if event.WhichOneof("event") == "progress":
            return
        with self._lock:
            entry = self._pending.pop(event.seq, None)
        if entry is None:
            return
        future = entry[1]
        if future.done():
            return
        if event.WhichOneof("event") == "error":
            future.set_exception(from_status(_code(event.error.code), event.error.message))
        else:
            future.set_result(event)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            entries, self._pending = list(self._pending.values()), {}
        for _, future in entries:
            if not future.done():
                future.set_exception(exc)


def _code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
