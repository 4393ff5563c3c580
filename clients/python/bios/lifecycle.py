"""Open clients and an orderly exit; the embedded default found (not imported) when a client needs it.

Nothing submitted is lost when a script ends without waiting: at interpreter exit every open ServiceClient
waits for its unanswered operations (at most $BIOS_EXIT_WAIT_SECONDS, reported if exceeded), then the
embedded services (if this process started any) drain and stop, so no torch work is still running while the
interpreter finalizes. The exit code stays the script's own: nothing here raises or exits.

The embedded default lives in `bios_server.embedded`, part of the full install (both services, torch): this
client never imports it statically, so the light client installs and runs without it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from typing import Any

from bios.errors import FailedPreconditionError

log = logging.getLogger("bios")
EXIT_WAIT_SECONDS = float(os.environ.get("BIOS_EXIT_WAIT_SECONDS", "600"))
EMBEDDED = "bios_server.embedded"

_lock = threading.RLock()
_open_clients: dict[int, Any] = {}  # every open ServiceClient, embedded or remote: exit waits for each
_exit_hook_registered = False
_exiting = False


def embedded_address(service: str, client: Any) -> str:
    """host:port of the embedded `render` or `train` service, started on first use, for `client`."""
    try:
        embedded = importlib.import_module(EMBEDDED)
    except ModuleNotFoundError as exc:
        raise FailedPreconditionError(
            f"{service}_address: no address given and BIOS_{service.upper()}_ADDRESS is unset, so the embedded "
            f"default would start the services in this process, which needs the full install (the repository's "
            f"package: both services, torch, transformers, peft; missing: {exc.name}). Give the addresses of "
            f"running services instead: ServiceClient(render_address=..., train_address=...)"
        ) from None
    return embedded.address(service, client)


def embedded_module() -> Any:
    """bios_server.embedded if this process has loaded it (it started services), else None."""
    return sys.modules.get(EMBEDDED)


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
    if (embedded := embedded_module()) is not None:
        embedded.release(client)


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
            log.warning(
                "bios: waiting up to %.0f s for %d unanswered operations before exit (Ctrl-C stops waiting)",
                deadline - time.monotonic(),
                left,
            )
        if left and (left := _unanswered(clients, deadline)):
            log.warning(
                "bios: %d operations still unanswered after %.0f s ($BIOS_EXIT_WAIT_SECONDS); exiting without them",
                left,
                timeout,
            )
            abandon = True
    except KeyboardInterrupt:
        log.warning("bios: interrupted at exit: not waiting for unanswered operations")
        abandon = True
    for client in clients:
        try:
            client._shutdown(wait=False, timeout=None, retry=False)
        except Exception as exc:  # noqa: BLE001 - e.g. its server is gone already; the others still close
            log.debug("bios: closing a client at exit: %s", exc)
    if (embedded := embedded_module()) is not None:
        embedded.stop_all(abandon)


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
    importlib.import_module("concurrent.futures.thread")  # its hook must be registered first, so it runs last
    threading._register_atexit(shutdown)  # type: ignore[attr-defined]  # CPython >= 3.9 (we need 3.11)
