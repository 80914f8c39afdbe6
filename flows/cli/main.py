"""The `stemworks` command line: `separate`, `catalog query|export|rebuild`, `model random`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError as SettingsError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli.options import Renamed, add_settings_options, settings_from, settings_message
from tasks.core.settings import Limits, OutputSettings, SeparationSettings

if TYPE_CHECKING:  # imported for real only by the commands that run flows: `--help` stays fast
    from flows.pipeline.runs import LibrarySummary

EXIT_OK, EXIT_TRACK_FAILED, EXIT_USAGE = 0, 1, 2
# Settings fields a command-line run does not offer (the GPU slot limit is a deployment concern).
CLI_SKIPS = frozenset({"gpu_slot_limit"})
RENAMED = {"max_file_bytes": Renamed(flag="--max-file-mb", metavar="MB", scale=1024 * 1024, unit=" MiB")}
METAVARS = {
    "out": "URL",
    "model": "NAME",
    "model_repo": "DIR",
    "two_stems": "STEM",
    "segment": "SECONDS",
    "overlap": "F",
    "mp3_bitrate": "KBPS",
    "max_seconds": "S",
    "min_seconds": "S",
    "min_sample_rate": "HZ",
    "max_sample_rate": "HZ",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemworks", description="Separate music into stems with Demucs.")
    commands = parser.add_subparsers(dest="command", required=True)

    sep = commands.add_parser("separate", help="separate files, folders, globs or URLs into stems")
    sep.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="audio files, folders (scanned recursively), globs, s3:// prefixes or http(s) URLs",
    )
    add_settings_options(sep, OutputSettings, metavars=METAVARS)
    add_settings_options(sep, SeparationSettings, skip=CLI_SKIPS, metavars=METAVARS)
    add_settings_options(sep, Limits, renamed=RENAMED, metavars=METAVARS)
    sep.add_argument(
        "--catalog", metavar="PATH", help="DuckDB catalog file (default $STEMWORKS_CATALOG or ./stemworks.duckdb)"
    )
    sep.add_argument(
        "--work-dir",
        metavar="DIR",
        help="scratch space for intermediate audio (default $STEMWORKS_WORK_DIR or the system temp folder)",
    )
    sep.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs on the console")

    cat = commands.add_parser("catalog", help="query the catalog")
    cat_commands = cat.add_subparsers(dest="catalog_command", required=True)
    query = cat_commands.add_parser("query", help="print the result of a SQL query over the catalog")
    query.add_argument("sql")
    query.add_argument("--catalog", metavar="PATH")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    export = cat_commands.add_parser("export", help="write every table and view to DIR as parquet or csv")
    export.add_argument("dir", metavar="DIR")
    export.add_argument("--catalog", metavar="PATH")
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    rebuild = cat_commands.add_parser("rebuild", help="rebuild the catalog from the manifests published under OUT_URL")
    rebuild.add_argument("--from", dest="out", required=True, metavar="OUT_URL")
    rebuild.add_argument("--catalog", metavar="PATH")

    model = commands.add_parser("model", help="model repository helpers")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    random = model_commands.add_parser("random", help="write an HTDemucs with random weights (tests, offline demos)")
    random.add_argument("repo", metavar="DIR")
    random.add_argument("--name", default="random_htdemucs")
    random.add_argument("--size", choices=["tiny", "full"], default="tiny")
    random.add_argument("--seed", type=int, default=0)
    return parser


class RichReporter:
    """Overall bar plus one bar per track in flight; fed by tasks through `tasks.core.progress`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall: TaskID = progress.add_task("library", total=None)
        self.tracks: dict[str, TaskID] = {}
        self.done = 0
        self.total: int | None = None

    def planned(self, tracks: int) -> None:
        self.total = tracks
        self.progress.update(self.overall, total=tracks, description=f"library 0/{tracks}")

    def track_started(self, source: str) -> None:
        self.tracks[source] = self.progress.add_task(_short(source), total=1.0)

    def step(self, source: str, step: str) -> None:
        if source in self.tracks:
            self.progress.update(self.tracks[source], description=f"{_short(source)} [{step}]")

    def fraction(self, source: str, done: float) -> None:
        if source in self.tracks:
            self.progress.update(self.tracks[source], completed=done)

    def track_finished(self, source: str, status: str) -> None:
        task_id = self.tracks.pop(source, None)
        if task_id is not None:
            self.progress.remove_task(task_id)
        self.done += 1
        self.progress.update(self.overall, advance=1, description=f"library {self.done}/{self.total}")


