"""Job claims: a track's job key is claimed before it is separated, so that it is separated once even when
several runs (processes, hosts, shards) want it at the same time.

A claim is a small JSON object at `<out>/.stemworks-claims/<job key>.json`, beside the outputs it
protects, so every host that can publish there can also see who is working on what:

- local folders: the claims folder is locked (`flock`) around each read-check-write, and the claim file
  is replaced atomically; the lock is held for microseconds and released by the kernel if a process dies;
- S3: conditional writes (`If-None-Match: *` to create, `If-Match: <etag>` to take over or renew), which
  S3 (and MinIO, R2, moto) evaluate atomically;
- other stores: a read then a write (not atomic); two runs may then rarely separate the same track twice,
  but publish still never replaces a complete folder.

A claim has a lease (`expires_at`), renewed while its track is worked on. It can be taken over when the
lease ran out, or at once when its process is known to be dead (same host, pid gone).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.asyn import sync
from pydantic import AwareDatetime, ValidationError

from tasks.core.errors import ClaimError
from tasks.core.records import Record
from tasks.io.faults import describe, is_transient
from tasks.io.locations import redact
from tasks.io.processes import ProcessStamp
from tasks.io.storage import filesystem, is_local

CLAIMS_DIR = ".stemworks-claims"
# Long enough that renewals (every third of it) survive a busy machine; short enough that a track whose
# host vanished is taken over the same hour. `STEMWORKS_CLAIM_LEASE_S` overrides it.
DEFAULT_LEASE_S = 600.0
_FOLDER_LOCK_TIMEOUT_S = 30.0


# Tokens of the claims this process holds right now. A claim on the store that names this very process but
# is not in here was left by a run of this process that could not release it (e.g. the store was down as it
# ended): it is stale at once instead of blocking this process's next run until its lease lapses. This is a
# fact about the process (as a pid is), so it lives at module level, behind a lock.
_HELD_HERE: set[str] = set()
_HELD_HERE_LOCK = threading.Lock()


def _mine_but_abandoned(holder: Holder) -> bool:
    me = ProcessStamp.current()
    same = (holder.process.hostname, holder.process.pid, holder.process.started) == (me.hostname, me.pid, me.started)
    with _HELD_HERE_LOCK:
        return same and holder.token not in _HELD_HERE


def lease_seconds() -> float:
    value = os.environ.get("STEMWORKS_CLAIM_LEASE_S")
    try:
        return max(5.0, float(value)) if value else DEFAULT_LEASE_S
    except ValueError:
        return DEFAULT_LEASE_S


class Holder(Record):
    """Who holds a claim: the run, the track's source, the process, and until when."""

    job_key: str
    run_id: str
    token: str
    source: str
    process: ProcessStamp
    claimed_at: AwareDatetime
    expires_at: AwareDatetime

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def dead(self) -> bool:
        """Its process is known to be gone (only knowable on the same host)."""
        return self.process.alive() is False

    def stale(self) -> bool:
        return self.expired() or self.dead() or _mine_but_abandoned(self)

    def describe(self) -> str:
        return f"run {self.run_id} ({self.process.describe()}) for {self.source}"

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=1).encode()


@dataclass
class Claim:
    """A claim this process holds. `etag` is the object's version on stores with conditional writes."""

    out: str
    holder: Holder
    etag: str | None = None

    @property
    def job_key(self) -> str:
        return self.holder.job_key


def claim_path(root: str, job_key: str) -> str:
    return f"{root.rstrip('/')}/{CLAIMS_DIR}/{job_key}.json"


def try_claim(out: str, job_key: str, *, run_id: str, source: str, lease_s: float | None = None) -> Claim | Holder:
    """Claim `job_key` under `out`: the claim, or the live holder that has it."""
    now = datetime.now(UTC)
    holder = Holder(
        job_key=job_key,
        run_id=run_id,
        token=uuid.uuid4().hex,
        source=redact(source),
        process=ProcessStamp.current(),
        claimed_at=now,
        expires_at=now + timedelta(seconds=lease_s or lease_seconds()),
    )
    with _HELD_HERE_LOCK:  # before the write: a claim on the store is never taken for abandoned by its own process
        _HELD_HERE.add(holder.token)
    got: Claim | Holder | None = None
    try:
        with _store_errors(out, "taking"):
            fs, root = filesystem(out)
            got = _backend(fs).acquire(fs, claim_path(root, job_key), holder, out)
    finally:
        if not isinstance(got, Claim):
            with _HELD_HERE_LOCK:
                _HELD_HERE.discard(holder.token)
    assert got is not None  # the store call either answered or raised
    return got


