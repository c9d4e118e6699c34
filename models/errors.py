"""The one error hierarchy. Every expected failure is an `AppError` with an HTTP status and a
stable machine-readable `code`; the HTTP layer renders it as a problem document.

Errors cross actor boundaries, so they must pickle: `__reduce__` rebuilds them from their
state instead of relying on `Exception.args`.
"""

from __future__ import annotations

from typing import Any


def _restore(cls: type[AppError], state: dict[str, Any]) -> AppError:
    err = cls.__new__(cls)
    Exception.__init__(err, state["message"])
    err.__dict__.update(state)
    return err


class AppError(Exception):
    status_code: int = 400
    code: str = "bad_request"
    # When True the request's transaction is committed before the error is returned: the
    # failure itself is state that must stick (e.g. a wrong OTP attempt is counted).
    keep_changes: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}
        self.extra = extra or {}

    def with_kept_changes(self) -> AppError:
        """Mark this error as one whose transaction must still be committed."""
        self.keep_changes = True
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), dict(self.__dict__)))


class BadRequest(AppError):
    pass


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "Authentication required", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class Unprocessable(AppError):
    status_code = 422
    code = "validation_error"


class TooManyRequests(AppError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, **kw: Any) -> None:
        retry_after = max(1, int(retry_after))
        kw["headers"] = {"Retry-After": str(retry_after), **kw.get("headers", {})}
        kw["extra"] = {"retry_after": retry_after, **kw.get("extra", {})}
        super().__init__(message, **kw)


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"
