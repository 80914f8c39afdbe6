"""The catalog: a DuckDB file recording every run, track and stem.

Concurrency design. DuckDB lets one process at a time hold a file open for writing (an exclusive
lock), or any number of processes hold it read-only (a shared lock); a second opener gets a
"Could not set lock" IOException at once instead of waiting. Worse, measured with duckdb 2.0.0
(benchmarks/catalog_writes.md): when several processes open, write and close the same file in turn,
the failed read-write open attempts of the waiting processes can make committed rows disappear
(about 4 in 800 with 8 processes), even when each attempt is retried. So:
- every process first takes OS locks (flock: exclusive to write, shared to read) on the sidecar file
  `<catalog>.lock` and then on the folder holding the catalog, waiting with jittered exponential
  backoff for up to `busy_timeout_s` (default 10 minutes); only then does it open the DuckDB file, so
  stemworks processes never race DuckDB's own lock. The folder lock is what makes this hold whatever
  happens to the sidecar: a folder cannot be deleted or replaced while it holds the catalog, whereas
  a sidecar deleted while a writer holds it would let the next writer lock a new file beside it (the
  sidecar is kept for earlier stemworks versions, and for file systems that cannot lock folders, such
  as NFS; a lock is kept only once the locked descriptor is still the file the path names). Read-only
  opens by other programs (the `duckdb` CLI) take neither lock; their failed attempts are harmless,
  and a writer that meets their lock retries until they close;
- every public method opens its own connection, does its work in one short transaction (a few rows)
  and closes it at once: no process holds the file between writes;
- a batch is validated with pandera before its transaction starts and written in one transaction,
  so a killed process (DuckDB's WAL drops uncommitted work on the next open) or a bad batch leaves
  no half-written rows;
- opening a current file needs only a read-only connection; the file is opened read-write to
  create or upgrade it.
A reader that keeps a connection open (an interactive `duckdb` shell) makes writers wait until it
closes; see the README's catalog section. All of this goes through `Catalog._connect`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: no flock; one writing process at a time is then the user's job
    fcntl = None  # type: ignore[assignment]  # the module or None: callers test `fcntl is None`

from catalog import evaluations, rows
from catalog.errors import CatalogBusyError, CatalogError
from catalog.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, create_table_statements
from catalog.views import VIEWS, create_view_statements
from tasks.core.evaluation import EvaluationContext, ItemEvaluation
from tasks.core.records import RecordedTrack, Removal, RunningRun, RunRecord, RunSummary, TrackOutcome
from tasks.core.vocabulary import FinishedRunStatus

# DuckDB's message when another process holds a conflicting lock on the file (duckdb 1.x and 2.x).
_LOCK_CONFLICT = "Could not set lock on file"
_QUERY_INTERRUPTED = "Query interrupted"  # DuckDB's error for a Ctrl-C (SIGINT) that arrived during a query
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.002, 0.05
DEFAULT_BUSY_TIMEOUT_S = 600.0
EXPORT_FORMATS = ("parquet", "csv")
_T = TypeVar("_T")


class Catalog:
    """Records runs, tracks and stems in the DuckDB file at `path`, creating it and its tables if missing.

    `busy_timeout_s`: how long to wait for other processes to release the file before giving up.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # -- writing ---------------------------------------------------------------------------------

    def start_run(self, run: RunRecord, *, rebuilt_from: str | None = None) -> None:
        """Record a run as 'running'. Recording the same run_id twice is an error."""
        frame = rows.run_frame(run, rebuilt_from)

        def write(con: duckdb.DuckDBPyConnection) -> None:
            if _run_exists(con, run.run_id):
                raise CatalogError(f"runs: run_id {run.run_id!r} is already recorded")
            _insert(con, "runs", frame)

        self._write(write)

    def record_track(self, run_id: str, outcome: TrackOutcome) -> str:
        """Record one track and its published stems atomically; returns the new track_id.

        Rows are validated before anything is written: a CatalogValidationError leaves the file unchanged.
        """
        track_id = uuid.uuid4().hex
        try:
            track = rows.track_frame(run_id, track_id, outcome)
            stems = rows.stem_frame(run_id, track_id, outcome)
        except CatalogError as exc:
            raise type(exc)(exc.reason, source=outcome.source) from exc

        def write(con: duckdb.DuckDBPyConnection) -> None:
            if not _run_exists(con, run_id):
                raise CatalogError(f"tracks: run_id {run_id!r} was never started", source=outcome.source)
            _insert(con, "tracks", track)
            if stems is not None:
                _insert(con, "stems", stems)

        self._write(write)
        return track_id

    def finish_run(self, summary: RunSummary) -> None:
        """Set a run's outcome and counts. Finishing again overwrites them (e.g. after a flow retry)."""

        def write(con: duckdb.DuckDBPyConnection) -> None:
            current = con.execute("SELECT * FROM runs WHERE run_id = ?", [summary.run_id]).df()
            if current.empty:
                raise CatalogError(f"runs: run_id {summary.run_id!r} was never started")
            frame = rows.finished_run_frame(current, summary)  # raising here rolls back: nothing changes
            _update_run(con, frame)

        self._write(write)

    def close_unfinished_run(self, run_id: str, finished_at: datetime, status: FinishedRunStatus) -> bool:
        """Close a run that ended without its summary (`crashed`: its process died; `cancelled`; `failed`: its
        flow stopped on an error), with the counts of its recorded tracks.

        Returns False (and changes nothing) when the run is not running any more.
        """

        def write(con: duckdb.DuckDBPyConnection) -> bool:
            current = con.execute("SELECT * FROM runs WHERE run_id = ? AND status = 'running'", [run_id]).df()
            if current.empty:
                return False
            counts = con.execute(
                "SELECT count(*), count(*) FILTER (status = 'succeeded'), count(*) FILTER (status = 'failed'), "
                "count(*) FILTER (status = 'skipped'), "
                "coalesce(sum(audio_seconds) FILTER (status = 'succeeded'), 0) FROM tracks WHERE run_id = ?",
                [run_id],
            ).fetchone()
            assert counts is not None  # an aggregate always returns a row
            total, succeeded, failed, skipped, seconds = counts
            started = current["started_at"].iloc[0].to_pydatetime()
            summary = RunSummary(
                run_id=run_id,
                finished_at=max(finished_at, started),
                status=status,
                tracks_total=total,
                tracks_succeeded=succeeded,
                tracks_failed=failed,
                tracks_skipped=skipped,
                audio_seconds=float(seconds),
            )
            _update_run(con, rows.finished_run_frame(current, summary))
            return True

        return self._write(write)

    def record_removal(self, removal: Removal) -> None:
        """Record that a published output was removed (retention), so views stop listing it."""
        frame = rows.removal_frame(removal)
        self._write(lambda con: _insert(con, "removals", frame))

    def running_runs(self) -> list[RunningRun]:
        """Runs recorded as still running: candidates for `stemworks clean` when their process is gone."""
        sql = "SELECT run_id, hostname, pid, started_at FROM runs WHERE status = 'running' ORDER BY started_at"
        with self.reading() as con:
            found = con.execute(sql).fetchall()
        return [
            RunningRun(run_id=r, hostname=h, pid=None if p is None else int(p), started_at=t) for r, h, p, t in found
        ]

    def record_evaluations(self, context: EvaluationContext, evaluation: ItemEvaluation) -> int:
        """Record one scored item's `evaluations` rows (one per stem) atomically; returns how many.

        Rows are validated before anything is written; an item without scores writes nothing.
        """
        try:
            frame = evaluations.evaluation_frame(context, evaluation)
        except CatalogError as exc:
            raise type(exc)(exc.reason, source=evaluation.item) from exc
        if frame is None:
            return 0

        def write(con: duckdb.DuckDBPyConnection) -> None:
            if not _run_exists(con, context.run_id):
                raise CatalogError(f"evaluations: run_id {context.run_id!r} was never started", source=evaluation.item)
            _insert(con, "evaluations", frame)

        self._write(write)
        return len(frame)

    # -- reading ---------------------------------------------------------------------------------

    def comparable_evaluations(self, content_sha256s: list[str]) -> pd.DataFrame:
        """Every recorded evaluation of these mixtures (by content), oldest run first: what a report compares."""
        with self.reading() as con:
            return con.execute(evaluations.COMPARABLE, [content_sha256s]).df()

    def recorded_manifest_uri(self, job_key: str, out_prefix: str) -> str | None:
        """Most recent manifest_uri of a succeeded track with `job_key` published under `out_prefix`.

        The prefix is matched as a folder: '/data/out' matches '/data/out/x.json' but not
        '/data/out-old/x.json'. It is compared literally (no LIKE wildcards: paths hold '_' and '%').
        """
        folder = out_prefix if out_prefix == "" or out_prefix.endswith("/") else out_prefix + "/"
        sql = """
            SELECT manifest_uri FROM tracks
            WHERE job_key = ? AND status = 'succeeded' AND starts_with(manifest_uri, ?)
            ORDER BY finished_at DESC, started_at DESC
            LIMIT 1
        """
        with self.reading() as con:
            return _scalar(con, sql, [job_key, folder])

    def stems_recorded(self, manifest_uri: str) -> bool:
        """Whether some recorded track published from `manifest_uri` has its stems in the catalog."""
        sql = "SELECT count(*) FROM stems s JOIN tracks t ON t.track_id = s.track_id WHERE t.manifest_uri = ?"
        with self.reading() as con:
            return _scalar(con, sql, [manifest_uri]) > 0

    def running_run(self, run_id: str) -> RunningRun | None:
        """`run_id` if it is recorded here as still running (with its host and pid), else None."""
        return next((run for run in self.running_runs() if run.run_id == run_id), None)

    def runs_of_flow_run(self, flow_run_id: str, *, running_only: bool = False) -> list[str]:
        """run_ids recorded by the Prefect flow run `flow_run_id` (a shard run records one)."""
        sql = "SELECT run_id FROM runs WHERE flow_run_id = ?" + (" AND status = 'running'" if running_only else "")
        with self.reading() as con:
            return [row[0] for row in con.execute(sql, [flow_run_id]).fetchall()]

    def tracks_of_flow_runs(self, flow_run_ids: list[str]) -> list[RecordedTrack]:
        """Every track recorded by runs of these Prefect flow runs (a fanned-out run's shards), with its stems."""
        if not flow_run_ids:
            return []
        sql = """
            SELECT t.run_id, r.flow_run_id, t.source, t.status, t.error, t.error_step, t.manifest_uri,
                   t.audio_seconds, t.skip_reason, t.hostname, t.worker, t.shard, t.finished_at,
                   coalesce(s.stems, []) AS stems
            FROM tracks t
            JOIN runs r ON r.run_id = t.run_id
            LEFT JOIN (SELECT track_id, list(stem ORDER BY stem) AS stems FROM stems GROUP BY track_id) s
                   ON s.track_id = t.track_id
            WHERE r.flow_run_id IN (SELECT unnest(?::VARCHAR[]))
            ORDER BY t.finished_at, t.track_id
        """
        with self.reading() as con:
            result = con.execute(sql, [flow_run_ids])
            columns = [d[0] for d in result.description or []]
            found = result.fetchall()
        return [RecordedTrack.model_validate(dict(zip(columns, row, strict=True))) for row in found]

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement; returns (column names, rows)."""
        with self.reading() as con:
            result = con.execute(sql)
            columns = [d[0] for d in result.description] if result.description else []
            return columns, result.fetchall()

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self.reading() as con:
            return {table: _scalar(con, f'SELECT count(*) FROM "{table}"') for table in TABLES}

    def export(self, folder: str | os.PathLike[str], fmt: str = "parquet") -> list[Path]:
        """Write every table and view to `folder`/<name>.<fmt> from one consistent read; returns the files."""
        if fmt not in EXPORT_FORMATS:
            raise CatalogError(f"export format {fmt!r} is not one of {list(EXPORT_FORMATS)}")
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        options = "FORMAT parquet" if fmt == "parquet" else "FORMAT csv, HEADER true"
        written = []
        with self.reading() as con:
            con.execute("BEGIN TRANSACTION")  # one snapshot: the files agree with each other
            for name in [*TABLES, *VIEWS]:
                path = target / f"{name}.{fmt}"
                con.execute(f"COPY (SELECT * FROM \"{name}\") TO '{_sql_text(str(path))}' ({options})")
                written.append(path)
            con.execute("COMMIT")
        return written

    # -- connections -----------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """The only place that opens the file: sidecar and folder locks first, then DuckDB (see the module doc)."""
        deadline = time.monotonic() + self.busy_timeout_s
        exclusive = not read_only
        with (
            _os_lock(self.lock_path, folder=False, exclusive=exclusive, deadline=deadline, what=self),
            _os_lock(self.path.parent, folder=True, exclusive=exclusive, deadline=deadline, what=self),
        ):
            con = self._open_waiting(read_only, deadline)
            try:
                with interrupts_kept(con):
                    con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ values come back in UTC whatever the host's zone
                    yield con
            finally:
                con.close()

    def _open_waiting(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting out programs that hold DuckDB's own lock without the sidecar one."""
        pause = _FIRST_PAUSE_S
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                if _LOCK_CONFLICT not in str(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._busy(exc) from exc
            pause = _pause(pause, left)

    def _busy(self, detail: object) -> CatalogBusyError:
        return CatalogBusyError(
            f"{self.path} stayed locked by other processes for {self.busy_timeout_s:g} s; "
            f"nothing was written ({detail})"
        )

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._connect(read_only=False) as con:
            try:
                con.execute("BEGIN TRANSACTION")
                yield con
                con.execute("COMMIT")
            except duckdb.ConstraintException as exc:  # validation passed, but the file's state disagrees
                _rollback(con)
                raise CatalogError(f"constraint violated: {exc}") from exc
            except BaseException:
                _rollback(con)
                raise

    def _write(self, work: Callable[[duckdb.DuckDBPyConnection], _T]) -> _T:
        """Run `work` in one write transaction (DuckLakeCatalog runs it again after a transaction conflict)."""
        with self._transaction() as con:
            return work(con)

    @contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection, waiting out writers like every open; close it soon (writers wait for it)."""
        with self._connect(read_only=True) as con:
            yield con

    def _ensure_schema(self) -> None:
        """Create or upgrade the file if needed; a current file is only opened read-only."""
        if self.path.exists():
            with self.reading() as con:
                if self._stored_version(con) == SCHEMA_VERSION:
                    _check_columns(con)
                    return
        with self._transaction() as con:  # re-checked under the write lock: another process may have upgraded it
            for statement in create_table_statements():
                con.execute(statement)
            version = self._stored_version(con)
            if version is None:
                _set_version(con, SCHEMA_VERSION)
            elif version < SCHEMA_VERSION:
                _migrate(con, version)
            for statement in create_view_statements():
                con.execute(statement)
            _check_columns(con)

    def _stored_version(self, con: duckdb.DuckDBPyConnection) -> int | None:
        """The file's schema version (None when new); refuses a file written by newer code."""
        has_table = _scalar(
            con,
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = current_schema() "
            "AND table_name = 'schema_version'",
        )
        version = _scalar(con, "SELECT max(version) FROM schema_version") if has_table else None
        if version is not None and version > SCHEMA_VERSION:
            raise CatalogError(
                f"{self.path} has catalog schema {version}; this code knows up to {SCHEMA_VERSION}: upgrade stemworks"
            )
        return version


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> Any:
    """First value of the first row, or None. Reads the whole result: DuckDB refuses new work on a
    connection while a result is still pending."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


def _pause(pause: float, left: float) -> float:
    """Sleep a jittered `pause` (never past the deadline); return the next, longer one. Jitter keeps
    processes that collided once from colliding again in lock step."""
    time.sleep(max(0.0, min(left, random.uniform(pause / 2, pause))))
    return min(pause * 2, _MAX_PAUSE_S)


@contextmanager
def _os_lock(path: Path, *, folder: bool, exclusive: bool, deadline: float, what: Catalog) -> Iterator[None]:
    """flock on `path` (the sidecar file, or the catalog's folder): exclusive for writers, shared for
    readers, waited for until `deadline`.

    The kernel drops it when the process dies, so a killed writer never leaves the catalog locked.
    """
    fd = _acquire(path, folder=folder, exclusive=exclusive, deadline=deadline, what=what)
    try:
        yield  # closing the descriptor below releases the lock
    finally:
        if fd is not None:
            os.close(fd)


def _acquire(path: Path, *, folder: bool, exclusive: bool, deadline: float, what: Catalog) -> int | None:
    """A descriptor of `path` holding the lock, or None where locking it is impossible and harmless to skip.

    A lock is kept only while `path` still names the locked file: one deleted or replaced between our
    open and our flock is let go, and the file now at `path` is locked instead.
    """
    if fcntl is None:
        return None
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    pause = _FIRST_PAUSE_S
    while True:
        fd = _open_folder(path) if folder else _open_lock_file(path, exclusive)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, mode)
            if _still_named(fd, path):
                return fd
        except BlockingIOError:
            pass
        except OSError:
            os.close(fd)
            if folder:  # a file system that cannot lock folders (NFS): the sidecar alone keeps the turns
                return None
            raise
        os.close(fd)
        left = deadline - time.monotonic()
        if left <= 0:
            raise what._busy(f"lock on {path}")
        pause = _pause(pause, left)


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not deleted, not replaced)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _open_folder(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _open_lock_file(path: Path, exclusive: bool) -> int | None:
    """The lock file's descriptor; None where locking is impossible and harmless to skip (a reader without
    write access to the folder: readers only need it to keep stemworks writers orderly)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if exclusive:
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    # A failed COMMIT has already rolled back, and then ROLLBACK itself fails; the original error matters.
    # After a Ctrl-C, ROLLBACK can wait for the interrupted statement to finish unless it is interrupted again.
    _interrupt(con)
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")


def _interrupt(con: duckdb.DuckDBPyConnection) -> None:
    """Stop whatever the connection still runs; nothing when an error has already closed it."""
    with contextlib.suppress(duckdb.Error):
        con.interrupt()


@contextmanager
def interrupts_kept(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Around a connection's use: a Ctrl-C that DuckDB turned into an error is raised as the KeyboardInterrupt
    it was, and whatever an error left running is interrupted, so that closing the connection does not wait.

    DuckDB consumes a SIGINT that arrives during a query and raises `RuntimeError("Query interrupted")`: the
    pipeline would take it for one track's failed catalog query and go on with the run. Closing the
    connection then can wait for the interrupted query to finish (hours, for a big one).
    """
    try:
        yield
    except BaseException as exc:
        _interrupt(con)
        if isinstance(exc, duckdb.InterruptException) or (
            isinstance(exc, RuntimeError) and str(exc) == _QUERY_INTERRUPTED
        ):
            raise KeyboardInterrupt from exc
        raise


def _run_exists(con: duckdb.DuckDBPyConnection, run_id: str) -> bool:
    return _scalar(con, "SELECT count(*) FROM runs WHERE run_id = ?", [run_id]) > 0


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    view = f"_new_{table}"
    con.register(view, frame)
    try:
        con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM "{view}"')
    finally:
        con.unregister(view)


def _update_run(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> None:
    # Update every non-key column from the validated row, so the stored row equals what was validated.
    columns = [c for c in frame.columns if c != "run_id"]
    assignments = ", ".join(f'"{c}" = _run."{c}"' for c in columns)
    con.register("_run", frame)
    try:
        con.execute(f"UPDATE runs SET {assignments} FROM _run WHERE runs.run_id = _run.run_id")
    finally:
        con.unregister("_run")


def _set_version(con: duckdb.DuckDBPyConnection, version: int) -> None:
    con.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, now())", [version])


def _migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            con.execute(statement)
        _set_version(con, target)


def _check_columns(con: duckdb.DuckDBPyConnection) -> None:
    """Fail early on a file whose tables lack columns this code writes (e.g. a hand-edited catalog)."""
    stored = con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = current_schema()"
    ).fetchall()
    have = {(table, column) for table, column in stored}
    missing = [
        f"{table}.{column}"
        for table, model in TABLES.items()
        for column in model.to_schema().columns
        if (table, column) not in have
    ]
    if missing:
        raise CatalogError(f"catalog tables lack columns {missing}; the file needs a schema migration")
