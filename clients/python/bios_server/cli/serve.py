"""`bios serve render|train|tinker|all`: the services, with exactly the flags and defaults of the standalone servers
(`python -m render_service`, `python -m train_service`, `python -m tinker_gateway`): each server module declares
its own flags and both entry points use them. `all` runs the three in one process; there the flags every service
shares (--host, --allow-local-paths, --pod-ordinal) are given once and each service's ports carry its name
(--render-port, --train-metrics-port, ...), with each standalone server's defaults.

Services listen on --host (default 0.0.0.0, every interface); without API keys ($BIOS_API_KEYS_FILE) anyone who can
reach the ports can use them, and the command says so. Ctrl-C or SIGTERM drains and stops them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from bios_server.auth import ApiKeys
from bios_server.cli.output import Console
from bios_server.grpc import (
    add_allow_local_paths_argument,
    add_host_argument,
    catch_stop_signals,
    wait_for_signal,
    warn_if_open,
)
from bios_server.metrics import serve_metrics
from render_service import server as render_server

SERVICES = {
    "render": "the render service (as python -m render_service)",
    "train": "the train service (as python -m train_service)",
    "tinker": "the Tinker-compatible REST gateway, onto a train service (as python -m tinker_gateway)",
    "all": "render + train + the Tinker gateway, in this one process",
}


def register(command, common, with_server_flags: bool = True) -> None:
    """`with_server_flags=False` lists the services without importing the servers (they load torch): every other
    command, and `bios --help`, starts without them."""
    p = command("serve", "run the services", __doc__)
    kinds = p.add_subparsers(dest="service", required=True, metavar="SERVICE", parser_class=type(p))
    for name, help in SERVICES.items():
        sub = kinds.add_parser(
            name, help=help, description=f"Run {help}.", formatter_class=p.formatter_class, parents=[common]
        )
        if with_server_flags:
            add_server_flags(sub, name)
        sub.set_defaults(run=run)


def add_server_flags(parser: Any, service: str) -> None:
    from tinker_gateway import server as tinker_server  # noqa: PLC0415 - loads torch: only for `bios serve`
    from train_service import server as train_server  # noqa: PLC0415 - loads torch: only for `bios serve`

    if service == "render":
        render_server.add_arguments(parser)
    elif service == "train":
        train_server.add_arguments(parser)
    elif service == "tinker":
        tinker_server.add_server_arguments(parser)
    else:
        add_host_argument(parser)
        add_allow_local_paths_argument(parser)
        render_server.add_arguments(parser, "render-")
        train_server.add_arguments(parser, "train-")
        tinker_server.add_arguments(parser)  # --tinker-port and --pod-ordinal (the train service's too)


def run(args: Any, console: Console) -> int:
    asyncio.run(_serve(args, console))
    return 0


async def _serve(args: Any, console: Console) -> None:
    signalled = catch_stop_signals()
    stops: list[Callable[[], Awaitable[Any]]] = []

    async def stop_all() -> None:
        for stop in stops:
            await stop()

    try:
        await _start(args, console, stops)
    except BaseException:
        await stop_all()  # what did start stops cleanly before the error is shown
        raise
    logging.getLogger("bios.cli").info("serving until SIGTERM or Ctrl-C")
    await wait_for_signal(stop_all, signalled)


async def _start(args: Any, console: Console, stops: list) -> None:
    """Start the chosen services; each one's stop goes into `stops` (in the order to call them)."""
    keys, service = ApiKeys.from_env(), args.service
    several = service == "all"

    def flag(name: str, prefix: str) -> Any:  # --render-port in `all`, --port alone
        return getattr(args, f"{prefix}{name}" if several else name)

    def listening(what: str, port: int, metrics: int, health: int | None = None) -> None:
        extra = (f", metrics on :{metrics}" if metrics else ", metrics off") + (
            f", health on :{health}" if health else ""
        )
        console.print(f"{what} on {args.host}:{port}{extra}")

    if service in ("render", "all"):
        warn_if_open("render service", args.host, keys)
        render_running = await render_server.start(
            args.host,
            flag("port", "render_"),
            keys,
            args.workers,
            flag("health_port", "render_") or None,
            args.allow_local_paths,
        )
        stops.append(render_running.stop)
        if metrics := flag("metrics_port", "render_"):
            serve_metrics(metrics, service="render" if several else None)
        listening("render service", render_running.port, metrics, render_running.health_port)
    train_address = None
    if service in ("train", "all"):
        from train_service import server as train_server  # noqa: PLC0415 - loads torch: only for `bios serve`

        warn_if_open("train service", args.host, keys)
        device, limits = train_server.engine_options(args)
        train_running = await train_server.start(
            args.host,
            flag("port", "train_"),
            args.checkpoint_dir,
            keys,
            flag("health_port", "train_") or None,
            args.pod_ordinal,
            device,
            limits,
            args.allow_local_paths,
        )
        stops.append(lambda: train_running.stop(grace=train_server.drain_seconds()))
        if metrics := flag("metrics_port", "train_"):
            serve_metrics(metrics, service="train" if several else None)
        listening(
            f"train service ({device.describe()}, {device.dtype_name})",
            train_running.port,
            metrics,
            train_running.health_port,
        )
        train_address = f"127.0.0.1:{train_running.port}"
    if service in ("tinker", "all"):
        from tinker_gateway import server as tinker_server  # noqa: PLC0415 - loads torch: only for `bios serve`

        warn_if_open("tinker gateway", args.host, keys)
        gateway = await tinker_server.start(
            args.host, args.tinker_port, train_address or args.train_address, keys, args.pod_ordinal
        )
        stops.insert(0, gateway.stop)  # the gateway stops first: its requests go to the train service
        console.print(
            f"tinker gateway on http://{args.host}:{gateway.port} -> train service "
            f"{gateway.app.train_address} (TINKER_BASE_URL=http://localhost:{gateway.port})"
        )
