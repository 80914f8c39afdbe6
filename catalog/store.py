"""The catalog: a DuckDB file recording every run, track and stem.

Several processes share the file, and DuckDB lets only one process hold it open for writing, so every
public method opens its own short-lived connection, does its work in one transaction and closes it.
All connecting goes through `Catalog._connect`, the single place to add retries on a locked file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from catalog import rows
from catalog.errors import CatalogError
from catalog.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, create_table_statements
from tasks.records import RunRecord, RunSummary, TrackOutcome


class Catalog:
    """Records runs, tracks and stems in the DuckDB file at `path`, creating it and its tables if missing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # -- writing ---------------------------------------------------------------------------------

    def start_run(self, run: RunRecord) -> None:
        """Record a run as 'running'. Recording the same run_id twice is an error."""
        frame = rows.run_frame(run)
        with self._transaction() as con:
            if _run_exists(con, run.run_id):
                raise CatalogError(f"runs: run_id {run.run_id!r} is already recorded")
            _insert(con, "runs", frame)

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
        with self._transaction() as con:
            if not _run_exists(con, run_id):
                raise CatalogError(f"tracks: run_id {run_id!r} was never started", source=outcome.source)
            _insert(con, "tracks", track)
            if stems is not None:
                _insert(con, "stems", stems)
        return track_id

    def finish_run(self, summary: RunSummary) -> None:
        """Set a run's outcome and counts. Finishing again overwrites them (e.g. after a flow retry)."""
        with self._transaction() as con:
            current = con.execute("SELECT * FROM runs WHERE run_id = ?", [summary.run_id]).df()
            if current.empty:
                raise CatalogError(f"runs: run_id {summary.run_id!r} was never started")
            frame = rows.finished_run_frame(current, summary)  # raising here rolls back: nothing changes
            _update_run(con, frame)

    # -- reading ---------------------------------------------------------------------------------

    def published_manifest(self, job_key: str, out_prefix: str) -> str | None:
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
        with self._reading() as con:
            return _scalar(con, sql, [job_key, folder])

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement; returns (column names, rows)."""
        with self._reading() as con:
            result = con.execute(sql)
            columns = [d[0] for d in result.description] if result.description else []
            return columns, result.fetchall()

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._reading() as con:
            return {table: _scalar(con, f'SELECT count(*) FROM "{table}"') for table in TABLES}

    # -- connections -----------------------------------------------------------------------------

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """The only place that opens the file, so cross-process retry can be added around it."""
        con = duckdb.connect(str(self.path), read_only=read_only)
        try:
            con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ values come back in UTC whatever the host's zone
        except BaseException:
            con.close()
            raise
        return con

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._connect(read_only=False)
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
        finally:
            con.close()

    @contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._connect(read_only=True)
        try:
            yield con
        finally:
            con.close()

    def _ensure_schema(self) -> None:
        """Create missing tables and record/upgrade the schema version; safe to run on every open."""
        with self._transaction() as con:
            for statement in create_table_statements():
                con.execute(statement)
            version = _scalar(con, "SELECT max(version) FROM schema_version")
            if version is None:
                _set_version(con, SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise CatalogError(f"{self.path} has catalog schema {version}; this code knows up to "
                                   f"{SCHEMA_VERSION}: upgrade stemworks")
            else:
                _migrate(con, version)
            _check_columns(con)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> Any:
    """First value of the first row, or None. Reads the whole result: DuckDB refuses new work on a
    connection while a result is still pending."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    # A failed COMMIT has already rolled back, and then ROLLBACK itself fails; the original error matters.
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


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
        con.execute(f'UPDATE runs SET {assignments} FROM _run WHERE runs.run_id = _run.run_id')
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
    stored = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                         "WHERE table_schema = current_schema()").fetchall()
    have = {(table, column) for table, column in stored}
    missing = [f"{table}.{column}" for table, model in TABLES.items()
               for column in model.to_schema().columns if (table, column) not in have]
    if missing:
        raise CatalogError(f"catalog tables lack columns {missing}; the file needs a schema migration")