def renew(claim: Claim, lease_s: float | None = None) -> bool:
    """Extend the lease; False when the claim was lost (taken over after it lapsed)."""
    expires = datetime.now(UTC) + timedelta(seconds=lease_s or lease_seconds())
    with _store_errors(claim.out, "renewing"):
        fs, root = filesystem(claim.out)
        return _backend(fs).renew(fs, claim_path(root, claim.job_key), claim, expires)


def release(claim: Claim) -> None:
    """Give the claim up (if it is still ours). Best effort: a claim left behind lapses with its lease (at once
    for this process's next runs, and as soon as this process is gone for the others on its host)."""
    with _HELD_HERE_LOCK:
        _HELD_HERE.discard(claim.holder.token)
    with contextlib.suppress(ClaimError), _store_errors(claim.out, "releasing"):
        fs, root = filesystem(claim.out)
        _backend(fs).release(fs, claim_path(root, claim.job_key), claim)


def read_claims(out: str) -> list[tuple[str, Holder | None]]:
    """Every claim under `out` as (location, holder); holder None for a file that cannot be read."""
    fs, root = filesystem(out)
    folder = f"{root.rstrip('/')}/{CLAIMS_DIR}"
    try:
        names = [p for p in fs.ls(folder, detail=False) if str(p).endswith(".json")]
    except FileNotFoundError:
        return []
    found: list[tuple[str, Holder | None]] = []
    for path in names:
        try:
            found.append((str(path), Holder.model_validate_json(fs.cat_file(path))))
        except FileNotFoundError:
            continue  # released meanwhile
        except (ValidationError, ValueError):
            found.append((str(path), None))
    return found


def remove_claim_file(out: str, path: str) -> None:
    fs, _ = filesystem(out)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


@contextlib.contextmanager
def _store_errors(out: str, doing: str) -> Iterator[None]:
    try:
        yield
    except ClaimError:
        raise
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types; classify them all
        raise ClaimError(
            f"{doing} the job claim under {redact(out)} failed: {describe(exc)}", retryable=is_transient(exc)
        ) from None


def _backend(fs: AbstractFileSystem) -> _Backend:
    if is_local(fs):
        return _LocalBackend()
    if getattr(fs, "call_s3", None) is not None:
        return _S3Backend()
    return _PlainBackend()


class _Backend:
    def acquire(self, fs: AbstractFileSystem, path: str, holder: Holder, out: str) -> Claim | Holder:
        raise NotImplementedError

    def renew(self, fs: AbstractFileSystem, path: str, claim: Claim, expires: datetime) -> bool:
        raise NotImplementedError

    def release(self, fs: AbstractFileSystem, path: str, claim: Claim) -> None:
        raise NotImplementedError


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder.model_validate_json(data)
    except (ValidationError, ValueError):
        return None  # a torn or foreign file claims nothing


