"""Start the train service: `python -m train_service [--port 50052] [--checkpoint-dir DIR]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from bios.serving import build_server, mark_serving, wait_for_signal
from train_service import service
from train_service.checkpoints import CheckpointStore
from train_service.engine import Engine
from train_service.sessions import SessionManager


def default_checkpoint_dir() -> str:
    return os.environ.get("BIOS_CHECKPOINT_DIR") or os.path.expanduser("~/.cache/bios/checkpoints")


@dataclass
class TrainServer:
    server: grpc.aio.Server
    port: int
    engine: Engine
    sessions: SessionManager

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.server.stop(grace)
        await asyncio.to_thread(self.engine.stop, grace)


async def start(host: str = "127.0.0.1", port: int = 0, checkpoint_dir: str | None = None) -> TrainServer:
    engine = Engine()
    sessions = SessionManager(CheckpointStore(checkpoint_dir or default_checkpoint_dir()))
    server, health_servicer, names = build_server([service.add_to_server(sessions, engine)])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await mark_serving(health_servicer, names)
    return TrainServer(server, bound, engine, sessions)


async def serve(host: str, port: int, checkpoint_dir: str | None) -> None:
    running = await start(host, port, checkpoint_dir)
    logging.info("train service listening on %s:%d", host, running.port)
    await wait_for_signal(lambda: running.stop(grace=float(os.environ.get("BIOS_DRAIN_SECONDS", "60"))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train_service", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.checkpoint_dir))
