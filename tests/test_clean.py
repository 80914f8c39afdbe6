"""`stemworks clean`: what dead processes left is removed (after a dry run that lists it), what live ones
hold is not; retention removes superseded or old outputs and the catalog's views stop listing them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog
from flows.pipeline.workarea import RUN_MARKER, open_run_area
from tasks.io.claims import CLAIMS_DIR, Claim, try_claim
from tasks.io.manifest import STAGING_DIR
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME
from tests.helpers.records import make_run

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def isolated_tmp(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir(exist_ok=True)
    return folder


def dead_process(script: str, tmp_path: Path) -> int:
    """Run `script` (which prints 'ready' when it has done its part) in a process, then SIGKILL it."""
    process = subprocess.Popen(
        [sys.executable, "-c", script + "\nprint('ready', flush=True)\nimport time; time.sleep(600)"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    process.kill()
    process.wait()
    return process.pid


def test_leftovers_of_dead_processes_go_those_of_live_ones_stay(tmp_path: Path) -> None:
    out, work, catalog_path = tmp_path / "out", tmp_path / "work", tmp_path / "c.duckdb"
    # A dead run: work area, claim and staging folder of a process that was SIGKILLed.
    dead_pid = dead_process(
        "from flows.pipeline.workarea import open_run_area; from tasks.io.claims import try_claim\n"
        f"open_run_area({str(work)!r}, 'deadrun')\n"
        f"try_claim({str(out)!r}, 'a' * 64, run_id='deadrun', source='x', lease_s=3600)\n"
        "import pathlib, os\n"
        f"pathlib.Path({str(out / STAGING_DIR)!r}, f'{{os.getpid()}}@{HOST}.' + 'e' * 32).mkdir(parents=True)",
        tmp_path,
    )
    (work / "deadrun" / "track").mkdir()
    (work / "deadrun" / "track" / "decoded.npy").write_bytes(b"\0" * 100_000)
    # This process's own: must survive.
    open_run_area(str(work), "liverun")
    live_claim = try_claim(str(out), "b" * 64, run_id="liverun", source="y")
    assert isinstance(live_claim, Claim)
    (out / STAGING_DIR / f"{os.getpid()}@{HOST}.{'f' * 32}").mkdir()
    # Without a process record: removed only once older than --stale-after-hours.
    old, fresh = out / STAGING_DIR / uuid.uuid4().hex, work / "legacy"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 3 * 3600, time.time() - 3 * 3600))
    # Runs recorded as running: by the dead process, by this one, and on another host.
    catalog = Catalog(catalog_path)
    started = datetime.now(UTC)
    catalog.start_run(make_run("deadrun", pid=dead_pid, hostname=HOST, started_at=started))
    catalog.start_run(make_run("liverun", pid=os.getpid(), hostname=HOST, started_at=started))
    catalog.start_run(make_run("farrun", pid=1, hostname="far-away.invalid", started_at=started))
    args = ["clean", "--out", str(out), "--work-dir", str(work), "--catalog", str(catalog_path)]
    args += ["--stale-after-hours", "2"]

    # The system temp folder is where `clean` looks for dead CLI runs' Prefect databases: one of this test's
    # own, so that another process's leftovers on the machine cannot change what it finds.
    env = {**os.environ, "TMPDIR": str(isolated_tmp(tmp_path))}
    listed = stemworks(*args, "--dry-run", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "dry run: would remove 4 items" in listed.stdout, listed.stdout
    assert (work / "deadrun").exists() and old.exists()
    assert catalog.query("SELECT count(*) FROM runs WHERE status = 'running'")[1] == [(3,)]

    done = stemworks(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert "removed 4 items" in done.stdout, done.stdout
    assert not (work / "deadrun").exists() and not old.exists()
    assert (work / "liverun" / RUN_MARKER).exists() and fresh.exists()
    assert sorted(p.name for p in (out / STAGING_DIR).iterdir()) == [f"{os.getpid()}@{HOST}.{'f' * 32}"]
    assert sorted(p.name for p in (out / CLAIMS_DIR).glob("*.json")) == ["b" * 64 + ".json"]
    assert catalog.query("SELECT run_id, status, tracks_total FROM runs ORDER BY run_id")[1] == [
        ("deadrun", "crashed", 0),
        ("farrun", "running", None),
        ("liverun", "running", None),
    ]
    assert "far-away.invalid: clean there" in done.stdout


@pytest.mark.slow
@pytest.mark.prefect_server
def test_retention_removes_superseded_then_old_outputs_and_views_follow(tmp_path: Path, model_repo: Path) -> None:
    music, out, catalog = tmp_path / "music", tmp_path / "stems", tmp_path / "c.duckdb"
    audio_file(music, "song.wav", "wav", seconds=1.0, seed=3)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TMPDIR": str(isolated_tmp(tmp_path))}
    env.pop("PREFECT_API_URL", None)
    common = ["--model-repo", str(model_repo), "--model", MODEL_NAME, "--out", str(out), "--catalog", str(catalog)]
    for fmt in ("wav", "flac"):
        run = stemworks("separate", str(music), *common, "--shifts", "0", "--format", fmt, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
    [wav_folder] = [p.parent for p in out.glob("*/drums.wav")]
    [flac_folder] = [p.parent for p in out.glob("*/drums.flac")]

    def published() -> list[str]:
        with duckdb.connect(str(catalog), read_only=True) as con:
            return [Path(u).parent.name for (u,) in con.execute("SELECT manifest_uri FROM published").fetchall()]

    assert sorted(published()) == sorted([wav_folder.name, flac_folder.name])
    clean = ["clean", "--out", str(out), "--catalog", str(catalog)]
    listed = stemworks(*clean, "--superseded", "--dry-run", env=env)
    assert listed.returncode == 0 and "would remove 1 items" in listed.stdout, listed.stdout + listed.stderr
    assert "superseded by" in listed.stdout and wav_folder.exists()

    done = stemworks(*clean, "--superseded", env=env)
    assert done.returncode == 0 and "removed 1 items" in done.stdout, done.stdout + done.stderr
    assert not wav_folder.exists() and (flac_folder / "manifest.json").exists()
    assert published() == [flac_folder.name]

    expired = stemworks(*clean, "--older-than-days", "0.000001", env=env)
    assert expired.returncode == 0 and "removed 1 items" in expired.stdout, expired.stdout + expired.stderr
    assert not flac_folder.exists() and published() == []
    with duckdb.connect(str(catalog), read_only=True) as con:
        assert con.execute("SELECT bool_or(published) FROM track_latest").fetchone() == (False,)
        assert con.execute("SELECT count(*) FROM removals").fetchone() == (2,)
        assert con.execute("SELECT count(*) FROM lineage").fetchone() == (8,)  # what was made stays on record

    again = stemworks("separate", str(music), *common, "--shifts", "0", "--format", "flac", env=env)
    assert again.returncode == 0 and "1 succeeded" in again.stdout, again.stdout + again.stderr
    assert published() == [flac_folder.name]


def test_a_bad_retention_value_is_a_usage_error(tmp_path: Path) -> None:
    result = stemworks("clean", "--older-than-days", "-3", env=dict(os.environ))
    assert result.returncode == 2 and "--older-than-days" in result.stderr and not result.stdout
