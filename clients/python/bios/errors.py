"""Errors shared by client and servers; each carries the gRPC status code it travels as."""

from __future__ import annotations

import logging
import uuid

try:
    import grpc
except ImportError:  # the train engine's numerical core runs without gRPC (benchmarks/gpu_check.py on a bare GPU)
    grpc = None

log = logging.getLogger("bios.server")


def _code(name: str):
    """grpc.StatusCode.<name>, or the name itself where gRPC is not installed."""
    return getattr(grpc.StatusCode, name) if grpc is not None else name


class BiosError(Exception):
    code = _code("INTERNAL")


class InvalidArgumentError(BiosError, ValueError):
    code = _code("INVALID_ARGUMENT")


class NotFoundError(BiosError, LookupError):
    code = _code("NOT_FOUND")


class FailedPreconditionError(BiosError):
    code = _code("FAILED_PRECONDITION")


class UnauthenticatedError(BiosError):
    code = _code("UNAUTHENTICATED")


class PermissionDeniedError(BiosError):
    code = _code("PERMISSION_DENIED")


class UnavailableError(BiosError):
    code = _code("UNAVAILABLE")


class DeadlineExceededError(BiosError, TimeoutError):
    code = _code("DEADLINE_EXCEEDED")


class CancelledError(BiosError):
    code = _code("CANCELLED")


class ResourceExhaustedError(BiosError):
    code = _code("RESOURCE_EXHAUSTED")


class InternalError(BiosError):
    code = _code("INTERNAL")


_BY_CODE = {cls.code: cls for cls in BiosError.__subclasses__()}


def from_status(code: grpc.StatusCode, details: str) -> BiosError:
    """The client-side exception for a status received from a server."""
    return _BY_CODE.get(code, BiosError)(f"{code.name}: {details}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a server answers with for an exception raised while handling a request.

    Only our own error classes choose a status: they are raised on purpose, with a message naming the field.
    Anything else is a server bug, whatever its Python type (a stray KeyError is not NOT_FOUND): the caller gets
    INTERNAL with a generic message and an id, and the traceback is logged under that id.
    """
    if isinstance(exc, BiosError):
        return exc.code, str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (the server logged it as error {error_id})"
