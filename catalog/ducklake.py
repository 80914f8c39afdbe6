"""The catalog in a DuckLake: metadata in PostgreSQL, data files under a local folder or an s3:// prefix.

Why: a DuckDB file takes OS locks that network file systems do not honour reliably, and lets one
process write at a time. A DuckLake is written by any number of processes on any number of hosts at
once: each writer commits through PostgreSQL's transactions, and analysts `ATTACH` the same lake from
plain DuckDB and read a consistent snapshot while writers write.

A location is the string DuckDB's `ATTACH` takes, `ducklake:postgres:<libpq key=value pairs>`, plus a
data path (`--catalog-data-path` / `$STEMWORKS_CATALOG_DATA_PATH`; only needed to create the lake:
an existing lake remembers its own).

Concurrency design (compare catalog/store.py, whose lock files are for local DuckDB files only):
- no lock files: every write is one DuckLake transaction. DuckLake retries a commit that merely
  raced another writer's commit itself (`ducklake_max_retry_count`); a real conflict (two processes
  updating `runs` at once, two creating the tables of a new lake) fails the commit and nothing of it
  is written. `DuckLakeCatalog` then runs the whole transaction again after a jittered exponential
  pause (10 ms doubling to 1 s), for up to `busy_timeout_s`, and raises `CatalogBusyError` after that;
- DuckLake has no PRIMARY KEY, FOREIGN KEY or UNIQUE constraints, so the tables are created without
  them (NOT NULL is kept). Rows are validated with pandera before writing as for the file catalog, and
  uniqueness holds by construction: `run_id` and `track_id` are fresh uuid4s made by the writer, a
  track's stems are checked unique within their one transaction, and `start_run` refuses a run_id the
  lake already holds;
- small transactions are inlined into PostgreSQL by DuckLake (up to 10 rows per table and commit);
  `flush()` writes them out as Parquet under the data path;
- each `DuckLakeCatalog` keeps one in-memory DuckDB with the lake attached (extensions loaded once);
  every call takes its own cursor of it, so threads do not share a transaction.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from catalog.errors import CatalogBusyError, CatalogError
from catalog.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, create_table_statements
from catalog.store import (
    DEFAULT_BUSY_TIMEOUT_S,
    Catalog,
    _check_columns,
    _rollback,
    _scalar,
    _set_version,
    _sql_text,
    interrupts_kept,
)
from catalog.views import create_view_statements

PREFIX = "ducklake:"
POSTGRES_PREFIX = "ducklake:postgres:"
ALIAS = "stemworks_lake"
# Extensions the lake needs, with the pip wheel that carries each (`duckdb-extension-<name>`, same version as duckdb).
EXTENSIONS = ("postgres", "ducklake", "httpfs")
DEFAULT_CONNECT_TIMEOUT_S = 10
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.01, 1.0
# libpq key=value pairs: key = value, value bare or single-quoted (with \' and \\ escapes).
_PAIR = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)")
_SECRET_KEYS = ("password",)
T = TypeVar("T")


def is_ducklake(location: object) -> bool:
    return str(location).startswith(PREFIX)


@dataclass(frozen=True)
class DuckLakeLocation:
    """A parsed DuckLake location: `attach` is the ATTACH string, `data_path` where data files go (or None)."""

    attach: str
    settings: tuple[tuple[str, str], ...]
    data_path: str | None = None

    @classmethod
    def parse(cls, location: str, data_path: str | None = None) -> DuckLakeLocation:
        """Check `location` ('ducklake:postgres:dbname=... host=...'); a malformed one raises CatalogError."""
        if not location.startswith(POSTGRES_PREFIX):
            raise CatalogError(
                f"catalog location {location[:40]!r}: a DuckLake catalog is 'ducklake:postgres:dbname=NAME host=HOST "
                f"port=PORT user=USER' (metadata in PostgreSQL); other DuckLake metadata stores are not supported"
            )
        settings = _conninfo(location[len(POSTGRES_PREFIX) :])
        keys = {key for key, _ in settings}
        if "dbname" not in keys:
            raise CatalogError(
                f"catalog location {redact_location(location)!r}: no dbname=... (the PostgreSQL database holding "
                f"the lake's metadata; create it first with `createdb`)"
            )
        return cls(attach=location, settings=settings, data_path=_data_path(data_path) if data_path else None)

    def __str__(self) -> str:
        return redact_location(self.attach)

    @property
    def connect_string(self) -> str:
        """The ATTACH string, with a connect timeout unless one is given (libpq waits for ever otherwise)."""
        if any(key == "connect_timeout" for key, _ in self.settings):
            return self.attach
        return f"{self.attach} connect_timeout={DEFAULT_CONNECT_TIMEOUT_S}"


def _conninfo(text: str) -> tuple[tuple[str, str], ...]:
    if not text.strip():
        raise CatalogError(
            "catalog location 'ducklake:postgres:' names no database: add 'dbname=NAME host=HOST port=PORT user=USER'"
        )
    pairs, position = [], 0
    while position < len(text.rstrip()):
        match = _PAIR.match(text, position)
        if match is None:
            raise CatalogError(
                f"catalog location: cannot read {redact_location(text[position:].strip())[:40]!r} as key=value "
                f"(libpq connection settings separated by spaces, e.g. 'dbname=lake host=db.internal port=5432')"
            )
        pairs.append((match.group(1), match.group(2)))
        position = match.end()
    return tuple(pairs)


def _data_path(text: str) -> str:
    """Local folders become absolute (with a trailing slash, as DuckLake wants); URLs stay as given."""
    if "://" in text and not text.startswith("file://"):
        return text if text.endswith("/") else text + "/"
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    return str(path) + "/"


def redact_location(text: str) -> str:
    """The location with any password=... replaced, for messages, logs and the catalog."""
    keys = "|".join(_SECRET_KEYS)
    return re.sub(rf"(\b(?:{keys})\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)", r"\1***", text, flags=re.IGNORECASE)


def extension_file(name: str) -> Path | None:
    """The extension shipped in the `duckdb-extension-<name>` wheel for this duckdb, if installed."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        return None
    wanted = f"v{duckdb.__version__}"
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).rglob("*.duckdb_extension")):
            if wanted in path.parts:
                return path
    return None