def _short(source: str, width: int = 40) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= width else name[: width - 1] + "…"


def _settings(args: argparse.Namespace) -> tuple[SeparationSettings, OutputSettings, Limits]:
    return (
        settings_from(args, SeparationSettings),
        settings_from(args, OutputSettings),
        settings_from(args, Limits, renamed=RENAMED),
    )


def run_separate(args: argparse.Namespace, console: Console) -> int:
    if not args.verbose:  # the summary reports failures; logs still reach the Prefect API and UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        separation, output, limits = _settings(args)
    except SettingsError as exc:
        console.print(f"[red]stemworks: invalid settings:[/red] {settings_message(exc, RENAMED)}")
        return EXIT_USAGE
    from flows.library import separate_library
    from tasks.core.errors import ConfigurationError
    from tasks.core.progress import reporting_to

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress, reporting_to(RichReporter(progress)):
            summary = separate_library(
                args.sources,
                separation=separation,
                output=output,
                limits=limits,
                catalog=args.catalog,
                work_root=args.work_dir,
            )
    except ConfigurationError as exc:
        console.print(f"[red]stemworks: {exc}[/red]")
        return EXIT_USAGE
    print_summary(summary, console)
    return EXIT_TRACK_FAILED if summary.count("failed") else EXIT_OK


def print_summary(summary: LibrarySummary, console: Console) -> None:
    console.print(
        f"[bold]{summary.count('succeeded')} succeeded, {summary.count('skipped')} skipped, "
        f"{summary.count('failed')} failed[/bold] (run {summary.run_id})"
    )
    console.print(f"stems:   {summary.out}")
    console.print(f"catalog: {Path(summary.catalog).resolve()}")
    for track in summary.tracks:
        if track.status == "failed":
            console.print(
                f"[red]FAILED[/red] {track.source}: {track.error} [dim](step: {track.error_step})[/dim]",
                highlight=False,
                soft_wrap=True,
            )


def _existing_catalog(args: argparse.Namespace, console: Console) -> Path | None:
    from catalog import default_catalog_path

    path = Path(args.catalog or default_catalog_path())
    if not path.exists():
        console.print(f"[red]stemworks: no catalog at {path}[/red]")
        return None
    return path


def run_catalog(args: argparse.Namespace, console: Console) -> int:
    from catalog import CatalogError

    commands = {"query": run_query, "export": run_export, "rebuild": run_rebuild}
    try:
        return commands[args.catalog_command](args, console)
    except CatalogError as exc:
        console.print(f"[red]stemworks: {exc}[/red]", highlight=False)
        return EXIT_USAGE


def run_export(args: argparse.Namespace, console: Console) -> int:
    from catalog import Catalog

    if (path := _existing_catalog(args, console)) is None:
        return EXIT_USAGE
    for file in Catalog(path).export(args.dir, args.format):
        console.print(f"wrote {file}", highlight=False)
    return EXIT_OK


def run_rebuild(args: argparse.Namespace, console: Console) -> int:
    from catalog import default_catalog_path
    from catalog.rebuild import rebuild

    report = rebuild(args.out, args.catalog or default_catalog_path())
    if report.moved_aside:
        console.print(f"previous catalog kept as {report.moved_aside}", highlight=False)
    for uri, why in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {uri}: {why}", highlight=False)
    console.print(
        f"rebuilt {report.catalog} from {report.out}: {report.runs} runs, {report.tracks} tracks, {report.stems} stems",
        highlight=False,
    )
    return EXIT_OK


def run_query(args: argparse.Namespace, console: Console) -> int:
    import duckdb

    from catalog import Catalog

    if (path := _existing_catalog(args, console)) is None:
        return EXIT_USAGE
    try:
        columns, rows = Catalog(path).query(args.sql)
    except duckdb.Error as exc:
        console.print(f"[red]stemworks: query failed: {exc}[/red]", highlight=False)
        return EXIT_USAGE
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif args.format == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=2))
    else:
        table = Table(*columns)
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
    return EXIT_OK


def run_model_random(args: argparse.Namespace, console: Console) -> int:
    from tasks.engine.model_repo import write_random_htdemucs

    path = write_random_htdemucs(args.repo, args.name, args.size, args.seed)
    console.print(f"wrote {path} (load with --model {args.name} --model-repo {args.repo})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    if args.command == "separate":
        return run_separate(args, console)
    if args.command == "catalog":
        return run_catalog(args, console)
    return run_model_random(args, console)


if __name__ == "__main__":
    sys.exit(main())
