"""Typed errors: each carries the stage that failed and whether retrying can help.

Whether an error that is not ours (an OSError, a store client's exception) is transient is decided
in one place, `tasks.io.faults.is_transient`; steps wrap such errors into these types with that answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tasks.core.vocabulary import Stage


class StemworksError(Exception):
    """Base class. `step` names the stage that failed; `retryable` says whether a retry can succeed."""

    step: ClassVar[Stage] = "unknown"
    default_retryable: ClassVar[bool] = False

    def __init__(self, reason: str, *, source: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}" if self.source else self.reason

    def __reduce__(self) -> tuple[Any, ...]:  # keep source/retryable across pickling (Prefect may serialise)
        return (_rebuild, (type(self), self.reason, self.source, self.retryable))


def _rebuild(cls: type[StemworksError], reason: str, source: str | None, retryable: bool) -> StemworksError:
    return cls(reason, source=source, retryable=retryable)


class ConfigurationError(StemworksError):
    """Bad settings detected before any track is processed (unknown model, unavailable device...)."""

    step = "setup"


class FetchError(StemworksError):
    step = "fetch"
    default_retryable = True


class InvalidAudioError(StemworksError):
    """The file is not acceptable audio, or breaks a configured limit. Never retried."""

    step = "validate"


class DecodeError(StemworksError):
    step = "decode"


class SeparationError(StemworksError):
    step = "separate"


class ClaimError(StemworksError):
    """A job claim could not be read or written (taken right before separating)."""

    step = "separate"


class PublishError(StemworksError):
    step = "publish"
    default_retryable = True
