"""Which object-store failures are transient (worth retrying) and how to describe them safely.

s3fs surfaces botocore and aiohttp errors that are not `OSError`s, so the generic rule in
`tasks.errors.is_retryable` would treat an S3 outage as permanent; this module classifies them.
"""

from __future__ import annotations

import asyncio

_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                       "503", "500", "502", "504"}


def _store_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the optional store clients that are installed."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        found += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError
        found.append(ClientError)
    except ImportError:
        pass
    return tuple(found)


def _s3_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(error.get("Code") or status or "") or None
    return None


def is_transient(exc: BaseException) -> bool:
    """Timeouts, dropped connections and 5xx/throttling answers: a later attempt may succeed."""
    if isinstance(exc, _PERMANENT_OS):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _store_errors()):
        return True
    code = _s3_error_code(exc)
    if code is not None:
        return code in _TRANSIENT_S3_CODES
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and is_transient(cause):
        return True
    return isinstance(exc, OSError)


def describe(exc: BaseException) -> str:
    """One line for users and the catalog: the error's own message (never the request's credentials)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__module__.startswith(("botocore", "aiohttp")) else text
