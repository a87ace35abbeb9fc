"""Errors a request can cause, each with the HTTP status it is answered with."""

from __future__ import annotations

from sdengine.errors import SdengineError


class ServerError(SdengineError):
    """Base of the server's own refusals; ``status`` is the HTTP status code."""

    status = 400


class BadRequest(ServerError, ValueError):
    """A request the server cannot run (bad field, unknown name, unreadable image)."""

    status = 400


class Unprocessable(ServerError, ValueError):
    """A well-formed request that names nothing usable (the ControlNet extension's 422 answers)."""

    status = 422


class ServerFault(ServerError):
    """The server's own files cannot be read (e.g. its styles file, edited into something broken since start)."""

    status = 500


class Unauthorized(ServerError):
    status = 401


class Forbidden(ServerError):
    """A browser request from a foreign page (Origin), or a Host header that is not this server's."""

    status = 403


class NotFound(ServerError, LookupError):
    status = 404


class PayloadTooLarge(ServerError, ValueError):
    """A body over the byte limit, or an image over the pixel limit (found before decoding)."""

    status = 413


class BodyTimeout(ServerError):
    """A request body that stopped arriving (nothing for the server's body timeout): the connection is freed."""

    status = 408


class QueueFull(ServerError):
    """The job queue holds its maximum; the client should retry after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientQueueFull(QueueFull):
    """This client already has its share of the queue waiting (``--max-queued-per-client``); others are served."""


class ServerStopping(QueueFull):
    """The server is shutting down: no job is accepted (503, which a load balancer retries on another server)."""

    status = 503


class ServerConfigError(SdengineError, ValueError):
    """A server setting that is refused at start (a public bind without a key, a missing folder)."""


def status_of(exc: BaseException) -> int:
    """The HTTP status for an error raised while handling a request (400 for sdengine's input errors)."""
    if isinstance(exc, ServerError):
        return exc.status
    if isinstance(exc, FileNotFoundError):
        return 404
    return 400
