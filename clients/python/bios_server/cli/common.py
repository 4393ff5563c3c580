"""What the commands share: argument types that name the flag in their error, and connecting to the services."""

from __future__ import annotations

import argparse
import os
from typing import Any

import grpc

import bios
from bios_server.cli.output import UsageError


def _parsed(text: str, parse: type, kind: str) -> Any:
    try:
        return parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    if (value := _parsed(text, int, "a whole number")) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    if (value := _parsed(text, int, "a whole number")) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parsed(text, float, "a number")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    if not 0 <= (value := _parsed(text, float, "a number")) < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def connect(args: Any, services: tuple[str, ...] = ("render", "train"), timeout: float = 5.0):
    """A ServiceClient; a configured address that does not answer within `timeout` is one clear error (the client
    itself would retry for ~17 s first)."""
    for service in services:
        address = os.environ.get(f"BIOS_{service.upper()}_ADDRESS")
        if address:
            _probe(service, address, timeout)
    return bios.ServiceClient()


def _probe(service: str, address: str, timeout: float) -> None:
    ca = os.environ.get("BIOS_TLS_CA")
    if ca:
        with open(ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise UsageError(
            f"cannot reach the {service} service at {address} ($BIOS_{service.upper()}_ADDRESS) within "
            f"{timeout:.0f} s: is it running? (`bios serve {service}` starts one; unset the variable "
            "to run the services inside this command)"
        ) from None
    finally:
        channel.close()
