"""Start the render service: `python -m render_service [--port 50051]`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
from dataclasses import dataclass

from bios_server.auth import ApiKeys
from bios_server.grpc import add_allow_local_paths_argument, add_health_port_argument, add_host_argument
from bios_server.skeleton import GrpcServer, serve_until_signalled, start_grpc
from render_service import service
from render_service.workers import RenderWorkers


@dataclass
class RenderServer(GrpcServer):
    workers: RenderWorkers | None = None

    async def stop(self, grace: float | None = 10.0) -> None:
        """Report NOT_SERVING, refuse new RPCs, let in-flight ones finish."""
        await self.stop_accepting(grace)
        if self.workers is not None:
            self.workers.shutdown()
        await self.stop_health()


async def start(
    host: str = "127.0.0.1",
    port: int = 0,
    api_keys: ApiKeys | None = None,
    workers: int = 1,
    health_port: int | None = None,
    allow_local_paths: bool = False,
) -> RenderServer:
    """A started server on `port` (0 = pick a free port); `workers` > 1 renders batches in that many processes;
    `health_port` adds a plaintext health-only port (for kubelet probes when the main port uses TLS);
    `allow_local_paths`: may callers name tokenizers by server directory and send their own chat templates?"""
    pool = RenderWorkers(workers) if workers > 1 else None
    add = functools.partial(service.add_to_server, render_workers=pool, allow_local_paths=allow_local_paths)
    return RenderServer(**await start_grpc("render", [add], api_keys, host, port, health_port), workers=pool)


async def serve(
    host: str, port: int, metrics_port: int, workers: int, health_port: int, allow_local_paths: bool = False
) -> None:
    async def started(api_keys: ApiKeys | None) -> RenderServer:
        return await start(host, port, api_keys, workers, health_port or None, allow_local_paths)

    await serve_until_signalled("render service", host, metrics_port, started, lambda running: running.stop())


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The render server's flags, for `python -m render_service` and `bios serve render`. With a prefix (`render-`,
    for `bios serve all`) its ports are --render-port, --render-metrics-port and --render-health-port, and the flags
    all services share (--host, --allow-local-paths) are the caller's to add once."""
    if not prefix:
        add_host_argument(parser)
    parser.add_argument(f"--{prefix}port", type=int, default=50051, help="gRPC port")
    parser.add_argument(f"--{prefix}metrics-port", type=int, default=9090, help="Prometheus /metrics port (0 = off)")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("BIOS_RENDER_WORKERS", "1")),
        help="processes rendering RenderBatch slices in parallel (1 = the server process; "
        "set to the pod's CPU count; env BIOS_RENDER_WORKERS)",
    )
    add_health_port_argument(parser, prefix)
    if not prefix:
        add_allow_local_paths_argument(parser)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m render_service", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.metrics_port, args.workers, args.health_port, args.allow_local_paths))
