"""What both gRPC servers share: one place that maps exceptions to status codes, health, reflection."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bios.errors import status_of

log = logging.getLogger("bios.serving")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns any exception escaping a handler into a status with a clear message; the server keeps serving."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def report(exc: BaseException) -> tuple[grpc.StatusCode, str]:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method, exc_info=exc)
            return code, message

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await context.abort(*report(exc))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer)
        inner_stream = handler.unary_stream or handler.stream_stream

        async def streaming(request_or_iterator, context):
            try:
                async for item in inner_stream(request_or_iterator, context):
                    yield item
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception as exc:  # noqa: BLE001
                await context.abort(*report(exc))

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer)
        return handler


def build_server(add_services: Iterable[Callable[[grpc.aio.Server], list[str]]],
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> tuple[grpc.aio.Server, Any, list[str]]:
    """A grpc.aio server with the given services, the standard health service and server reflection.

    Each `add_services` callable registers its servicers and returns their full service names.
    """
    server = grpc.aio.server(interceptors=[*interceptors, ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
    names = [name for add in add_services for name in add(server)]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer, names


async def wait_for_signal(stop: Callable[[], Any]) -> None:
    """Wait until SIGTERM or SIGINT, then await `stop()` (graceful drain) once."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    await event.wait()
    log.info("signal received: draining")
    await stop()


async def mark_serving(health_servicer: Any, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
