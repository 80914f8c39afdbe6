"""The catalog schema, defined once as pandera models; the DuckDB DDL is generated from them.

Each table is one `DataFrameModel`. Rows are validated with the model before they are written, and
`create_table_statements()` turns the same models into `CREATE TABLE` statements, so the checks and
the table layout cannot drift apart. Table-level facts pandera has no notion of (primary and foreign
keys) live in each model's `Config.metadata`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from pandera.typing import Series

from catalog.errors import CatalogValidationError
from tasks.core.vocabulary import RUN_STATUSES, STAGES, TRACK_STATUSES
from tasks.core.vocabulary import STEPS as STEPS  # re-exported: the `<step>_s` columns of tracks follow it

# Bump when the layout of a table or a view changes, and add the statements that upgrade the previous
# version to MIGRATIONS (an empty tuple when only views changed: views are recreated after every upgrade).
# A file is only ever opened read-write to upgrade it, so a current file costs readers no write lock.
SCHEMA_VERSION = 6

# version -> statements that upgrade a catalog from version - 1 to version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # v2: runs reconstructed by `stemworks catalog rebuild` say where from; views lineage, track_latest,
    # failures and throughput appear.
    2: ('ALTER TABLE "runs" ADD COLUMN "rebuilt_from" VARCHAR',),
    # v3: view `published` (where each content is published, by which model and settings); track_latest gains
    # `published`. Views only.
    3: (),
    # v4: which process ran a run (so `stemworks clean` can tell a dead run from a live one); which host,
    # worker and shard handled each track; why a track was skipped. Runs can be closed as `crashed`.
    # Table `removals` (outputs removed by `stemworks clean`; views stop listing them) is appended below.
    4: (
        'ALTER TABLE "runs" ADD COLUMN "pid" BIGINT',
        'ALTER TABLE "tracks" ADD COLUMN "hostname" VARCHAR',
        'ALTER TABLE "tracks" ADD COLUMN "worker" VARCHAR',
        'ALTER TABLE "tracks" ADD COLUMN "shard" BIGINT',
        'ALTER TABLE "tracks" ADD COLUMN "skip_reason" VARCHAR',
    ),
    # v5: table `evaluations` (scores of separated stems against reference stems, `stemworks evaluate`);
    # views evaluation_configs and evaluation_pairs. The statement is generated from EvaluationsModel below.
    5: (),  # filled in below, once EvaluationsModel exists: CREATE TABLE "evaluations" (generated)
    # v6: a fanned-out run's shard runs say which run they work for, and which shard they are.
    6: (
        'ALTER TABLE "runs" ADD COLUMN "parent_run_id" VARCHAR',
        'ALTER TABLE "runs" ADD COLUMN "shard" BIGINT',
    ),
}


SHA256_PATTERN = r"^[0-9a-f]{64}$"
TRACK_ID_PATTERN = r"^[0-9a-f]{32}$"  # uuid4().hex

# All timestamps are stored UTC-aware (TIMESTAMPTZ): runs come from several hosts and time zones.
UtcTimestamp = Annotated[pd.DatetimeTZDtype, "ns", "UTC"]


class _Table(pa.DataFrameModel):
    """Settings every table shares; pandera merges each table's own Config over these."""

    class Config:
        strict = True  # an unknown column is a bug in the row builder, not something to store silently
        coerce = True  # rows are built from Python values; let pandera give them the declared dtypes


def _json_text(series: pd.Series) -> pd.Series:
    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except (TypeError, ValueError):
            return False
        return True

    return series.map(parses).astype(bool)


class SchemaVersionModel(_Table):
    """One row per schema version applied to the file; the highest is the file's version."""

    version: Series[int] = pa.Field(ge=1)
    applied_at: Series[UtcTimestamp]

    class Config:
        metadata = {"primary_key": ("version",)}


