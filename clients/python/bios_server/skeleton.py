"""The server skeleton both gRPC services share: start (the service, health, reflection, an optional plaintext
health-only port), stop (NOT_SERVING, refuse new RPCs, let in-flight ones finish) and run until a signal.

Each service subclasses `GrpcServer` with what it owns (render worker processes; the train engine and
sessions) and stops those between `stop_accepting` and `stop_health`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import grpc

from bios_server.auth import ApiKeys
from bios_server.grpc import (
    add_port,
    build_server,
    catch_stop_signals,
    mark_not_serving,
    mark_serving,
    start_health_server,
    wait_for_signal,
    warn_if_open,
)
from bios_server.metrics import serve_metrics

Running = TypeVar("Running", bound="GrpcServer")


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: Any
    names: list[str]
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def stop_accepting(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new RPCs, wait up to `grace` seconds for in-flight ones."""
        await mark_not_serving(self.health, self.names)
        await self.server.stop(grace)

    async def stop_health(self) -> None:
        """Last: probes keep getting NOT_SERVING until everything else has stopped."""
        if self.health_server is not None:
            await self.health_server.stop(None)


async def start_grpc(
    service: str,
    add_services: Iterable[Callable[[grpc.aio.Server], list[str]]],
    api_keys: ApiKeys | None,
    host: str,
    port: int,
    health_port: int | None,
) -> dict[str, Any]:
    """Start `service` on host:port (0 = a free port), SERVING; the GrpcServer fields, for the subclass to add to."""
    server, health, names = build_server(service, add_services, api_keys)
    bound = add_port(server, f"{host}:{port}")
    await server.start()
    health_server, bound_health = (
        await start_health_server(health, host, health_port) if health_port is not None else (None, None)
    )
    await mark_serving(health, names)
    return dict(
        server=server, port=bound, health=health, names=names, health_server=health_server, health_port=bound_health
    )


async def serve_until_signalled(
    what: str,
    host: str,
    metrics_port: int,
    start: Callable[[ApiKeys | None], Awaitable[Running]],
    stop: Callable[[Running], Awaitable[Any]],
    describe: Callable[[Running], str] = lambda running: "",
    started: Callable[[Running], Any] = lambda running: None,
) -> None:
    """The standalone server's life: API keys from the environment (and a warning when there are none beyond
    loopback), start, /metrics, announce, then on SIGTERM / SIGINT (caught from the start) `stop` once."""
    api_keys, signalled = ApiKeys.from_env(), catch_stop_signals()
    warn_if_open(what, host, api_keys)
    running = await start(api_keys)
    if metrics_port:
        serve_metrics(metrics_port)
    logging.info("%s listening on %s:%d (metrics on :%d%s)", what, host, running.port, metrics_port, describe(running))
    started(running)
    await wait_for_signal(lambda: stop(running), signalled)
