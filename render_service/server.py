"""Start the render service: `python -m render_service [--port 50051]`."""

from __future__ import annotations

import argparse
import asyncio
import logging

from bios.serving import build_server, mark_serving, wait_for_signal
from render_service import service


async def start(host: str = "127.0.0.1", port: int = 0):
    """A started server and the port it listens on (0 = pick a free port)."""
    server, health_servicer, names = build_server([service.add_to_server])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await mark_serving(health_servicer, names)
    return server, bound


async def serve(host: str, port: int) -> None:
    server, bound = await start(host, port)
    logging.info("render service listening on %s:%d", host, bound)
    await wait_for_signal(lambda: server.stop(grace=10))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m render_service", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50051)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port))