class RunsModel(_Table):
    """One row per flow run; outcome columns stay null while the run is running."""

    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    flow_run_id: Series[str] = pa.Field(nullable=True)
    flow_name: Series[str]
    started_at: Series[UtcTimestamp]
    finished_at: Series[UtcTimestamp] = pa.Field(nullable=True)
    status: Series[str] = pa.Field(isin=RUN_STATUSES)
    parameters: Series[str] = pa.Field(description="Flow parameters as JSON text.")
    sources: Series[str] = pa.Field(description="Sources as given, as a JSON list.")
    out: Series[str]
    model_name: Series[str]
    model_signature: Series[str] = pa.Field(nullable=True)
    device: Series[str] = pa.Field(nullable=True)
    code_version: Series[str]
    hostname: Series[str]
    tracks_total: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)
    tracks_succeeded: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)
    tracks_failed: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)
    tracks_skipped: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0)
    audio_seconds: Series[float] = pa.Field(nullable=True, ge=0)
    # Last, because a migration appends it: fresh and upgraded files then have the same column order.
    rebuilt_from: Series[str] = pa.Field(
        nullable=True,
        description="Storage URL the run was reconstructed "
        "from by `catalog rebuild`; null for runs recorded as they ran.",
    )
    pid: Series[pd.Int64Dtype] = pa.Field(
        nullable=True, ge=0, description="Process id of the run on `hostname`; null for rebuilt runs."
    )
    # Appended by migration v6.
    parent_run_id: Series[str] = pa.Field(
        nullable=True, description="For a shard run: the run_id of the fanned-out run it works for."
    )
    shard: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0, description="For a shard run: its shard index.")

    class Config:
        metadata = {"primary_key": ("run_id",)}

    @pa.check("parameters", "sources", error="is JSON text")
    def _is_json(cls, series: pd.Series) -> pd.Series:
        return _json_text(series)

    @pa.dataframe_check(error="finished_at and the track counts are set exactly when status is not 'running'")
    def _finished_iff_not_running(cls, df: pd.DataFrame) -> pd.Series:
        outcome = df[
            ["finished_at", "tracks_total", "tracks_succeeded", "tracks_failed", "tracks_skipped", "audio_seconds"]
        ]
        running = df["status"] == "running"
        return (running & outcome.isna().all(axis=1)) | (~running & outcome.notna().all(axis=1))

    @pa.dataframe_check(error="tracks_succeeded + tracks_failed + tracks_skipped <= tracks_total")
    def _counts_fit_total(cls, df: pd.DataFrame) -> pd.Series:
        counted = df["tracks_succeeded"] + df["tracks_failed"] + df["tracks_skipped"]
        return (counted <= df["tracks_total"]).fillna(True).astype(bool)

    @pa.dataframe_check(error="finished_at >= started_at")
    def _finished_after_start(cls, df: pd.DataFrame) -> pd.Series:
        return (df["finished_at"].isna() | (df["finished_at"] >= df["started_at"])).astype(bool)


