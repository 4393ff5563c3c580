"""Run the gateway: `python -m tinker_gateway [--port 8000] [--train-address localhost:50052]`.

Point Tinker code at it with TINKER_BASE_URL=http://<host>:<port> and TINKER_API_KEY=tml-<key>.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import uvicorn

from bios import placement
from bios_server.auth import ApiKeys
from bios_server.grpc import catch_stop_signals, wait_for_signal
from tinker_gateway.app import GatewayApp

DEFAULT_PORT = 8000


class _Server(uvicorn.Server):
    def capture_signals(self):  # the process owns its signals (bios serve drains every service on SIGTERM)
        return contextlib.nullcontext()


@dataclass
class RunningGateway:
    port: int
    app: GatewayApp
    _server: _Server
    _task: asyncio.Task

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def start(
    host: str = "127.0.0.1",
    port: int = 0,
    train_address: str | None = None,
    api_keys: ApiKeys | None = None,
    pod: int | None = None,
    peer_template: str | None = None,
    **options,
) -> RunningGateway:
    """A started gateway on `port` (0 = a free port) in the running loop, translating onto the train service at
    `train_address` (default $BIOS_TRAIN_ADDRESS, else localhost:50052). `pod`: this replica's ordinal;
    `peer_template`: the gateway of pod {pod}, to forward requests whose ids name another pod
    (default $BIOS_TINKER_POD_ADDRESS); `options`: poll_seconds, session_timeout, compress_fwdbwd."""
    train_address = train_address or os.environ.get("BIOS_TRAIN_ADDRESS") or "localhost:50052"
    peer_template = peer_template or os.environ.get("BIOS_TINKER_POD_ADDRESS") or None
    app = GatewayApp(train_address, api_keys, pod, peer_template, **options)
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on such sockets, and without it every response waits
    # ~40 ms for a delayed ACK (headers and body are two writes)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app.starlette, log_level="warning", lifespan="on", access_log=False, timeout_keep_alive=75
    )  # > the SDK's 45 s long-poll: connections are reused
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise RuntimeError("tinker gateway: the server stopped while starting")
        await asyncio.sleep(0.01)
    return RunningGateway(sock.getsockname()[1], app, server, task)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tinker-port", type=int, default=DEFAULT_PORT, help="HTTP port of the Tinker gateway")
    parser.add_argument(
        "--pod-ordinal",
        type=int,
        default=placement.pod_ordinal(os.environ.get("BIOS_POD_NAME")),
        help="this replica's ordinal (default: from $BIOS_POD_NAME)",
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m tinker_gateway`'s flags (also `bios serve tinker`)."""
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--train-address", default=None, help="the train service (default: $BIOS_TRAIN_ADDRESS, else localhost:50052)"
    )
    add_arguments(parser)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tinker_gateway", description=__doc__)
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        signalled = catch_stop_signals()
        running = await start(args.host, args.tinker_port, args.train_address, ApiKeys.from_env(), args.pod_ordinal)
        logging.info("tinker gateway on %s:%d -> train service %s", args.host, running.port, running.app.train_address)
        await wait_for_signal(running.stop, signalled)

    asyncio.run(run())
