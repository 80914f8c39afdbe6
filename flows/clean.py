"""Flow `clean`: housekeeping on a schedule (deployment `clean` in prefect.yaml) or from the UI.

Removes what dead runs left behind (staging folders, claims, work files) and closes their catalog rows as
`crashed`; with a retention setting, also removes superseded or old outputs. `stemworks clean` runs the
same function without Prefect.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from catalog.backend import catalog_location, is_ducklake, open_catalog
from catalog.store import Catalog
from flows.pipeline.housekeeping import CleanReport, clean
from flows.pipeline.workarea import default_work_root
from tasks.core.settings import Housekeeping, Retention


def open_catalog_if_any(catalog: str | None, data_path: str | None) -> Catalog | None:
    """The catalog to close dead runs in; None when there is no catalog file there yet (nothing to close)."""
    where = catalog_location(catalog)
    if is_ducklake(where) or Path(where).exists():
        return open_catalog(where, data_path)
    return None


@flow(name="clean", persist_result=False)
def clean_up(
    out: str | None = None,
    catalog: str | None = None,
    catalog_data_path: str | None = None,
    work_root: str | None = None,
    retention: Retention = Retention(),
    housekeeping: Housekeeping = Housekeeping(),
) -> CleanReport:
    """Remove what dead runs left behind and, when asked, outputs past retention.

    Args:
        out: The output location (local folder or s3://bucket/prefix) whose staging folders, claims and
            (with retention) outputs are cleaned; unset cleans only work files and runs.
        catalog: Catalog whose runs left `running` by dead processes are closed as `crashed`; unset uses
            $STEMWORKS_CATALOG or ./stemworks.duckdb on the worker.
        catalog_data_path: A DuckLake catalog's data files; unset uses $STEMWORKS_CATALOG_DATA_PATH.
        work_root: Scratch folder of this worker's runs; unset uses $STEMWORKS_WORK_DIR or the system temp folder.
        retention: Which published outputs to remove (none by default).
        housekeeping: When leftovers of other hosts count as stale, and whether to only list (dry run).
    """
    logger = get_run_logger()
    report = clean(
        out=out or None,
        work_root=work_root or default_work_root(),
        catalog=open_catalog_if_any(catalog, catalog_data_path),
        retention=retention,
        stale_after_hours=housekeeping.stale_after_hours,
        dry_run=housekeeping.dry_run,
    )
    verb = "would remove" if report.dry_run else "removed"
    logger.info(
        "%s %d items (%d bytes); left %d alone", verb, len(report.removed), report.total_bytes(), len(report.kept)
    )
    rows = [{"action": verb, **item.model_dump(mode="json")} for item in report.removed]
    rows += [{"action": "kept", **item.model_dump(mode="json")} for item in report.kept]
    if rows:
        create_table_artifact(key="stemworks-clean", table=rows, description="What `clean` found")
    return report