class TracksModel(_Table):
    """One row per source per run: what happened to it, how long each step took, where it went."""

    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    track_id: Series[str] = pa.Field(str_matches=TRACK_ID_PATTERN, unique=True)
    source: Series[str]
    content_sha256: Series[str] = pa.Field(nullable=True, str_matches=SHA256_PATTERN)
    job_key: Series[str] = pa.Field(nullable=True)
    status: Series[str] = pa.Field(isin=TRACK_STATUSES)
    error: Series[str] = pa.Field(nullable=True)
    error_step: Series[str] = pa.Field(nullable=True, isin=STAGES)
    started_at: Series[UtcTimestamp]
    finished_at: Series[UtcTimestamp]
    # One `<step>_s` column per pipeline step, in `tasks.core.vocabulary.STEPS` order (a test holds them equal).
    fetch_s: Series[float] = pa.Field(nullable=True, ge=0)
    validate_s: Series[float] = pa.Field(nullable=True, ge=0)
    decode_s: Series[float] = pa.Field(nullable=True, ge=0)
    separate_s: Series[float] = pa.Field(nullable=True, ge=0)
    score_s: Series[float] = pa.Field(nullable=True, ge=0)
    publish_s: Series[float] = pa.Field(nullable=True, ge=0)
    audio_seconds: Series[float] = pa.Field(nullable=True, ge=0)
    container: Series[str] = pa.Field(nullable=True)
    codec: Series[str] = pa.Field(nullable=True)
    sample_rate: Series[pd.Int64Dtype] = pa.Field(nullable=True, gt=0)
    channels: Series[pd.Int64Dtype] = pa.Field(nullable=True, gt=0)
    is_stem_file: Series[pd.BooleanDtype] = pa.Field(nullable=True)
    origin: Series[str] = pa.Field(description="TrackOutcome.origin as JSON text.")
    residual_db: Series[float] = pa.Field(nullable=True)
    manifest_uri: Series[str] = pa.Field(nullable=True)
    track_uri: Series[str] = pa.Field(nullable=True)
    flow_run_id: Series[str] = pa.Field(nullable=True)
    # Appended by migration v4 (so fresh and upgraded files agree on column order).
    hostname: Series[str] = pa.Field(nullable=True, description="Host that processed the track.")
    worker: Series[str] = pa.Field(
        nullable=True, description="Worker that processed the track: STEMWORKS_WORKER or the Prefect worker name."
    )
    shard: Series[pd.Int64Dtype] = pa.Field(nullable=True, ge=0, description="Shard of a fanned-out run.")
    skip_reason: Series[str] = pa.Field(nullable=True, description="Why a skipped track was skipped.")

    class Config:
        metadata = {"primary_key": ("track_id",), "foreign_keys": {"run_id": ("runs", "run_id")}}

    @pa.check("origin", error="is JSON text")
    def _is_json(cls, series: pd.Series) -> pd.Series:
        return _json_text(series)

    @pa.dataframe_check(error="a failed track has a non-empty error")
    def _failed_has_error(cls, df: pd.DataFrame) -> pd.Series:
        return ((df["status"] != "failed") | (df["error"].fillna("").str.len() > 0)).astype(bool)

    @pa.dataframe_check(error="a succeeded track has no error and no error_step")
    def _succeeded_has_no_error(cls, df: pd.DataFrame) -> pd.Series:
        return ((df["status"] != "succeeded") | (df["error"].isna() & df["error_step"].isna())).astype(bool)

    @pa.dataframe_check(error="a succeeded track has content_sha256, job_key and manifest_uri")
    def _succeeded_is_published(cls, df: pd.DataFrame) -> pd.Series:
        known = df[["content_sha256", "job_key", "manifest_uri"]].notna().all(axis=1)
        return ((df["status"] != "succeeded") | known).astype(bool)

    @pa.dataframe_check(error="finished_at >= started_at")
    def _finished_after_start(cls, df: pd.DataFrame) -> pd.Series:
        return (df["finished_at"] >= df["started_at"]).astype(bool)


class StemsModel(_Table):
    """One row per published stem file, with its quality metrics when scoring produced them."""

    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    track_id: Series[str] = pa.Field(str_matches=TRACK_ID_PATTERN)
    content_sha256: Series[str] = pa.Field(nullable=True, str_matches=SHA256_PATTERN)
    job_key: Series[str] = pa.Field(nullable=True)
    stem: Series[str] = pa.Field(str_length={"min_value": 1})
    uri: Series[str] = pa.Field(str_length={"min_value": 1})
    sha256: Series[str] = pa.Field(str_matches=SHA256_PATTERN)
    seconds: Series[float] = pa.Field(ge=0)
    bytes: Series[int] = pa.Field(ge=0)
    format: Series[str]
    peak_dbfs: Series[float] = pa.Field(nullable=True)
    rms_dbfs: Series[float] = pa.Field(nullable=True)
    silence_ratio: Series[float] = pa.Field(nullable=True, in_range={"min_value": 0, "max_value": 1})
    clipped_ratio: Series[float] = pa.Field(nullable=True, in_range={"min_value": 0, "max_value": 1})
    energy_share_db: Series[float] = pa.Field(nullable=True)

    class Config:
        unique = ["track_id", "stem"]  # a track publishes each stem once
        metadata = {
            "primary_key": ("track_id", "stem"),
            "foreign_keys": {"run_id": ("runs", "run_id"), "track_id": ("tracks", "track_id")},
        }