class _LocalBackend(_Backend):
    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + _FOLDER_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ClaimError(f"the claims folder {folder} stayed locked", retryable=True) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the lock

    def _read(self, path: Path) -> Holder | None:
        try:
            return _parse(path.read_bytes())
        except FileNotFoundError:
            return None

    def _write(self, path: Path, holder: Holder) -> None:
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        temporary.write_bytes(holder.to_bytes())
        os.replace(temporary, path)

    def acquire(self, fs: AbstractFileSystem, path: str, holder: Holder, out: str) -> Claim | Holder:
        target = Path(path)
        with self._locked(target.parent):
            current = self._read(target)
            if current is not None and not current.stale():
                return current
            self._write(target, holder)
        return Claim(out=out, holder=holder)

    def renew(self, fs: AbstractFileSystem, path: str, claim: Claim, expires: datetime) -> bool:
        target = Path(path)
        with self._locked(target.parent):
            current = self._read(target)
            if current is None or current.token != claim.holder.token:
                return False
            claim.holder = claim.holder.model_copy(update={"expires_at": expires})
            self._write(target, claim.holder)
        return True

    def release(self, fs: AbstractFileSystem, path: str, claim: Claim) -> None:
        target = Path(path)
        with self._locked(target.parent):
            current = self._read(target)
            if current is not None and current.token == claim.holder.token:
                target.unlink(missing_ok=True)


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs reports a failed `If-None-Match` as FileExistsError and a failed `If-Match` as EINVAL."""
    text = str(exc)
    return (
        isinstance(exc, FileExistsError)
        or "PreconditionFailed" in text
        or "pre-condition" in text
        or "ConditionalRequestConflict" in text
        or (isinstance(exc, OSError) and exc.errno == errno.EINVAL and "condition" in text)
    )


class _S3Backend(_Backend):
    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _get(self, fs: AbstractFileSystem, path: str) -> tuple[Holder | None, str] | None:
        bucket, key = self._split(path)
        try:
            reply = fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = sync(fs.loop, reply["Body"].read)
        return _parse(body), reply["ETag"]

    def _put(self, fs: AbstractFileSystem, path: str, holder: Holder, **condition: str) -> str | None:
        bucket, key = self._split(path)
        try:
            reply = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=holder.to_bytes(), **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return str(reply["ETag"])

    def acquire(self, fs: AbstractFileSystem, path: str, holder: Holder, out: str) -> Claim | Holder:
        target = path
        for _ in range(5):  # each lap either wins, meets a live holder, or lost a race and looks again
            etag = self._put(fs, target, holder, IfNoneMatch="*")
            if etag is not None:
                return Claim(out=out, holder=holder, etag=etag)
            found = self._get(fs, target)
            if found is None:
                continue  # released between our write and our read
            current, current_etag = found
            if current is not None and current.token == holder.token:
                # our own write, whose reply was lost: the client's retry of it is what failed
                return Claim(out=out, holder=holder, etag=current_etag)
            if current is not None and not current.stale():
                return current
            etag = self._put(fs, target, holder, IfMatch=current_etag)  # take over a lapsed claim
            if etag is not None:
                return Claim(out=out, holder=holder, etag=etag)
        raise ClaimError(f"the claim {target} kept changing under us", retryable=True)

    def renew(self, fs: AbstractFileSystem, path: str, claim: Claim, expires: datetime) -> bool:
        renewed = claim.holder.model_copy(update={"expires_at": expires})
        etag = self._put(fs, path, renewed, IfMatch=claim.etag or "")
        if etag is None:
            found = self._get(fs, path)  # lost to a takeover, or our renewal landed and only its reply was lost
            if found is None or found[0] != renewed:
                return False
            etag = found[1]
        claim.holder, claim.etag = renewed, etag
        return True

    def release(self, fs: AbstractFileSystem, path: str, claim: Claim) -> None:
        found = self._get(fs, path)
        if found is not None and found[0] is not None and found[0].token == claim.holder.token:
            fs.rm_file(path)


class _PlainBackend(_Backend):
    def _read(self, fs: AbstractFileSystem, path: str) -> Holder | None:
        try:
            return _parse(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def acquire(self, fs: AbstractFileSystem, path: str, holder: Holder, out: str) -> Claim | Holder:
        target = path
        current = self._read(fs, target)
        if current is not None and not current.stale():
            return current
        fs.pipe_file(target, holder.to_bytes())
        return Claim(out=out, holder=holder)

    def renew(self, fs: AbstractFileSystem, path: str, claim: Claim, expires: datetime) -> bool:
        current = self._read(fs, path)
        if current is None or current.token != claim.holder.token:
            return False
        claim.holder = claim.holder.model_copy(update={"expires_at": expires})
        fs.pipe_file(path, claim.holder.to_bytes())
        return True

    def release(self, fs: AbstractFileSystem, path: str, claim: Claim) -> None:
        current = self._read(fs, path)
        if current is not None and current.token == claim.holder.token:
            fs.rm_file(path)


@dataclass
class ClaimKeeper:
    """The claims one run holds, renewed in the background while their tracks are worked on.

    The renewing thread runs only while a claim is held, so a keeper nobody closes leaks nothing.
    """

    out: str
    run_id: str
    lease_s: float = field(default_factory=lease_seconds)
    _held: dict[str, Claim] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _wake: threading.Event = field(default_factory=threading.Event)

    def acquire(self, job_key: str, source: str) -> Claim | Holder:
        got = try_claim(self.out, job_key, run_id=self.run_id, source=source, lease_s=self.lease_s)
        if isinstance(got, Claim):
            with self._lock:
                self._held[got.holder.token] = got
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._renew_loop, name="stemworks-claims", daemon=True)
                    self._thread.start()
        return got

    def release(self, claim: Claim | None) -> None:
        if claim is None:
            return
        with self._lock:
            self._held.pop(claim.holder.token, None)
        release(claim)
        self._wake.set()

    def release_held(self, job_key: str, source: str) -> None:
        """Release the claim this keeper holds for `job_key` on behalf of `source` (as shown), if any."""
        with self._lock:
            held = [c for c in self._held.values() if c.job_key == job_key and c.holder.source == redact(source)]
        for claim in held:
            self.release(claim)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for claim in held:
            release(claim)
        self._wake.set()

    def _renew_loop(self) -> None:
        while True:
            self._wake.wait(self.lease_s / 3)
            self._wake.clear()
            with self._lock:
                held = list(self._held.values())
                if not held:
                    self._thread = None
                    return
            for claim in held:
                with contextlib.suppress(ClaimError):
                    renew(claim, self.lease_s)
