"""The shared catalog under real processes: concurrent `stemworks separate` runs with live readers,
a writer killed with SIGKILL, and a rebuild from the published manifests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from catalog import Catalog
from catalog.rebuild import rebuild
from tests.helpers.audiogen import audio_file
from tests.helpers.constants import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
LOCK_ERRORS = ("Could not set lock", "Conflicting lock")
WRITERS, TRACKS_EACH, STEMS_EACH = 4, 2, 4

pytestmark = pytest.mark.slow  # writers, readers and rebuilds run as processes


def cli_env(tmp: Path) -> dict[str, str]:
    """Every process talks to the session's Prefect API instead of starting a server of its own."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "STEMWORKS_WORK_DIR": str(tmp / "work"),
    }
    env.pop("STEMWORKS_CATALOG", None)
    return env


def separate(
    sources: list[Path], out: Path, catalog: Path, model_repo: Path, env: dict[str, str], log: Path
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "separate",
        *map(str, sources),
        "--out",
        str(out),
        "--model",
        MODEL_NAME,
        "--model-repo",
        str(model_repo),
        "--shifts",
        "0",
        "--catalog",
        str(catalog),
    ]
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def cli_query(sql: str, catalog: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "catalog", "query", sql, "--catalog", str(catalog), "--format", "csv"],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )


def stem_files(out: Path) -> set[str]:
    return {str(p) for p in out.glob("*/*") if p.name != "manifest.json" and ".stemworks-staging" not in p.parts}


@dataclass
class Readers:
    """Analysts polling the catalog while runs write: in-process reads and `stemworks catalog query` processes."""

    catalog: Path
    env: dict[str, str]
    stop: threading.Event = field(default_factory=threading.Event)
    track_counts: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cli_runs: list[subprocess.CompletedProcess] = field(default_factory=list)

    def poll_in_process(self) -> None:
        while not self.stop.is_set():
            try:
                with Catalog(self.catalog).reading() as con:
                    self.track_counts.append(con.execute("SELECT count(*) FROM tracks").fetchone()[0])
                    con.execute("SELECT count(*) FROM lineage").fetchall()
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(repr(exc))
            time.sleep(0.05)

    def poll_cli(self) -> None:
        while not self.stop.is_set():
            self.cli_runs.append(cli_query("SELECT status, count(*) FROM tracks GROUP BY ALL", self.catalog, self.env))

    @classmethod
    @contextmanager
    def running(cls, catalog: Path, env: dict[str, str]) -> Iterator[Readers]:
        readers = cls(catalog, env)
        threads = [threading.Thread(target=readers.poll_in_process), threading.Thread(target=readers.poll_cli)]
        for thread in threads:
            thread.start()
        try:
            yield readers
        finally:
            readers.stop.set()
            for thread in threads:
                thread.join()


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory: pytest.TempPathFactory, model_repo: Path, prefect_harness: None) -> dict:
    """WRITERS `stemworks separate` processes on different inputs, one catalog, readers polling throughout."""
    root = tmp_path_factory.mktemp("concurrent")
    out, catalog, env = root / "stems", root / "catalog.duckdb", cli_env(root)
    Catalog(catalog)  # analysts may open it from the start
    inputs = [
        [
            audio_file(root / f"music{w}", f"w{w}-t{t}.wav", "wav", seconds=1.0, seed=10 * w + t)
            for t in range(TRACKS_EACH)
        ]
        for w in range(WRITERS)
    ]
    with Readers.running(catalog, env) as readers:
        writers = [
            separate(sources, out, catalog, model_repo, env, root / f"writer{w}.log")
            for w, sources in enumerate(inputs)
        ]
        codes = [writer.wait(timeout=600) for writer in writers]
        reads_during_run = len(readers.track_counts)
    logs = [(root / f"writer{w}.log").read_text() for w in range(WRITERS)]
    return {
        "root": root,
        "out": out,
        "catalog": catalog,
        "env": env,
        "inputs": inputs,
        "codes": codes,
        "logs": logs,
        "readers": readers,
        "reads_during_run": reads_during_run,
    }


@pytest.mark.prefect_server
def test_concurrent_writers_all_succeed_without_lock_errors(concurrent: dict) -> None:
    assert concurrent["codes"] == [0] * WRITERS, concurrent["logs"]
    for log in concurrent["logs"]:
        assert f"{TRACKS_EACH} succeeded, 0 skipped, 0 failed" in log
        assert not any(error in log for error in LOCK_ERRORS), log


