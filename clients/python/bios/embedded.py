"""The embedded default: both services started in this process on free loopback ports, and an orderly exit.

Used when no address is given and BIOS_RENDER_ADDRESS / BIOS_TRAIN_ADDRESS are unset, so a user script
runs with zero setup. The services are process-wide singletons (one copy of each base model). They bind
to 127.0.0.1 only, run without authentication, and let their caller name local paths (it owns the machine).

Nothing submitted is lost when a script ends without waiting: at interpreter exit every open ServiceClient
waits for its unanswered operations (at most $BIOS_EXIT_WAIT_SECONDS, reported if exceeded), then the
embedded services drain and stop, so no torch work is still running while the interpreter finalizes. The
services also stop when the last client using them is closed (a later client starts them again). The exit
code stays the script's own: nothing here raises or exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from bios.futures import LoopThread

log = logging.getLogger("bios")
EXIT_WAIT_SECONDS = float(os.environ.get("BIOS_EXIT_WAIT_SECONDS", "600"))
STOP_GRACE_SECONDS = 10.0  # for in-flight RPCs and the engine's last work, once every operation is answered

_lock = threading.RLock()
_addresses: dict[str, str] = {}
_servers: dict[str, Any] = {}
_users: dict[str, set[int]] = {"render": set(), "train": set()}  # ids of the open clients using each service
_open_clients: dict[int, Any] = {}  # every open ServiceClient, embedded or remote: exit waits for each
_exit_hook_registered = False
_exiting = False


def address(service: str, client: Any = None) -> str:
    """host:port of the embedded `render` or `train` service, started on first use; `client` uses it."""
    if service not in _users:
        raise ValueError(f"service: unknown service {service!r}")
    with _lock:
        if service not in _addresses:
            loop = LoopThread.named("bios-embedded-services")
            if service == "render":
                from render_service import server as render_server

                running = loop.run(render_server.start("127.0.0.1", 0, allow_local_paths=True))
            else:
                from train_service import server as train_server

                running = loop.run(train_server.start("127.0.0.1", 0, allow_local_paths=True))
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
    if running is None or not path.startswith("bios://"):
        return None
    return str(running.sessions.store.root.joinpath(*path.removeprefix("bios://").split("/")))


def opened(client: Any) -> None:
    _register_exit_hook()
    with _lock:
        _open_clients[id(client)] = client


def closed(client: Any) -> None:
    """`client` is closed: the embedded services it used stop if no other open client uses them."""
    with _lock:
        _open_clients.pop(id(client), None)
        if _exiting:
            return  # shutdown() stops the services itself, after every client
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


def shutdown(timeout: float = EXIT_WAIT_SECONDS) -> None:
    """What interpreter exit runs: wait until every open client's operations are answered (at most `timeout`
    seconds, reported if exceeded; a second Ctrl-C stops the wait), close the clients, stop the services."""
    global _exiting
    deadline = time.monotonic() + timeout
    with _lock:
        _exiting = True
        clients = list(_open_clients.values())
    abandon = False
    try:
        if (left := _unanswered(clients, time.monotonic() + min(5.0, timeout / 2))) and time.monotonic() < deadline:
            log.warning("bios: waiting up to %.0f s for %d unanswered operations before exit (Ctrl-C stops waiting)",
                        deadline - time.monotonic(), left)
        if left and (left := _unanswered(clients, deadline)):
            log.warning("bios: %d operations still unanswered after %.0f s ($BIOS_EXIT_WAIT_SECONDS); exiting "
                        "without them", left, timeout)
            abandon = True
    except KeyboardInterrupt:
        log.warning("bios: interrupted at exit: not waiting for unanswered operations")
        abandon = True
    for client in clients:
        try:
            client._shutdown(wait=False, timeout=None, retry=False)
        except Exception as exc:  # noqa: BLE001 - e.g. its server is gone already; the others still close
            log.debug("bios: closing a client at exit: %s", exc)
    for service in ("train", "render"):
        try:
            stop(service, STOP_GRACE_SECONDS, abandon)
        except BaseException:  # noqa: BLE001 - exit goes on, with the script's own exit code
            log.exception("bios: stopping the embedded %s service at exit failed", service)


def _unanswered(clients: list[Any], deadline: float) -> int:
    """Wait until the clients' operations are answered or `deadline` passes; how many are not."""
    for client in clients:
        client.wait_for_operations(max(0.0, deadline - time.monotonic()))
    return sum(client.wait_for_operations(0) for client in clients)


def _register_exit_hook() -> None:
    """Run shutdown() when the main thread ends, before the interpreter shuts thread pools down.

    threading's own exit hooks (what concurrent.futures and asyncio.to_thread rely on) run before atexit, and
    after them no thread pool accepts work, while the services need theirs to answer the last operations. A
    hook registered here after concurrent.futures.thread is imported runs before the pools' own (last in,
    first out)."""
    global _exit_hook_registered
    with _lock:
        if _exit_hook_registered:
            return
        _exit_hook_registered = True
    import concurrent.futures.thread  # noqa: F401 - its hook must be registered first, so that it runs last

    register = getattr(threading, "_register_atexit", None)
    if register is None:  # not CPython >= 3.9: atexit is the best there is
        import atexit

        atexit.register(shutdown)
    else:
        register(shutdown)
