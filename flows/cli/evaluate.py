"""`stemworks evaluate DATASET...`: separate reference sets with a model and settings, score the stems against
the true stems, print a per-stem table and where the report went.

Kept apart from `flows.cli.main`, which builds its parser (`add_parser`) and calls `run` with what it owns
(the terminal, the progress bars, the temporary Prefect API): this module imports nothing of main's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError as SettingsError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli.options import Renamed, add_settings_options, settings_from, settings_message
from tasks.core.settings import Limits, OutputSettings, SeparationSettings

if TYPE_CHECKING:  # the flow (torch, Prefect) is imported only when a command runs it
    from flows.evaluate import EvaluationSummary
    from tasks.core.progress import ProgressReporter

EXIT_OK, EXIT_ITEM_FAILED, EXIT_USAGE = 0, 1, 2
# The table's columns: (key in the comparison rows, heading).
COLUMNS = (
    ("stem", "stem"),
    ("items", "items"),
    ("median_sdr", "SDR"),
    ("mean_sdr", "SDR mean"),
    ("median_sir", "SIR"),
    ("median_isr", "ISR"),
    ("median_sar", "SAR"),
    ("median_nsdr", "nSDR"),
    ("median_nsdr_chunk", "cSDR"),
)


class Term(Protocol):
    """What `flows.cli.main.Terminal` offers: results on `out`, problems and progress on `err`."""

    @property
    def out(self) -> Console: ...
    @property
    def err(self) -> Console: ...

    def usage_error(self, message: str) -> int: ...
    def status(self, message: str) -> None: ...


def add_parser(
    commands: Any, *, skip: frozenset[str], renamed: dict[str, Renamed], metavars: dict[str, str]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "evaluate",
        help="score a model and settings against reference stems (NI stem files, MUSDB18-style folders)",
        description="Separate every mixture of the datasets (reusing stems already published with the same "
        "model and settings), score each stem against its reference (BSSEval v4 as museval 0.4.1, and the "
        "MDX challenges' simple SDR), record the scores in the catalog and write a report comparing this "
        "configuration with those evaluated before on the same items.",
    )
    parser.add_argument(
        "datasets",
        nargs="+",
        metavar="DATASET",
        help="NI stem files (*.stem.mp4), folders holding mixture.<ext> beside drums.<ext>, bass.<ext>, "
        "other.<ext>, vocals.<ext>, or folders searched recursively for both; local, or in an object store "
        "(s3://bucket/prefix)",
    )
    add_settings_options(parser, OutputSettings, metavars=metavars)
    add_settings_options(parser, SeparationSettings, skip=skip, metavars=metavars)
    add_settings_options(parser, Limits, renamed=renamed, metavars=metavars)
    parser.add_argument(
        "--catalog",
        metavar="PATH|DUCKLAKE",
        help="DuckDB catalog file, or a shared DuckLake 'ducklake:postgres:...' "
        "(default $STEMWORKS_CATALOG or ./stemworks.duckdb)",
    )
    parser.add_argument(
        "--catalog-data-path",
        metavar="DIR|S3_URL",
        help="where a DuckLake catalog keeps its data files (default $STEMWORKS_CATALOG_DATA_PATH)",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        help="scratch space for intermediate audio (default $STEMWORKS_WORK_DIR or the system temp folder)",
    )
    parser.add_argument(
        "--report", metavar="DIR", help="folder for report.md and report.png (default OUT/_evaluations/RUN_ID)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs on the console")
    return parser


def run(
    args: argparse.Namespace,
    term: Term,
    *,
    renamed: dict[str, Renamed],
    quiet: Callable[[], None],
    prefect_api: Callable[[], AbstractContextManager[None]],
    reporter: Callable[[Progress], ProgressReporter],
) -> int:
    """Check the command line (usage errors exit 2 before Prefect starts), run the flow, print the table."""
    try:
        separation = settings_from(args, SeparationSettings)
        output = settings_from(args, OutputSettings)
        limits = settings_from(args, Limits, renamed=renamed)
    except SettingsError as exc:
        return term.usage_error(f"invalid settings: {settings_message(exc, renamed)}")
    from catalog.backend import catalog_location
    from flows.cli import preflight
    from flows.pipeline.workarea import default_work_root
    from tasks.steps.evaluate.datasets import accepted_layouts, discover

    if not args.verbose:
        quiet()
    if missing := preflight.missing_sources(args.datasets):
        return term.usage_error(f"no such file or folder: {', '.join(missing)}\n  check the dataset path")
    found = discover(args.datasets)
    if not found.items:
        problems = "".join(f"\n  {dataset}: {why}" for dataset, why in found.problems)
        return term.usage_error(
            f"no recognisable items in {', '.join(args.datasets)}{problems}\n  accepted layouts: {accepted_layouts()}"
        )
    try:
        preflight.check(
            args.datasets,
            separation,
            out=output.out,
            catalog=catalog_location(args.catalog),
            work_dir=args.work_dir or default_work_root(),
            catalog_data_path=args.catalog_data_path,
            announce=term.status,
        )
    except preflight.UsageError as exc:
        return term.usage_error(str(exc))
    term.status(
        f"{len(found.items)} items found; starting Prefect (a temporary local API server unless PREFECT_API_URL is set)"
    )
    with prefect_api():
        return _evaluate(args, separation, output, limits, term, reporter)


def _evaluate(
    args: argparse.Namespace,
    separation: SeparationSettings,
    output: OutputSettings,
    limits: Limits,
    term: Term,
    reporter: Callable[[Progress], ProgressReporter],
) -> int:
    from flows.evaluate import evaluate, evaluation_summary
    from tasks.core.errors import ConfigurationError
    from tasks.core.progress import reporting_to

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=term.err, transient=True) as progress, reporting_to(reporter(progress)):
            state = evaluate(
                args.datasets,
                separation=separation,
                output=output,
                limits=limits,
                catalog=args.catalog,
                catalog_data_path=args.catalog_data_path,
                work_root=args.work_dir,
                report=args.report,
                return_state=True,
            )
            summary = evaluation_summary(state)
    except ConfigurationError as exc:
        return term.usage_error(str(exc))
    print_summary(summary, term.out)
    return EXIT_ITEM_FAILED if summary.count("failed") else EXIT_OK


def print_summary(summary: EvaluationSummary, console: Console) -> None:
    """This configuration's per-stem table, the other configurations' beside it, failures, where things went."""
    console.print(
        f"[bold]{summary.count('evaluated')} evaluated, {summary.count('failed')} failed[/bold] (run {summary.run_id})"
    )
    configs = list(dict.fromkeys(row["config"] for row in summary.comparison))
    ordered = [summary.config, *(c for c in configs if c != summary.config)] if summary.config in configs else configs
    for config in ordered:
        mark = " (this run)" if config == summary.config else ""
        table = Table(*(heading for _, heading in COLUMNS), title=f"{config}{mark}", title_justify="left")
        for row in summary.comparison:
            if row["config"] == config:
                table.add_row(*(_cell(row[key]) for key, _ in COLUMNS))
        console.print(table)
    console.print(
        "dB; SDR/SIR/ISR/SAR: BSSEval v4 medians (museval 0.4.1); nSDR: whole-track simple SDR; "
        "cSDR: its 1 s chunk median",
        style="dim",
        highlight=False,
    )
    if summary.report:
        console.print(f"report:  {summary.report}", highlight=False)
    console.print(f"stems:   {summary.out}", highlight=False)
    from catalog.backend import describe

    console.print(f"catalog: {describe(summary.catalog)}", highlight=False)
    for item in summary.items:
        if item.status == "failed":
            console.print(
                f"[red]FAILED[/red] {item.item}: {item.error} [dim](stage: {item.error_stage})[/dim]", highlight=False
            )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