@pytest.mark.prefect_server
def test_concurrent_writers_record_every_row_exactly_once(concurrent: dict) -> None:
    catalog = Catalog(concurrent["catalog"])
    total = WRITERS * TRACKS_EACH
    sources = sorted(str(s) for group in concurrent["inputs"] for s in group)

    assert catalog.counts() == {
        "schema_version": 1,
        "runs": WRITERS,
        "tracks": total,
        "stems": total * STEMS_EACH,
        "removals": 0,
        "evaluations": 0,
    }
    assert catalog.query("SELECT status, tracks_total, tracks_succeeded, count(*) FROM runs GROUP BY ALL")[1] == [
        ("completed", TRACKS_EACH, TRACKS_EACH, WRITERS)
    ]
    assert catalog.query("SELECT source FROM tracks WHERE status = 'succeeded' ORDER BY source")[1] == [
        (s,) for s in sources
    ]
    # Each process recorded its own inputs under its own run.
    per_run = catalog.query("SELECT list_sort(list(source)) FROM tracks GROUP BY run_id")[1]
    assert sorted(tuple(r[0]) for r in per_run) == sorted(tuple(sorted(map(str, g))) for g in concurrent["inputs"])
    assert catalog.query("SELECT count(DISTINCT uri), count(DISTINCT (track_id, stem)) FROM stems")[1] == [
        (total * STEMS_EACH, total * STEMS_EACH)
    ]
    assert {r[0] for r in catalog.query("SELECT stem_uri FROM lineage")[1]} == stem_files(concurrent["out"])


@pytest.mark.prefect_server
def test_readers_ran_throughout_and_never_failed(concurrent: dict) -> None:
    readers: Readers = concurrent["readers"]
    assert readers.errors == []
    assert concurrent["reads_during_run"] >= 20
    assert readers.track_counts == sorted(readers.track_counts)  # live: counts only ever grow
    assert readers.track_counts[0] < readers.track_counts[-1] == WRITERS * TRACKS_EACH
    assert len(readers.cli_runs) >= 3
    for run in readers.cli_runs:
        assert run.returncode == 0 and run.stdout.startswith("status,count_star()"), run.stderr
        assert not any(error in run.stdout + run.stderr for error in LOCK_ERRORS)


@pytest.mark.prefect_server
def test_rebuild_from_manifests_after_deleting_the_catalog(concurrent: dict) -> None:
    path = concurrent["catalog"]
    lineage = (
        "SELECT run_id, source, content_sha256, stem, stem_uri, stem_sha256, bytes, model_name, "
        "model_signature, code_version, job_key FROM lineage ORDER BY stem_uri"
    )
    before = Catalog(path).query(lineage)[1]
    path.unlink()

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "catalog",
            "rebuild",
            "--from",
            str(concurrent["out"]),
            "--catalog",
            str(path),
        ],
        cwd=REPO,
        env=concurrent["env"],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    total = WRITERS * TRACKS_EACH
    assert f"{WRITERS} runs, {total} tracks, {total * STEMS_EACH} stems" in done.stdout
    catalog = Catalog(path)
    manifests = list(concurrent["out"].glob("*/manifest.json"))
    assert catalog.counts() == {
        "schema_version": 1,
        "runs": WRITERS,
        "tracks": len(manifests),
        "stems": len(stem_files(concurrent["out"])),
        "removals": 0,
        "evaluations": 0,
    }
    assert catalog.query(lineage)[1] == before
    assert catalog.query("SELECT DISTINCT flow_name, rebuilt_from FROM runs")[1] == [
        ("rebuild", str(concurrent["out"]))
    ]


