"""Client channels: message size limits shared with the servers, and optional TLS."""

from __future__ import annotations

import os

import grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a restart; the client's own retries (with backoff) do the rest.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(address: str, tls_ca: str | None = None) -> grpc.aio.Channel:
    """An aio channel; TLS when a CA certificate is given (argument or $BIOS_TLS_CA)."""
    tls_ca = tls_ca or os.environ.get("BIOS_TLS_CA")
    if tls_ca:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