class EvaluationsModel(_Table):
    """One row per (evaluation run, dataset item, stem): separated stems scored against reference stems."""

    run_id: Series[str] = pa.Field(str_length={"min_value": 1})
    item: Series[str] = pa.Field(str_length={"min_value": 1}, description="The dataset item's name.")
    dataset: Series[str] = pa.Field(description="The dataset location as given.")
    content_sha256: Series[str] = pa.Field(nullable=True, str_matches=SHA256_PATTERN, description="Of the mixture.")
    job_key: Series[str] = pa.Field(nullable=True, description="The separation's job key (stems' identity).")
    stem: Series[str] = pa.Field(str_length={"min_value": 1})
    model_name: Series[str]
    model_signature: Series[str] = pa.Field(nullable=True)
    config: Series[str] = pa.Field(description="Label of the model and output-shaping settings compared.")
    parameters: Series[str] = pa.Field(description="Every setting of the run as JSON text.")
    sdr: Series[float] = pa.Field(nullable=True, description="BSSEval v4 SDR, median over 1 s windows (dB).")
    sir: Series[float] = pa.Field(nullable=True, description="BSSEval v4 SIR median (dB).")
    isr: Series[float] = pa.Field(nullable=True, description="BSSEval v4 ISR median (dB).")
    sar: Series[float] = pa.Field(nullable=True, description="BSSEval v4 SAR median (dB).")
    nsdr: Series[float] = pa.Field(description="Whole-track simple SDR of the MDX challenges (dB).")
    nsdr_chunk_median: Series[float] = pa.Field(description="Median over 1 s chunks of the simple SDR (dB).")
    bsseval_stable: Series[pd.BooleanDtype] = pa.Field(
        nullable=True, description="False where ISR, SIR and SAR are rounding noise (singular references)."
    )
    sample_rate: Series[int] = pa.Field(gt=0, description="Rate the scores were computed at (Hz).")
    seconds: Series[float] = pa.Field(ge=0, description="Audio seconds evaluated.")
    evaluator_version: Series[str]
    evaluated_at: Series[UtcTimestamp]

    class Config:
        unique = ["run_id", "item", "stem"]
        metadata = {"primary_key": ("run_id", "item", "stem"), "foreign_keys": {"run_id": ("runs", "run_id")}}

    @pa.check("parameters", error="is JSON text")
    def _is_json(cls, series: pd.Series) -> pd.Series:
        return _json_text(series)


class RemovalsModel(_Table):
    """One row per published output removed by `stemworks clean --superseded/--older-than` (retention).

    Lineage rows stay (what was made, from what, by which model); views that say where stems *are*
    (`published`, `track_latest.published`) leave out outputs removed after they were published.
    """

    manifest_uri: Series[str] = pa.Field(str_length={"min_value": 1})
    job_key: Series[str] = pa.Field(nullable=True)
    content_sha256: Series[str] = pa.Field(nullable=True, str_matches=SHA256_PATTERN)
    reason: Series[str] = pa.Field(str_length={"min_value": 1})
    removed_at: Series[UtcTimestamp]
    hostname: Series[str]

    class Config:
        metadata = {"primary_key": ("manifest_uri", "removed_at")}


# Creation order: a table comes after the tables its foreign keys point at.
TABLES: dict[str, type[pa.DataFrameModel]] = {
    "schema_version": SchemaVersionModel,
    "runs": RunsModel,
    "tracks": TracksModel,
    "stems": StemsModel,
    "removals": RemovalsModel,
    "evaluations": EvaluationsModel,
}

