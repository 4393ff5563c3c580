"""What both gRPC servers share: one interceptor for auth, metrics and status mapping; health; reflection.

KServe-style: handlers stay thin and raise; the interceptor turns every exception into a status code with a
clear message in one place, so a bad request never crashes the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any, Callable, Iterable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bios.channel import CHANNEL_OPTIONS
from bios.errors import InvalidArgumentError, status_of
from bios_server.auth import DEFAULT_TENANT, ApiKeys, set_tenant
from bios_server.metrics import GRPC_DURATION, GRPC_IN_FLIGHT, GRPC_REQUESTS

log = logging.getLogger("bios.server")


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every bios RPC (health and reflection pass through): authenticates the caller and sets its
    tenant, counts and times the call, and maps exceptions to status codes."""

    def __init__(self, service: str, api_keys: ApiKeys | None = None):
        self.service = service
        self.api_keys = api_keys

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        if self.api_keys is None:
            return DEFAULT_TENANT
        metadata = dict(context.invocation_metadata() or ())
        return self.api_keys.tenant(metadata.get("authorization"))

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/bios."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        labels = (self.service, method)

        @contextlib.asynccontextmanager
        async def call(context):
            """Around one call: authenticate, count, time, and map an escaping exception to a status."""
            GRPC_IN_FLIGHT.labels(*labels).inc()
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                tenant = self._tenant(context)
                if tenant is None:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(
                        code, "authorization: missing or unknown API key (send 'authorization: Bearer <key>')"
                    )
                set_tenant(tenant)
                yield
            except grpc.aio.AbortError:
                code = context.code() or code
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status (INTERNAL ones are logged there)
                code, message = status_of(exc)
                await context.abort(code, message)
            finally:
                GRPC_IN_FLIGHT.labels(*labels).dec()
                GRPC_DURATION.labels(*labels).observe(time.perf_counter() - started)
                GRPC_REQUESTS.labels(*labels, code.name).inc()

        # Requests are decoded here rather than by grpc, so that bytes which are not a valid message answer
        # INVALID_ARGUMENT naming the message type (grpc's own decoding failure is an anonymous INTERNAL).
        decode = _decoder(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                async with call(context):
                    return await inner(decode(request), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)

        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                async with call(context):
                    async for item in inner_stream(decode(request), context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, handler.response_serializer)

        inner_bidi = handler.stream_stream

        async def stream_stream(request_iterator, context):
            async def requests():
                async for raw in request_iterator:
                    yield decode(raw)

            async with call(context):
                async for item in inner_bidi(requests(), context):
                    yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, handler.response_serializer)


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    if deserialize is None:
        return lambda raw: raw
    message_type = getattr(deserialize, "__self__", None)
    name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            raise InvalidArgumentError(f"request: not a valid {name} message ({exc})") from None

    return decode


def build_server(
    service: str, add_services: Iterable[Callable[[grpc.aio.Server], list[str]]], api_keys: ApiKeys | None = None
) -> tuple[grpc.aio.Server, Any, list[str]]:
    """A grpc.aio server with the given services, the standard health service and server reflection.

    Each `add_services` callable registers its servicers and returns their full service names.
    """
    server = grpc.aio.server(interceptors=[CallInterceptor(service, api_keys)], options=CHANNEL_OPTIONS)
    names = [name for add in add_services for name in add(server)]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer, names


def add_port(server: grpc.aio.Server, address: str) -> int:
    """Bind `address`; TLS when $BIOS_TLS_CERT and $BIOS_TLS_KEY name a certificate and key."""
    cert, key = os.environ.get("BIOS_TLS_CERT"), os.environ.get("BIOS_TLS_KEY")
    if cert and key:
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)


def add_host_argument(parser: Any) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")


def add_health_port_argument(parser: Any, prefix: str = "") -> None:
    """--health-port (with a prefix, e.g. `render-`: --render-health-port, for one of several services)."""
    default = int(os.environ.get("BIOS_HEALTH_PORT", "0")) if not prefix else 0
    parser.add_argument(
        f"--{prefix}health-port",
        type=int,
        default=default,
        help="also serve grpc.health.v1 alone on this plaintext port, for kubelet probes when TLS "
        "is on (0 = off" + ("; env BIOS_HEALTH_PORT)" if not prefix else ")"),
    )


def warn_if_open(service: str, host: str, api_keys: ApiKeys | None) -> None:
    """Listening beyond this machine with no API keys lets anyone who reaches the port use it: say so."""
    if api_keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "%s: listening on %s without API keys: anyone who can reach this port can use it "
            "(set BIOS_API_KEYS_FILE, or --host 127.0.0.1 for this machine only)",
            service,
            host,
        )


def add_allow_local_paths_argument(parser: Any) -> None:
    parser.add_argument(
        "--allow-local-paths",
        action="store_true",
        default=os.environ.get("BIOS_ALLOW_LOCAL_PATHS", "") in ("1", "true"),
        help="let callers name models and tokenizers by a directory on this server and send their "
        "own chat templates (trusted callers only; off by default: names resolve through the "
        "registry, $BIOS_MODELS_DIR and the HF cache; env BIOS_ALLOW_LOCAL_PATHS=1)",
    )


async def start_health_server(health_servicer: Any, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """grpc.health.v1 alone, on a plaintext port of its own (0 = any free port).

    Kubelet gRPC probes cannot speak TLS: with TLS on the main port, point the probes here. It shares the main
    server's health servicer, so it reports exactly what the main port would; it serves nothing else.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def catch_stop_signals() -> asyncio.Event:
    """Handle SIGTERM and SIGINT from now on by setting the returned event. Install it before starting anything, so
    a signal that arrives while services start (after the first announced itself) still drains them."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def wait_for_signal(stop: Callable[[], Any], signalled: asyncio.Event | None = None) -> None:
    """Wait until SIGTERM or SIGINT (caught since `signalled` was made, else from now), then await `stop()`
    (graceful drain) once."""
    await (signalled or catch_stop_signals()).wait()
    log.info("signal received: draining")
    await stop()


async def mark_serving(health_servicer: Any, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def mark_not_serving(health_servicer: Any, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