def load_extensions(con: duckdb.DuckDBPyConnection, names: tuple[str, ...] = EXTENSIONS) -> None:
    """LOAD each extension; one not installed yet is installed from its wheel (no network needed)."""
    for name in names:
        try:
            con.execute(f"LOAD {name}")
            continue
        except duckdb.Error as exc:
            shipped = extension_file(name)
            if shipped is None:
                raise CatalogError(
                    f"DuckDB extension {name!r} is not installed: pip install "
                    f"'duckdb-extension-{name}=={duckdb.__version__}' (or INSTALL {name} with network access)"
                ) from exc
        con.execute(f"INSTALL '{_sql_text(str(shipped))}'")
        con.execute(f"LOAD {name}")


def s3_secret_statement(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """CREATE SECRET for DuckDB's httpfs from the AWS variables s3fs reads (None when none is set)."""
    key = environ.get("AWS_ACCESS_KEY_ID")
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not key and not endpoint:
        return None
    options = {"TYPE": "s3"}
    if key:
        options["KEY_ID"] = key
        options["SECRET"] = environ.get("AWS_SECRET_ACCESS_KEY", "")
    if token := environ.get("AWS_SESSION_TOKEN"):
        options["SESSION_TOKEN"] = token
    if region := environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"):
        options["REGION"] = region
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options["ENDPOINT"] = (host or scheme).rstrip("/")
        options["URL_STYLE"] = "path"  # MinIO, R2, moto: buckets as paths
        options["USE_SSL"] = "true" if scheme.lower() != "http" else "false"
    body = ", ".join(
        f"{name} {value}" if name in ("TYPE", "USE_SSL") else f"{name} '{_sql_text(value)}'"
        for name, value in options.items()
    )
    return f"CREATE OR REPLACE SECRET stemworks_s3 ({body})"


_CONSTRAINTS = ("PRIMARY KEY", "FOREIGN KEY", "UNIQUE")


def without_constraints(statement: str) -> str:
    """A generated CREATE TABLE (catalog/schema.py) without its key constraints, which DuckLake does not support.

    NOT NULL stays. Other statements (ALTER TABLE ... ADD COLUMN) pass unchanged.
    """
    lines = [line for line in statement.split("\n") if not line.strip().startswith(_CONSTRAINTS)]
    following = [*lines[1:], ""]
    lines = [line.rstrip(",") if after.strip() == ")" else line for line, after in zip(lines, following, strict=True)]
    stripped = "\n".join(lines)
    if re.search(r"\b(PRIMARY KEY|FOREIGN KEY|UNIQUE|REFERENCES)\b", stripped):
        raise CatalogError(f"cannot create DuckLake tables: a key constraint is left in {stripped!r}")
    return stripped


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.TransactionException) or "conflict" in str(exc).lower()


