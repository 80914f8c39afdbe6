"""Typed errors: each carries the pipeline step that failed and whether retrying can help."""

from __future__ import annotations

from typing import ClassVar


class StemworksError(Exception):
    """Base class. `step` names the pipeline step; `retryable` says whether a retry can succeed."""

    step: ClassVar[str] = "unknown"
    default_retryable: ClassVar[bool] = False

    def __init__(self, reason: str, *, source: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}" if self.source else self.reason

    def __reduce__(self):  # keep source/retryable across pickling (Prefect may serialise exceptions)
        return (_rebuild, (type(self), self.reason, self.source, self.retryable))


def _rebuild(cls: type[StemworksError], reason: str, source: str | None, retryable: bool) -> StemworksError:
    return cls(reason, source=source, retryable=retryable)


class ConfigurationError(StemworksError):
    """Bad settings detected before any track is processed (unknown model, unavailable device...)."""

    step = "setup"


class SourceError(StemworksError):
    """A source could not be expanded into tracks (missing path, unsupported scheme)."""

    step = "expand"


class FetchError(StemworksError):
    step = "fetch"
    default_retryable = True


class ValidationError(StemworksError):
    """The file is not acceptable audio, or breaks a configured limit. Never retried."""

    step = "validate"


class DecodeError(StemworksError):
    step = "decode"


class SeparationError(StemworksError):
    step = "separate"


class ScoringError(StemworksError):
    step = "score"


class PublishError(StemworksError):
    step = "publish"
    default_retryable = True


def is_retryable(exc: BaseException) -> bool:
    """Transient failures are retried; our own permanent errors and programming errors are not."""
    if isinstance(exc, StemworksError):
        return exc.retryable
    permanent_os_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, permanent_os_errors)
