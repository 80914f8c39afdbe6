"""The one rule for "is this failure transient?", and how to describe a failure safely.

Steps wrap every exception they meet into a typed `StemworksError` whose `retryable` flag comes from
`is_transient`; Prefect's retry condition asks `is_transient` too. s3fs surfaces botocore and aiohttp
errors that are not `OSError`s, and URL fetches meet HTTP statuses: both are classified here too.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tasks.core.errors import StemworksError

T = TypeVar("T")


class NotRegularFileError(OSError):
    """The path is a FIFO, device or socket: reading it could block forever, so it is refused, never retried."""


# Retrying cannot make these succeed: the path is wrong, or we may not read it.
PERMANENT_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    NotRegularFileError,
)
# The same for OSErrors Python gives no subclass of: a symbolic link loop, a name too long, a special
# file without a device or a reader (ENXIO: e.g. opening a socket), a read-only file system.
PERMANENT_ERRNOS = frozenset({errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO, errno.ENODEV, errno.EROFS})
# HTTP answers that mean "try again later" (timeouts, throttling, server trouble).
TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        *(str(status) for status in TRANSIENT_HTTP_STATUSES),
    }
)


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
    if isinstance(exc, StemworksError):
        return exc.retryable
    if isinstance(exc, PERMANENT_OS_ERRORS) or (isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS):
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


def is_transient_http_status(status: int) -> bool:
    return status in TRANSIENT_HTTP_STATUSES


def describe(exc: BaseException) -> str:
    """One line for users and the catalog: the error's own message (never the request's credentials)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__module__.startswith(("botocore", "aiohttp")) else text


def retry_transient(
    call: Callable[[], T],
    delays: Sequence[float],
    *,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """`call()`, called again after each of `delays` while it fails transiently (`is_transient`).

    For store calls made outside a retried Prefect task. A permanent failure, or the last transient one,
    is raised.
    """
    for delay in delays:
        try:
            return call()
        except Exception as exc:  # classified by is_transient; the rest re-raised as they are
            if not is_transient(exc):
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            time.sleep(delay)
    return call()
