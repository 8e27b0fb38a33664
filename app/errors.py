"""Errors that carry an HTTP status and teach the fix.

Every layer raises these; the HTTP ingress turns them into a JSON body
``{"error": message}`` with ``status``, the CLI prints ``message`` and exits 2.
"""

from __future__ import annotations


class EdgebatchError(Exception):
    """Base error: ``status`` is the HTTP status the ingress answers with."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_json(self) -> dict:
        return {"error": self.message}


class BadRequest(EdgebatchError):
    status = 400


class NotFound(EdgebatchError):
    status = 404


class PayloadTooLarge(EdgebatchError):
    status = 413


class Unavailable(EdgebatchError):
    """A dependency (registry, engine, device) is not there; the message says which."""

    status = 503


class RetryLater(EdgebatchError):
    """503 with ``Retry-After``: nothing can serve this now, and the same request may be sent again,
    unchanged, after ``retry_after_s`` (whole seconds, rounded up: RFC 9110). The subclasses say why:
    ``Overloaded`` (it could not be served within its deadline) and ``ReplicaLost`` (the replica
    holding it died). The body always has ``retry: true`` and ``retry_after_s``."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(-(-retry_after_s // 1)))
        self.headers = {"Retry-After": str(self.retry_after_s)}

    def to_json(self) -> dict:
        return {"error": self.message, "retry": True, "retry_after_s": self.retry_after_s}


class ConfigError(EdgebatchError):
    """A configuration field is wrong; the message names the field."""

    status = 400


def one_line(exc: BaseException) -> str:
    """One line for an error from anywhere: our own message, else the last line of a (Ray)
    traceback, else the exception's type (``TimeoutError()`` has no text at all)."""
    text = getattr(exc, "message", None) or str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class Unauthorized(EdgebatchError):
    """No or a wrong bearer token on a guarded route; ``headers`` tells the client the scheme."""

    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="edgebatch"'}


class TooManyRequests(EdgebatchError):
    """Admission refused: the capacity left is in the message."""

    status = 429


class Overloaded(RetryLater):
    """Refused at once because it could not be served before its deadline (load shedding): the reply
    names the queue it would have joined and tells the client when to come back (``Retry-After``)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, queue: dict | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.queue = dict(queue or {})

    def to_json(self) -> dict:
        return {**super().to_json(), "queue": self.queue}

    def later(self, retry_after_s: float) -> Overloaded:
        """The same refusal, telling the client to wait at least ``retry_after_s``."""
        return Overloaded(self.message, retry_after_s=max(self.retry_after_s, retry_after_s), queue=self.queue)


class ReplicaLost(RetryLater):
    """The replica that held a request died with it; another (or the restarted one) can take it again."""
