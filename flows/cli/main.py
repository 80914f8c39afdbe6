"""The `stemworks` command line: `separate`, `catalog query|export|rebuild`, `model random`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import ValidationError as SettingsError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli import clean as clean_cli
from flows.cli import evaluate as evaluate_cli
from flows.cli.options import Renamed, add_settings_options, settings_from, settings_message
from tasks.core.settings import Limits, OutputSettings, SeparationSettings

if TYPE_CHECKING:  # imported for real only by the commands that run flows: `--help` stays fast
    from catalog import Catalog
    from flows.pipeline.runs import LibrarySummary

EXIT_OK, EXIT_TRACK_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
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


def add_catalog_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog",
        metavar="PATH|DUCKLAKE",
        help="DuckDB catalog file, or a DuckLake every host shares: 'ducklake:postgres:dbname=... host=... "
        "port=... user=...' (default $STEMWORKS_CATALOG or ./stemworks.duckdb)",
    )
    parser.add_argument(
        "--catalog-data-path",
        metavar="DIR|S3_URL",
        help="where a DuckLake catalog keeps its data files; needed to create one "
        "(default $STEMWORKS_CATALOG_DATA_PATH)",
    )


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
    add_catalog_options(sep)
    sep.add_argument(
        "--work-dir",
        metavar="DIR",
        help="scratch space for intermediate audio (default $STEMWORKS_WORK_DIR or the system temp folder)",
    )
    sep.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs on the console")

    evaluate_cli.add_parser(commands, skip=CLI_SKIPS, renamed=RENAMED, metavars=METAVARS)
    clean_cli.add_parser(commands)

    cat = commands.add_parser("catalog", help="query the catalog")
    cat_commands = cat.add_subparsers(dest="catalog_command", required=True)
    query = cat_commands.add_parser("query", help="print the result of a SQL query over the catalog")
    query.add_argument("sql")
    add_catalog_options(query)
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    export = cat_commands.add_parser("export", help="write every table and view to DIR as parquet or csv")
    export.add_argument("dir", metavar="DIR")
    add_catalog_options(export)
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    rebuild = cat_commands.add_parser("rebuild", help="rebuild the catalog from the manifests published under OUT_URL")
    rebuild.add_argument("--from", dest="out", required=True, metavar="OUT_URL")
    add_catalog_options(rebuild)
    rebuild.add_argument(
        "--allow-empty",
        action="store_true",
        help="write an empty catalog when OUT_URL holds no manifests (refused otherwise)",
    )

    model = commands.add_parser("model", help="model repository helpers")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    random = model_commands.add_parser("random", help="write an HTDemucs with random weights (tests, offline demos)")
    random.add_argument("repo", metavar="DIR")
    random.add_argument("--name", default="random_htdemucs")
    random.add_argument("--size", choices=["tiny", "full"], default="tiny")
    random.add_argument("--seed", type=int, default=0)
    return parser


@dataclass(frozen=True)
class Terminal:
    """Results on stdout; problems and progress on stderr. Never hard-wrapped: paths stay whole."""

    out: Console = field(default_factory=lambda: Console(soft_wrap=True))
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))

    def usage_error(self, message: str) -> int:
        """Say what is wrong on stderr, as argparse does for its own errors; exit status 2."""
        self.err.print(f"stemworks: error: {message}", style="red", highlight=False, markup=False)
        return EXIT_USAGE

    def status(self, message: str) -> None:
        self.err.print(f"{message}…", style="dim", highlight=False, markup=False)


class RichReporter:
    """Overall bar plus one bar per track in flight; fed by tasks through `tasks.core.progress`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall: TaskID = progress.add_task("library: waiting for Prefect to start", total=None)
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


def _quiet_prefect() -> None:
    # The summary reports failures; Prefect's logs still reach its API and UI.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def run_separate(args: argparse.Namespace, term: Terminal) -> int:
    try:
        separation, output, limits = _settings(args)
    except SettingsError as exc:
        return term.usage_error(f"invalid settings: {settings_message(exc, RENAMED)}")
    # Imported here, not at the top: `stemworks --help` and `catalog` commands need no torch or Prefect.
    from catalog.backend import catalog_location
    from flows.cli import preflight
    from flows.pipeline.workarea import default_work_root

    if not args.verbose:
        _quiet_prefect()
    try:
        preflight.check(
            args.sources,
            separation,
            out=output.out,
            catalog=catalog_location(args.catalog),
            catalog_data_path=args.catalog_data_path,
            work_dir=args.work_dir or default_work_root(),
            announce=term.status,
        )
    except preflight.UsageError as exc:
        return term.usage_error(str(exc))
    return _run_library(args, separation, output, limits, term)


def _run_library(
    args: argparse.Namespace, separation: SeparationSettings, output: OutputSettings, limits: Limits, term: Terminal
) -> int:
    from flows.cli.local_api import prefect_api_of_this_process

    term.status("starting Prefect (a temporary local API server unless PREFECT_API_URL is set)")
    with prefect_api_of_this_process():
        return _separate_with_progress(args, separation, output, limits, term)


