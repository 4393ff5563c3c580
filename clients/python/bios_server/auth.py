"""API keys -> tenants. Keys come from a JSON file (a mounted Kubernetes Secret): {"keys": {"<key>": "<tenant>"}}.

With no key file, auth is off and every caller is the tenant "default" (the embedded default, loopback only).
"""

from __future__ import annotations

import contextvars
import hmac
import json
import os
from pathlib import Path

DEFAULT_TENANT = "default"
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("bios_tenant", default=DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the RPC being handled (set by the server interceptor)."""
    return _tenant.get()


def set_tenant(tenant: str) -> contextvars.Token:
    return _tenant.set(tenant)


class ApiKeys:
    def __init__(self, keys: dict[str, str]):
        if not keys:
            raise ValueError("api keys: the key file maps no key to a tenant")
        self._keys = dict(keys)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ApiKeys":
        raw = json.loads(Path(path).read_text())
        return cls(raw.get("keys", raw))

    @classmethod
    def from_env(cls) -> "ApiKeys | None":
        path = os.environ.get("BIOS_API_KEYS_FILE")
        return cls.from_file(path) if path else None

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an `authorization: Bearer <key>` header value, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        key = authorization.removeprefix("Bearer ").strip()
        for known, tenant in self._keys.items():  # constant-time compare of every key
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        return None
