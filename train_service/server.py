"""Start the train service: `python -m train_service [--port 50052] [--checkpoint-dir DIR]`.

On several GPUs or nodes: `torchrun --nproc-per-node=N -m train_service ...` (and `--nnodes` with a rendezvous).
Rank 0 serves gRPC and schedules; the other ranks follow it (train_service.distributed, train_service.replay).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass

from bios import placement
from bios.errors import UnavailableError
from bios_server.auth import ApiKeys
from bios_server.grpc import (
    add_allow_local_paths_argument,
    add_health_port_argument,
    add_host_argument,
    mark_not_serving,
)
from bios_server.skeleton import GrpcServer, serve_until_signalled, start_grpc
from train_service import follower, metrics, service
from train_service.checkpoints import CheckpointStore
from train_service.device import DeviceConfig
from train_service.distributed import Ranks
from train_service.engine import Engine
from train_service.models import BaseModelPool
from train_service.replay import Mirror
from train_service.scheduler import Limits
from train_service.sessions import SessionManager

HEARTBEAT_S = 2.0  # an idle rank 0 pings the other ranks this often: a dead rank is found within seconds


def default_checkpoint_dir() -> str:
    return os.environ.get("BIOS_CHECKPOINT_DIR") or os.path.expanduser("~/.cache/bios/checkpoints")


@dataclass(kw_only=True)
class TrainServer(GrpcServer):
    engine: Engine
    sessions: SessionManager
    ranks: Ranks | None = None

    async def stop(self, grace: float | None = 5.0, checkpoint: bool = True) -> bool:
        """Graceful drain: report NOT_SERVING, refuse new RPCs, let queued operations finish, checkpoint
        every open model (so its session can be recreated from state after a restart; `checkpoint=False`
        when the sessions end with the process, as in the embedded default), stop the engine. False if the
        engine was still running after `grace` seconds."""
        await self.stop_accepting(grace)
        if checkpoint:
            saved = await asyncio.wrap_future(self.engine.submit("control", self.sessions.checkpoint_all))
            logging.info("drained: checkpointed %d open models", len(saved))
        if self.ranks is not None and not self.ranks.broken:  # the other ranks leave after the work queued before
            try:
                await asyncio.wrap_future(self.engine.submit("control", lambda: self.engine.mirror.send("stop")))
            except Exception:  # noqa: BLE001 - a rank died meanwhile: nothing to tell it
                logging.warning("could not tell the other ranks to stop")
        stopped = await asyncio.to_thread(self.engine.stop, grace)
        if not stopped:  # queued work outlasted the grace: fail it, so the process ends with no torch work running
            self.abandon_queued()
            stopped = await asyncio.to_thread(self.engine.stop, grace)
        if self.ranks is not None and stopped:
            self.ranks.close()
        await self.stop_health()
        return stopped

    def abandon_queued(self) -> None:
        """Fail every operation still queued on the engine with UNAVAILABLE; what is running finishes."""
        gone = UnavailableError("train service: shut down before this operation ran")
        for key in [*self.sessions.models, *self.sessions.samplers, "control"]:
            self.engine.drop(key, gone)


async def start(
    host: str = "127.0.0.1",
    port: int = 0,
    checkpoint_dir: str | None = None,
    api_keys: ApiKeys | None = None,
    health_port: int | None = None,
    pod: int | None = None,
    device: str | DeviceConfig = "auto",
    limits: Limits | None = None,
    allow_local_paths: bool = False,
    ranks: Ranks | None = None,
) -> TrainServer:
    """A started server on `port` (0 = pick a free port); `health_port` adds a plaintext health-only port;
    `pod`: this replica's ordinal, put in the ids it issues so clients find their session's pod (bios.placement);
    `device`: auto (CUDA when available), cpu, cuda or cuda:N, or a DeviceConfig; `limits`: the engine's;
    `allow_local_paths`: may callers name base models and tokenizers by server directory?"""
    device = device if isinstance(device, DeviceConfig) else DeviceConfig.resolve(device)
    mirror = Mirror(ranks)  # `ranks`: this is rank 0 of several, which follow what it does
    engine = Engine(limits, mirror=mirror, heartbeat_s=HEARTBEAT_S if ranks is not None else None)
    pool = BaseModelPool(device, ranks, mirror if ranks is not None else None)
    sessions = SessionManager(
        CheckpointStore(checkpoint_dir or default_checkpoint_dir()),
        pool,
        pod=pod,
        allow_local_paths=allow_local_paths,
        mirror=mirror,
    )
    metrics.bind(sessions, engine, device)
    grpc_server = await start_grpc(
        "train", [service.add_to_server(sessions, engine)], api_keys, host, port, health_port
    )
    return TrainServer(**grpc_server, engine=engine, sessions=sessions, ranks=ranks)


async def serve(
    host: str,
    port: int,
    checkpoint_dir: str | None,
    metrics_port: int,
    health_port: int,
    pod: int | None,
    device: DeviceConfig,
    limits: Limits,
    allow_local_paths: bool = False,
    ranks: Ranks | None = None,
) -> None:
    async def started(api_keys: ApiKeys | None) -> TrainServer:
        return await start(
            host, port, checkpoint_dir, api_keys, health_port or None, pod, device, limits, allow_local_paths, ranks
        )

    def describe(running: TrainServer) -> str:
        rank = f", rank 0 of {ranks.world}" if ranks else ""
        return f", pod ordinal {pod}, device {device.describe()}, {device.dtype_name} base weights{rank}"

    watchdogs: list[asyncio.Task] = []  # held: the loop keeps only a weak reference to a task

    def watch(running: TrainServer) -> None:
        if ranks is not None:
            watchdogs.append(asyncio.create_task(_exit_when_a_rank_fails(running, ranks)))

    await serve_until_signalled(
        "train service",
        host,
        metrics_port,
        started,
        lambda running: running.stop(grace=drain_seconds()),
        describe,
        watch,
    )


async def _exit_when_a_rank_fails(running: TrainServer, ranks: Ranks) -> None:
    """A dead or stuck rank breaks the group for good: report NOT_SERVING, answer everything queued UNAVAILABLE,
    stop listening and exit, so that torchrun or the LeaderWorkerSet restarts the whole group. The engine thread
    may be stuck in a collective, so this does not wait for it."""
    while not ranks.broken:  # the group `running` serves
        await asyncio.sleep(0.5)
    logging.error("a rank of the train group failed: stopping so that the group restarts")
    await mark_not_serving(running.health, running.names)
    running.abandon_queued()
    await running.server.stop(1.0)
    logging.shutdown()
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train_service", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ranks = Ranks.from_env(use_cuda=args.device != "cpu")  # under torchrun: this process's rank
    if ranks is not None and args.device != "cpu":
        args.device = ranks.device  # rank k computes on cuda:LOCAL_RANK
    try:
        device, limits = engine_options(args)
    except ValueError as exc:
        parser.error(str(exc))
    if ranks is not None and ranks.rank > 0:
        follower.follow(ranks, device)
        return
    asyncio.run(
        serve(
            args.host,
            args.port,
            args.checkpoint_dir,
            args.metrics_port,
            args.health_port,
            args.pod_ordinal,
            device,
            limits,
            args.allow_local_paths,
            ranks,
        )
    )


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The train server's flags, for `python -m train_service` and `bios serve train`. With a prefix (`train-`, for
    `bios serve all`) its ports are --train-port, --train-metrics-port and --train-health-port, and the flags all
    services share (--host, --pod-ordinal, --allow-local-paths) are the caller's to add once."""
    if not prefix:
        add_host_argument(parser)
    parser.add_argument(f"--{prefix}port", type=int, default=50052, help="gRPC port")
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints are written (default: $BIOS_CHECKPOINT_DIR, else ~/.cache/bios/checkpoints)",
    )
    parser.add_argument(f"--{prefix}metrics-port", type=int, default=9091, help="Prometheus /metrics port (0 = off)")
    if not prefix:
        parser.add_argument(
            "--pod-ordinal",
            type=int,
            default=placement.pod_ordinal(os.environ.get("BIOS_POD_NAME")),
            help="this replica's ordinal, written into the ids it issues (default: from "
            "$BIOS_POD_NAME, e.g. bios-train-3 -> 3; none outside a StatefulSet)",
        )
    add_health_port_argument(parser, prefix)
    if not prefix:
        add_allow_local_paths_argument(parser)
    add_engine_arguments(parser)


def drain_seconds() -> float:
    """How long a stopping server lets queued work finish ($BIOS_DRAIN_SECONDS)."""
    return float(os.environ.get("BIOS_DRAIN_SECONDS", "60"))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's device and limits (shared by `python -m train_service` and `bios serve`)."""
    defaults = Limits()
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute decoder layers in backward instead of keeping their activations",
    )
    parser.add_argument(
        "--max-request-tokens",
        type=int,
        default=defaults.max_request_tokens,
        help="tokens in one forward / forward_backward request (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pass-tokens",
        type=int,
        default=defaults.max_pass_tokens,
        help="padded tokens in one pass over a base model; also the longest datum or prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pass-requests",
        type=int,
        default=defaults.max_pass_ops,
        help="requests of different models coalesced into one pass; 1 turns coalescing off (default: %(default)s)",
    )


def engine_options(args: argparse.Namespace) -> tuple[DeviceConfig, Limits]:
    for name in ("max_request_tokens", "max_pass_tokens", "max_pass_requests"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    limits = Limits(args.max_request_tokens, args.max_pass_tokens, args.max_pass_requests)
    return DeviceConfig.resolve(args.device, args.activation_checkpointing), limits
