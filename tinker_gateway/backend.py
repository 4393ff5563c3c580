"""Our TrainService as the gateway calls it: one channel, every call under the caller's own API key.

Calls run on the gateway's event loop (the one serving HTTP), so nothing crosses threads. A model's
operations go through `bios.operations.OperationStream`, the bios client's ordered, reconnecting stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from bios.channel import open_channel
from bios.errors import from_status
from bios.operations import OperationStream
from bios.v1 import train_pb2, train_pb2_grpc

UNARY_RETRIES = 12  # as the bios client: backoff 0.1 s doubling, capped at 2 s


class _ServingLoop:
    """What OperationStream needs of a bios LoopThread, for the loop already running the gateway."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class Backend:
    def __init__(self, address: str, tls_ca: str | None = None, timeout: float = 600.0):
        """Open within the running loop: the channel belongs to it."""
        self.address = address
        self.timeout = timeout
        self._loop = _ServingLoop(asyncio.get_running_loop())
        self._channel = open_channel(address, tls_ca)
        self.stub = train_pb2_grpc.TrainServiceStub(self._channel)

    @staticmethod
    def metadata(api_key: str | None) -> tuple:
        return (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def call(self, method: str, request: Any, api_key: str | None) -> Any:
        """A unary call; UNAVAILABLE is retried with backoff, any other status raises the bios error."""
        for attempt in range(UNARY_RETRIES + 1):
            try:
                return await getattr(self.stub, method)(request, metadata=self.metadata(api_key), timeout=self.timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == UNARY_RETRIES:
                    raise from_status(err.code(), err.details() or "") from None
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    def operations(self, model_id: str, api_key: str | None) -> OperationStream:
        return OperationStream(self._loop, self.stub, model_id, self.metadata(api_key))  # type: ignore[arg-type]

    async def sample(self, request: train_pb2.SampleRequest, api_key: str | None) -> train_pb2.SampleResponse:
        call = self.stub.Sample(request, metadata=self.metadata(api_key), timeout=self.timeout)
        try:
            async for event in call:
                if event.WhichOneof("event") == "result":
                    return event.result
        except grpc.aio.AioRpcError as err:
            raise from_status(err.code(), err.details() or "") from None
        raise from_status(grpc.StatusCode.INTERNAL, "sample stream ended without a result")

    async def close(self) -> None:
        await self._channel.close()
