"""What the gateway remembers: sessions, models with their reorder buffers, samplers, and the futures
Tinker polls with retrieve_future. Everything lives on the one event loop, so nothing here takes a lock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, overload

from bios.errors import BiosError
from bios.operations import OperationStream
from tinker_gateway.wire import GatewayError, category

log = logging.getLogger("tinker_gateway")
JSON, PROTO = "application/json", "application/x-protobuf"
MAX_WAITING = 4096  # operations of one model held for an earlier sequence number


@dataclass
class Reply:
    body: bytes
    media_type: str = JSON


def json_reply(value: Any) -> Reply:
    """A pydantic model of the SDK (validated by its own types) or a plain dict, as JSON."""
    data = value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value
    return Reply(json.dumps(data).encode())


def error_reply(exc: BaseException) -> Reply:
    """A failed future as Tinker reads it: {"error": ..., "category": "user" | "server"}."""
    if isinstance(exc, BiosError):
        message, kind = str(exc), category(exc.code)
    elif isinstance(exc, GatewayError):
        message, kind = exc.message, "user" if exc.status < 500 else "server"
    else:
        log.error("operation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        message, kind = f"internal error: {type(exc).__name__}", "server"
    return json_reply({"error": message, "category": kind})


# ---- futures ------------------------------------------------------------------------------------


@dataclass
class Call:
    tenant: str
    task: asyncio.Task
    finished_at: float | None = None


class Futures:
    """request_id -> the work answering it. Ids are made from the caller's own (model, seq) numbers, so a
    resubmitted request finds its first answer. Finished calls are kept `keep_seconds` for re-polls."""

    def __init__(self, keep_seconds: float = 900.0):
        self.keep_seconds = keep_seconds
        self._calls: dict[str, Call] = {}

    def get(self, request_id: str, tenant: str) -> Call | None:
        call = self._calls.get(request_id)
        return call if call is not None and call.tenant == tenant else None  # another tenant's: unknown

    def start(self, request_id: str, tenant: str, work: Callable[[], Awaitable[Reply]]) -> Call:
        if (existing := self._calls.get(request_id)) is not None:
            return existing

        async def run() -> Reply:
            try:
                return await work()
            except asyncio.CancelledError:
                return error_reply(GatewayError(400, "cancelled"))
            except Exception as exc:  # noqa: BLE001 - every failure becomes the future's error
                return error_reply(exc)
            finally:
                call.finished_at = time.monotonic()

        call = Call(tenant, asyncio.get_running_loop().create_task(run()))
        self._calls[request_id] = call
        return call

    async def wait(self, call: Call, timeout: float) -> Reply | None:
        """The reply, or None when it is not ready within `timeout` (Tinker's try_again long-poll)."""
        done, _ = await asyncio.wait({call.task}, timeout=timeout)
        return call.task.result() if done else None

    def sweep(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        for request_id in [r for r, c in self._calls.items() if c.finished_at is not None and c.finished_at < cutoff]:
            del self._calls[request_id]


# ---- sessions, models, samplers -------------------------------------------------------------------


@dataclass
class Session:
    session_id: str  # ours: Tinker sees our placed id, so any gateway can route it
    tenant: str
    api_key: str | None
    last_seen: float = field(default_factory=time.monotonic)
    finished: bool = False
    model_ids: set[str] = field(default_factory=set)
    sampler_ids: set[str] = field(default_factory=set)
    sampling_sessions: dict[int, asyncio.Task] = field(default_factory=dict)  # by the SDK's seq id


@dataclass
class Model:
    """One training model. Tinker numbers its requests 1, 2, ... (`seq_id`), and chunks of one
    forward_backward may arrive in any order: each waits here until every earlier number was sent, then goes
    onto our ordered operation stream."""

    model_id: str  # ours; also the Tinker training run id
    tinker_id: str  # what the SDK calls it: ours, or `<session>:train:<n>` for a model created by loading
    session_id: str
    tenant: str
    base_model: str
    tokenizer: str
    lora_rank: int
    user_metadata: dict[str, str]
    stream: OperationStream
    next_seq: int = 1
    _waiting: dict[int, tuple[Callable[[], concurrent.futures.Future] | None, asyncio.Future | None]] = field(
        default_factory=dict
    )

    @overload
    def enqueue(self, seq: int, send: Callable[[], concurrent.futures.Future]) -> asyncio.Future: ...
    @overload
    def enqueue(self, seq: int, send: None) -> None: ...
    def enqueue(self, seq: int, send: Callable[[], concurrent.futures.Future] | None) -> asyncio.Future | None:
        """Hold `send` until `seq`'s turn, then call it (in sequence order); the returned future resolves to
        the operation's future. `send=None` marks a number whose request was refused, so later ones go on."""
        if seq < self.next_seq or seq in self._waiting:
            raise GatewayError(
                400, f"seq_id: {seq} was already used on model {self.tinker_id} (next expected: {self.next_seq})"
            )
        if len(self._waiting) >= MAX_WAITING:
            raise GatewayError(
                400,
                f"seq_id: {len(self._waiting)} requests of model {self.tinker_id} are "
                f"waiting for seq_id {self.next_seq}, which never arrived",
            )
        sent = asyncio.get_running_loop().create_future() if send is not None else None
        self._waiting[seq] = (send, sent)
        while self.next_seq in self._waiting:
            send_next, sent_next = self._waiting.pop(self.next_seq)
            self.next_seq += 1
            if send_next is not None and sent_next is not None:
                try:
                    sent_next.set_result(send_next())
                except Exception as exc:  # noqa: BLE001 - answered as that operation's error
                    sent_next.set_exception(exc)
        return sent

    def abandon(self, reason: BaseException) -> None:
        """The model is gone: fail what still waits for its turn."""
        for _, sent in self._waiting.values():
            if sent is not None and not sent.done():
                sent.set_exception(reason)
        self._waiting.clear()
        self.stream.close()


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    tenant: str
    base_model: str
    model_path: str | None  # the tinker:// path it was made from; None for the base model or ephemeral weights
    eos_token_ids: list[int]
