"""Errors shared by client and servers; each carries the gRPC status code it travels as."""

from __future__ import annotations

import grpc


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
    """The status a server answers with for an exception raised while handling a request."""
    if isinstance(exc, BiosError):
        return exc.code, str(exc)
    if isinstance(exc, (ValueError, TypeError)):  # RenderError, WireError, pydantic ValidationError
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
