"""The embedded default: both services started in this process on free loopback ports.

Used when no address is given and BIOS_RENDER_ADDRESS / BIOS_TRAIN_ADDRESS are unset, so a user script
runs with zero setup (`bios.lifecycle` finds this module then). The services are process-wide singletons (one
copy of each base model). They bind to 127.0.0.1 only, run without authentication, and let their caller name
local paths (it owns the machine). They stop when the last client using them is closed (a later client starts
them again) and at interpreter exit, after every client's operations are answered (`bios.lifecycle`).
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from bios.futures import LoopThread
from train_service import checkpoint_layout as layout

log = logging.getLogger("bios")
STOP_GRACE_SECONDS = 10.0  # for in-flight RPCs and the engine's last work, once every operation is answered

_lock = threading.RLock()
_addresses: dict[str, str] = {}
_servers: dict[str, Any] = {}
_users: dict[str, set[int]] = {"render": set(), "train": set()}  # ids of the open clients using each service


def address(service: str, client: Any = None) -> str:
    """host:port of the embedded `render` or `train` service, started on first use; `client` uses it."""
    if service not in _users:
        raise ValueError(f"service: unknown service {service!r}")
    with _lock:
        if service not in _addresses:
            loop = LoopThread.named("bios-embedded-services")
            # Imported here: the train service loads torch, which a process that only renders never needs.
            server = importlib.import_module(f"{service}_service.server")
            running = loop.run(server.start("127.0.0.1", 0, allow_local_paths=True))
            _servers[service] = running
            _addresses[service] = f"127.0.0.1:{running.port}"
        if client is not None:
            _users[service].add(id(client))
        return _addresses[service]


def checkpoint_directory(path: str) -> str | None:
    """Where a checkpoint (bios://<model>/<kind>/<name>) of the embedded train service lies on this machine;
    None when no embedded train service runs in this process (a remote server's disk is its own)."""
    with _lock:
        running = _servers.get("train")
    if running is None or not path.startswith(layout.SCHEME):
        return None
    return str(running.sessions.store.root.joinpath(*layout.split(path)))


def release(client: Any) -> None:
    """`client` is closed: the services it used stop if no other open client uses them."""
    with _lock:
        idle = []
        for service, users in _users.items():
            if id(client) in users:
                users.discard(id(client))
                if not users:
                    idle.append(service)
    for service in idle:
        stop(service)


def stop(service: str, grace: float = STOP_GRACE_SECONDS, abandon: bool = False) -> None:
    """Drain and stop one embedded service (if running); the next address() starts it again. `abandon`: drop
    the train engine's queued work first (exit after the wait ran out: only what is running still finishes)."""
    with _lock:
        running = _servers.pop(service, None)
        _addresses.pop(service, None)
        _users[service].clear()
    if running is None:
        return
    loop = LoopThread.named("bios-embedded-services")
    if service == "train":  # the sessions end with the process: no drain checkpoints
        if abandon:
            running.abandon_queued()
        if not loop.run(running.stop(grace, checkpoint=False)):
            log.warning("bios: the embedded train engine was still running %.0f s after its stop", grace)
    else:
        loop.run(running.stop(grace))


def stop_all(abandon: bool = False) -> None:
    """At exit, after every client: stop the train service, then the render service."""
    for service in ("train", "render"):
        try:
            stop(service, STOP_GRACE_SECONDS, abandon)
        except BaseException:  # noqa: BLE001 - exit goes on, with the script's own exit code
            log.exception("bios: stopping the embedded %s service at exit failed", service)
