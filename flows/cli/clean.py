"""`stemworks clean`: housekeeping without Prefect (the scheduled deployment runs the same function).

Kept apart from `flows.cli.main`, which builds its parser (`add_parser`) and calls `run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError as SettingsError

from flows.cli.evaluate import Term
from flows.cli.options import add_settings_options, settings_from, settings_message
from tasks.core.settings import Housekeeping, Retention

EXIT_OK = 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "clean",
        help="remove what dead runs left (staging, claims, work files), close their runs; optional retention",
        description="Remove what dead runs left behind: staging folders and claims under --out, work files "
        "under --work-dir, and catalog runs left `running` (closed as `crashed`). With --superseded or "
        "--older-than-days, also remove published outputs. Run with --dry-run first to see the list.",
    )
    parser.add_argument("--out", metavar="DIR|S3_URL", help="output location to clean (staging, claims, retention)")
    parser.add_argument(
        "--work-dir", metavar="DIR", help="work root (default $STEMWORKS_WORK_DIR or the system temp folder)"
    )
    parser.add_argument(
        "--catalog", metavar="PATH|DUCKLAKE", help="catalog (default $STEMWORKS_CATALOG or ./stemworks.duckdb)"
    )
    parser.add_argument("--catalog-data-path", metavar="DIR|S3_URL", help="a DuckLake catalog's data files")
    add_settings_options(parser, Retention, metavars={"older_than_days": "DAYS"})
    add_settings_options(parser, Housekeeping, metavars={"stale_after_hours": "HOURS"})
    return parser


def run(args: argparse.Namespace, term: Term) -> int:
    from catalog import CatalogError
    from flows.clean import open_catalog_if_any
    from flows.pipeline.housekeeping import clean
    from flows.pipeline.workarea import default_work_root

    try:
        retention = settings_from(args, Retention)
        housekeeping = settings_from(args, Housekeeping)
    except SettingsError as exc:
        return term.usage_error(settings_message(exc))
    try:
        catalog = open_catalog_if_any(args.catalog, args.catalog_data_path)
    except CatalogError as exc:
        return term.usage_error(str(exc))
    report = clean(
        out=args.out,
        work_root=args.work_dir or default_work_root(),
        catalog=catalog,
        retention=retention,
        stale_after_hours=housekeeping.stale_after_hours,
        dry_run=housekeeping.dry_run,
    )
    dry = report.dry_run
    for item in report.removed:
        action = ("would close" if dry else "closed") if item.kind == "run" else ("would remove" if dry else "removed")
        term.out.print(f"{action} {item.kind} {item.location}: {item.reason}", highlight=False, markup=False)
    for item in report.kept:
        term.out.print(f"kept {item.kind} {item.location}: {item.reason}", highlight=False, markup=False)
    runs = sum(1 for item in report.removed if item.kind == "run")
    leftovers = len(report.removed) - runs
    term.out.print(
        f"{'dry run: would remove' if dry else 'removed'} {leftovers} items ({report.total_bytes() / 1e6:.1f} MB), "
        f"{'would close' if dry else 'closed'} {runs} dead runs; left {len(report.kept)} alone",
        highlight=False,
    )
    return EXIT_OK