def _separate_with_progress(
    args: argparse.Namespace, separation: SeparationSettings, output: OutputSettings, limits: Limits, term: Terminal
) -> int:
    from flows.cli.secret_sources import secrets_out_of_band
    from flows.library import library_summary, separate_library
    from tasks.core.errors import ConfigurationError
    from tasks.core.progress import reporting_to

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    try:
        with (
            secrets_out_of_band(args.sources) as sources,
            Progress(*columns, console=term.err, transient=True) as progress,
            reporting_to(RichReporter(progress)),
        ):
            state = separate_library(
                sources,
                separation=separation,
                output=output,
                limits=limits,
                catalog=args.catalog,
                catalog_data_path=args.catalog_data_path,
                work_root=args.work_dir,
                return_state=True,
            )
            summary = library_summary(state)
    except ConfigurationError as exc:
        return term.usage_error(str(exc))
    print_summary(summary, term.out)
    return EXIT_TRACK_FAILED if summary.count("failed") else EXIT_OK


def print_summary(summary: LibrarySummary, console: Console) -> None:
    console.print(f"[bold]{summary.counts_text()}[/bold] (run {summary.run_id})")
    console.print(f"stems:   {summary.out}", highlight=False)
    from catalog.backend import describe

    console.print(f"catalog: {describe(summary.catalog)}", highlight=False)
    for track in summary.tracks:
        if track.status == "failed":
            console.print(
                f"[red]FAILED[/red] {track.source}: {track.error} [dim](step: {track.error_step})[/dim]",
                highlight=False,
            )


def _existing_catalog(args: argparse.Namespace) -> Catalog:
    """The catalog `--catalog` names (a file that must exist, or a DuckLake attached read-only)."""
    from catalog.backend import open_existing

    return open_existing(args.catalog, args.catalog_data_path)


def run_catalog(args: argparse.Namespace, term: Terminal) -> int:
    from catalog import CatalogError

    commands = {"query": run_query, "export": run_export, "rebuild": run_rebuild}
    try:
        return commands[args.catalog_command](args, term)
    except CatalogError as exc:
        return term.usage_error(str(exc))


def run_export(args: argparse.Namespace, term: Terminal) -> int:
    for file in _existing_catalog(args).export(args.dir, args.format):
        term.out.print(f"wrote {file}", highlight=False)
    return EXIT_OK


def run_rebuild(args: argparse.Namespace, term: Terminal) -> int:
    from catalog.backend import catalog_location
    from catalog.rebuild import rebuild

    report = rebuild(
        args.out, catalog_location(args.catalog), allow_empty=args.allow_empty, data_path=args.catalog_data_path
    )
    if report.moved_aside:
        term.out.print(f"previous catalog kept as {report.moved_aside}", highlight=False)
    for uri, why in report.skipped:
        term.err.print(f"[yellow]skipped[/yellow] {uri}: {why}", highlight=False)
    evaluations = f", {report.evaluations} evaluation rows" if report.evaluations else ""
    term.out.print(
        f"rebuilt {report.catalog} from {report.out}: {report.runs} runs, {report.tracks} tracks, {report.stems} stems"
        f"{evaluations}",
        highlight=False,
    )
    return EXIT_OK


def run_query(args: argparse.Namespace, term: Terminal) -> int:
    import duckdb

    catalog = _existing_catalog(args)
    try:
        columns, rows = catalog.query(args.sql)
    except duckdb.Error as exc:
        return term.usage_error(f"query failed: {exc}")
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
        term.out.print(table)
    return EXIT_OK


def run_model_random(args: argparse.Namespace, term: Terminal) -> int:
    from tasks.engine.model_repo import write_random_htdemucs

    path = write_random_htdemucs(args.repo, args.name, args.size, args.seed)
    term.out.print(f"wrote {path} (load with --model {args.name} --model-repo {args.repo})", highlight=False)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    term = Terminal()
    try:
        return _run_command(args, term)
    except KeyboardInterrupt:
        if args.command in ("separate", "evaluate"):
            term.err.print(
                "interrupted: what was published is kept, and a run in progress is recorded as cancelled; "
                "the same command again continues (published tracks are skipped)",
                highlight=False,
            )
        else:
            term.err.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED


def _run_command(args: argparse.Namespace, term: Terminal) -> int:
    if args.command == "separate":
        return run_separate(args, term)
    if args.command == "catalog":
        return run_catalog(args, term)
    if args.command == "clean":
        return clean_cli.run(args, term)
    if args.command == "evaluate":
        from flows.cli.local_api import prefect_api_of_this_process

        return evaluate_cli.run(
            args,
            term,
            renamed=RENAMED,
            quiet=_quiet_prefect,
            prefect_api=prefect_api_of_this_process,
            reporter=RichReporter,
        )
    return run_model_random(args, term)


if __name__ == "__main__":
    sys.exit(main())