# pandas dtype (as pandera prints it) -> DuckDB type. Naive datetimes are left out on purpose.
_DUCKDB_TYPES: dict[str, str] = {
    "str": "VARCHAR",
    "string": "VARCHAR",
    "string[python]": "VARCHAR",
    "string[pyarrow]": "VARCHAR",
    "int64": "BIGINT",
    "Int64": "BIGINT",
    "float64": "DOUBLE",
    "Float64": "DOUBLE",
    "bool": "BOOLEAN",
    "boolean": "BOOLEAN",
    "datetime64[ns, UTC]": "TIMESTAMPTZ",
    "datetime64[us, UTC]": "TIMESTAMPTZ",
}


def duckdb_type(dtype: object) -> str:
    """The DuckDB type for a pandera column dtype; unknown dtypes fail loudly rather than guess."""
    try:
        return _DUCKDB_TYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"no DuckDB type for pandera dtype {dtype!s}") from None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _table_metadata(model: type[pa.DataFrameModel]) -> dict:
    metadata = model.get_metadata() or {}
    return metadata.get(model.__name__, {}).get("dataframe") or {}


def primary_key(model: type[pa.DataFrameModel]) -> tuple[str, ...]:
    return tuple(_table_metadata(model).get("primary_key", ()))


def column_types(model: type[pa.DataFrameModel]) -> dict[str, tuple[str, bool]]:
    """Column name -> (DuckDB type, nullable), in model order."""
    return {
        name: (duckdb_type(column.dtype), bool(column.nullable)) for name, column in model.to_schema().columns.items()
    }


def create_table_statement(table: str, model: type[pa.DataFrameModel]) -> str:
    lines = [
        f"{_quote(name)} {sql_type}{'' if nullable else ' NOT NULL'}"
        for name, (sql_type, nullable) in column_types(model).items()
    ]
    if key := primary_key(model):
        lines.append(f"PRIMARY KEY ({', '.join(map(_quote, key))})")
    for column, (ref_table, ref_column) in _table_metadata(model).get("foreign_keys", {}).items():
        lines.append(f"FOREIGN KEY ({_quote(column)}) REFERENCES {_quote(ref_table)} ({_quote(ref_column)})")
    body = ",\n    ".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {_quote(table)} (\n    {body}\n)"


def create_table_statements() -> list[str]:
    return [create_table_statement(table, model) for table, model in TABLES.items()]


# v4 creates `removals`, v5 creates `evaluations`, exactly as a fresh file does.
MIGRATIONS[4] = (*MIGRATIONS[4], create_table_statement("removals", RemovalsModel))
MIGRATIONS[5] = (create_table_statement("evaluations", EvaluationsModel),)


def validate_frame(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Validate (and coerce) rows for `table`; on failure raise CatalogValidationError naming what failed."""
    try:
        return TABLES[table].validate(frame, lazy=True)
    except SchemaErrors as exc:
        raise CatalogValidationError(describe_failures(table, exc.failure_cases)) from exc


def describe_failures(table: str, failure_cases: pd.DataFrame) -> str:
    """One line per failed (column, check): '<table>.<column>: failed <check>: <values>'."""
    lines: list[str] = []
    for (context, column, check), cases in failure_cases.groupby(
        ["schema_context", "column", "check"], dropna=False, sort=False
    ):
        where = f"{table}.{column}" if context == "Column" else table
        lines.append(f"{where}: failed {check}: {_sample(cases)}")
    return "; ".join(dict.fromkeys(lines))  # frame-level checks repeat once per column


def _sample(cases: pd.DataFrame, limit: int = 3) -> str:
    rows = [i for i in cases["index"].tolist() if i is not None and not pd.isna(i)]
    if rows and cases["schema_context"].iloc[0] != "Column":
        return f"rows {sorted(set(rows))[:limit]}"
    values = [repr(v) for v in _unique(cases["failure_case"].tolist())[:limit]]
    return ", ".join(values)


def _unique(values: Iterable[object]) -> list[object]:
    return list(dict.fromkeys(str(v) for v in values))
