"""Errors shared by client and servers; each carries the gRPC status code it travels as."""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger("bios.server")


class BiosError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgumentError(BiosError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(BiosError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(BiosError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(BiosError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(BiosError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(BiosError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(BiosError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(BiosError):
    code = grpc.StatusCode.CANCELLED


class ResourceExhaustedError(BiosError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InternalError(BiosError):
    code = grpc.StatusCode.INTERNAL


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
