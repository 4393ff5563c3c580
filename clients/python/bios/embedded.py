"""The embedded default: both services started in this process on free loopback ports.

Used when no address is given and BIOS_RENDER_ADDRESS / BIOS_TRAIN_ADDRESS are unset, so a user script
runs with zero setup. The services are process-wide singletons (one copy of each base model). They bind
to 127.0.0.1 only and run without authentication.
"""

from __future__ import annotations

import threading

from bios.futures import LoopThread

_lock = threading.Lock()
_addresses: dict[str, str] = {}
_servers: dict[str, object] = {}


def address(service: str) -> str:
    """host:port of the embedded `render` or `train` service, started on first use."""
    with _lock:
        if service not in _addresses:
            loop = LoopThread.named("bios-embedded-services")
            if service == "render":
                from render_service import server as render_server

                running = loop.run(render_server.start("127.0.0.1", 0))
            elif service == "train":
                from train_service import server as train_server

                running = loop.run(train_server.start("127.0.0.1", 0))
            else:
                raise ValueError(f"service: unknown service {service!r}")
            _servers[service] = running
            _addresses[service] = f"127.0.0.1:{running.port}"
        return _addresses[service]