class DuckLakeCatalog(Catalog):
    """The catalog (same tables, views and methods as `Catalog`) in a DuckLake many processes write at once."""

    def __init__(
        self,
        location: str | DuckLakeLocation,
        data_path: str | None = None,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        read_only: bool = False,
    ) -> None:
        if not isinstance(location, DuckLakeLocation):
            location = DuckLakeLocation.parse(location, data_path)
        self.location = location
        self.path = Path(str(self.location))  # for messages that name the catalog; never opened as a file
        self.busy_timeout_s = busy_timeout_s
        self.read_only = read_only
        self.retries = 0  # transactions run again after a conflict, over this object's life
        self._db: duckdb.DuckDBPyConnection | None = None
        self._db_lock = threading.Lock()
        if self.location.data_path and "://" not in self.location.data_path:
            Path(self.location.data_path).mkdir(parents=True, exist_ok=True)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"DuckLakeCatalog({str(self.location)!r})"

    def __getstate__(self) -> dict[str, Any]:  # the open database stays behind; a copy opens its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_db", "_db_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _db=None, _db_lock=threading.Lock())

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- connections -----------------------------------------------------------------------------

    def _database(self) -> duckdb.DuckDBPyConnection:
        with self._db_lock:
            if self._db is None:
                self._db = self._attach()
            return self._db

    def _attach(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        try:
            load_extensions(con)
            if (secret := s3_secret_statement()) is not None:
                con.execute(secret)
            options = []
            if self.location.data_path:
                options.append(f"DATA_PATH '{_sql_text(self.location.data_path)}'")
            if self.read_only:
                options.append("READ_ONLY")
            suffix = f" ({', '.join(options)})" if options else ""
            con.execute(f"ATTACH '{_sql_text(self.location.connect_string)}' AS {ALIAS}{suffix}")
        except duckdb.Error as exc:
            con.close()
            if "data_path is not set" in str(exc):
                raise CatalogError(
                    f"{self.location} is a new DuckLake: say where its data files go with --catalog-data-path "
                    f"DIR|s3://bucket/prefix or STEMWORKS_CATALOG_DATA_PATH"
                ) from exc
            if "creating a new DuckLake is explicitly disabled" in str(exc):  # read-only attach of an empty database
                raise CatalogError(f"no catalog in {self.location}: it holds no DuckLake yet") from exc
            raise CatalogError(f"cannot open DuckLake catalog {self.location}: {_one_line(exc)}") from exc
        return con

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of the attached lake, with the lake as the default database (unqualified names work)."""
        con = self._database().cursor()
        try:
            with interrupts_kept(con):
                con.execute(f"USE {ALIAS}")
                con.execute("SET TimeZone = 'UTC'")
                yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One attempt; `_write` runs it again after a conflict."""
        with self._connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except duckdb.ConstraintException as exc:
                _rollback(con)
                raise CatalogError(f"constraint violated: {exc}") from exc
            except BaseException:
                _rollback(con)
                raise

    def _write(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` in one transaction, again after a transaction conflict, until `busy_timeout_s` has passed."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = _FIRST_PAUSE_S
        while True:
            try:
                with self._transaction() as con:
                    return work(con)
            except duckdb.Error as exc:
                if not _is_conflict(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CatalogBusyError(
                        f"{self.location}: transactions kept conflicting with other writers for "
                        f"{self.busy_timeout_s:g} s; nothing was written ({_one_line(exc)})"
                    ) from exc
                self.retries += 1
                time.sleep(max(0.0, min(left, random.uniform(pause / 2, pause))))
                pause = min(pause * 2, _MAX_PAUSE_S)

    # -- schema ------------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        with self.reading() as con:
            version = self._stored_version(con)
        if version == SCHEMA_VERSION:
            with self.reading() as con:
                _check_columns(con)
            return
        if self.read_only:
            if version is None:
                raise CatalogError(f"no catalog in {self.location}: it holds no stemworks tables yet")
            raise CatalogError(
                f"{self.location} has catalog schema {version}, this code {SCHEMA_VERSION}: open it read-write "
                f"once (any `stemworks separate` run or `catalog rebuild`) to upgrade it"
            )
        self._write(self._create_or_upgrade)

    def _create_or_upgrade(self, con: duckdb.DuckDBPyConnection) -> None:
        version = self._stored_version(con)  # again, inside the transaction: another writer may have upgraded it
        if version is None:
            for statement in create_table_statements():
                con.execute(without_constraints(statement))
            _set_version(con, SCHEMA_VERSION)
        elif version < SCHEMA_VERSION:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    con.execute(without_constraints(statement))
                _set_version(con, target)
        else:
            return
        for statement in create_view_statements():
            con.execute(statement)
        _check_columns(con)

    # -- maintenance -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write rows DuckLake inlined into PostgreSQL out as Parquet files under the data path."""
        with self._connect(read_only=False) as con:
            con.execute(f"CALL ducklake_flush_inlined_data('{ALIAS}')")

    def snapshot(self) -> int:
        """The lake's current snapshot id (its version; older ones stay readable with AT (VERSION => n))."""
        with self.reading() as con:
            return int(_scalar(con, f"SELECT max(snapshot_id) FROM {ALIAS}.snapshots()"))

    def replace_contents(self, source: str | os.PathLike[str]) -> int:
        """Replace every table's rows by those of the catalog file `source`, in one transaction.

        Readers see the old contents or the new, never a mix. Returns the snapshot that still holds the
        old contents (`AT (VERSION => n)` reads it).
        """
        before = self.snapshot()
        database = self._database()
        database.execute(f"ATTACH '{_sql_text(str(source))}' AS stemworks_source (READ_ONLY)")
        try:

            def copy(con: duckdb.DuckDBPyConnection) -> None:
                for table in reversed([t for t in TABLES if t != "schema_version"]):
                    con.execute(f'DELETE FROM "{table}"')
                for table in [t for t in TABLES if t != "schema_version"]:
                    con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM stemworks_source."{table}"')

            self._write(copy)
        finally:
            database.execute("DETACH stemworks_source")
        return before


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_location(text)


def check_reachable(location: str, data_path: str | None = None) -> None:
    """Attach the lake once (PostgreSQL reachable, extensions present); raise CatalogError saying why not."""
    catalog = DuckLakeCatalog.__new__(DuckLakeCatalog)
    catalog.location = DuckLakeLocation.parse(location, data_path)
    catalog.read_only = False
    catalog._attach().close()