@pytest.mark.prefect_server
def test_rebuild_replaces_a_corrupted_catalog_and_keeps_it_aside(concurrent: dict, tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    path.write_bytes(b"this is not a duckdb file" * 100)

    report = rebuild(str(concurrent["out"]), path)

    assert report.moved_aside is not None and report.moved_aside.read_bytes().startswith(b"this is not")
    assert Catalog(path).counts()["stems"] == len(stem_files(concurrent["out"])) == report.stems


# -- SIGKILL -------------------------------------------------------------------------------------------


@pytest.mark.prefect_server
def test_writer_killed_mid_run_then_rerun_completes_the_missing_tracks(
    tmp_path: Path, model_repo: Path, prefect_harness: None
) -> None:
    for i in range(6):
        audio_file(tmp_path / "music", f"k{i}.wav", "wav", seconds=1.0, seed=100 + i)
    out, path, env = tmp_path / "stems", tmp_path / "catalog.duckdb", cli_env(tmp_path)
    catalog = Catalog(path)
    victim = separate([tmp_path / "music"], out, path, model_repo, env, tmp_path / "killed.log")
    deadline = time.monotonic() + 400
    while catalog.query("SELECT count(*) FROM tracks")[1][0][0] < 2:
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    reopened = Catalog(path)  # opens, and holds only whole tracks
    killed_run = reopened.query("SELECT run_id, status FROM runs")[1]
    assert len(killed_run) == 1 and killed_run[0][1] == "running"
    done_before = reopened.query("SELECT count(*) FROM tracks")[1][0][0]
    assert 2 <= done_before < 6
    assert reopened.query(
        "SELECT count(*) FROM tracks t WHERE status <> 'succeeded' OR "
        f"(SELECT count(*) FROM stems s WHERE s.track_id = t.track_id) <> {STEMS_EACH}"
    )[1] == [(0,)]

    rerun = separate([tmp_path / "music"], out, path, model_repo, env, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()
    log = (tmp_path / "rerun.log").read_text()
    assert not any(error in log for error in LOCK_ERRORS)

    final = Catalog(path)
    [(rerun_id,)] = final.query("SELECT run_id FROM runs WHERE status = 'completed'")[1]
    statuses = dict(final.query(f"SELECT status, count(*) FROM tracks WHERE run_id = '{rerun_id}' GROUP BY ALL")[1])
    assert statuses.get("succeeded", 0) + statuses.get("skipped", 0) == 6 and "failed" not in statuses
    assert statuses.get("skipped", 0) >= done_before  # what the killed run finished is not redone
    # Every stem on storage is in the catalog exactly once, and every input has stems.
    assert final.query("SELECT count(*), count(DISTINCT uri) FROM stems")[1] == [(6 * STEMS_EACH, 6 * STEMS_EACH)]
    assert {r[0] for r in final.query("SELECT uri FROM stems")[1]} == stem_files(out)
    assert final.query("SELECT count(DISTINCT source) FROM lineage")[1] == [(6,)]
    assert len(list(out.glob("*/manifest.json"))) == 6
    assert final.query("SELECT count(*) FROM track_latest WHERE status IN ('succeeded', 'skipped')")[1] == [(6,)]


RECORD_FOREVER = textwrap.dedent("""
    import sys
    from catalog import Catalog
    from tests.helpers.records import make_run, make_succeeded
    catalog = Catalog(sys.argv[1])
    run_id = sys.argv[2]
    catalog.start_run(make_run(run_id))
    i = 0
    while True:
        catalog.record_track(run_id, make_succeeded(f"{run_id}-{i}"))
        i += 1
""")


@pytest.mark.parametrize("kill_after", [5, 17, 40])
def test_writer_killed_inside_a_write_leaves_no_half_written_track(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = Catalog(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(2):  # the second writer starts from the file the first one was killed on
        writer = subprocess.Popen([sys.executable, "-c", RECORD_FOREVER, str(path), f"r{attempt}"], cwd=REPO, env=env)
        deadline = time.monotonic() + 120
        while catalog.query(f"SELECT count(*) FROM tracks WHERE run_id = 'r{attempt}'")[1][0][0] < kill_after:
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait()

        reopened = Catalog(path)
        assert reopened.query(
            "SELECT count(*) FROM tracks t WHERE (SELECT count(*) FROM stems s WHERE s.track_id = t.track_id) <> 4"
        )[1] == [(0,)]
        assert reopened.query("SELECT count(*) FROM stems WHERE track_id NOT IN (SELECT track_id FROM tracks)")[1] == [
            (0,)
        ]
        assert reopened.query("SELECT count(*) = count(DISTINCT source) FROM tracks")[1] == [(True,)]
    assert Catalog(path).query("SELECT count(DISTINCT run_id) FROM tracks")[1] == [(2,)]
