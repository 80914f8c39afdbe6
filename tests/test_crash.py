"""Ten SIGKILLs at random moments of `stemworks separate`, then `stemworks clean` and one more run.

Afterwards: every manifest matches the bytes of its files, every published stem is recorded exactly once
with those bytes, no job key was separated into two succeeded rows, and nothing stale is left: no staging
folder, no claim, no work files, no temporary Prefect database, no run still `running`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog
from tasks.io.claims import CLAIMS_DIR
from tasks.io.manifest import STAGING_DIR
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]
KILLS = 10

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_sigkills_then_clean_leave_consistent_outputs_and_catalog(tmp_path: Path, model_repo: Path) -> None:
    rng = random.Random(20261201)
    music, out, work, catalog = tmp_path / "music", tmp_path / "stems", tmp_path / "work", tmp_path / "c.duckdb"
    for seed in range(5):
        audio_file(music, f"song{seed}.wav", "wav", seconds=2.0, seed=seed)
    scratch = tmp_path / "tmp"  # the system temp folder of these runs: their Prefect databases go there
    scratch.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "TMPDIR": str(scratch),
    }
    env.pop("PREFECT_API_URL", None)
    separate = [sys.executable, "-m", "flows.cli", "separate", str(music), "--model-repo", str(model_repo)]
    separate += ["--model", MODEL_NAME, "--out", str(out), "--catalog", str(catalog), "--work-dir", str(work)]
    separate += ["--shifts", "1"]  # not deterministic: a track separated twice would show in the sha256s

    killed = 0
    for _ in range(KILLS):
        run = subprocess.Popen(
            separate, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        moment = time.monotonic() + rng.uniform(1.0, 20.0)
        while run.poll() is None and time.monotonic() < moment:
            time.sleep(0.05)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the CLI and its temporary Prefect server, as a crash would
            killed += 1
        run.wait()
    assert killed >= KILLS // 2, "most runs must die mid-way for this test to mean anything"

    cleaned = stemworks("clean", "--out", str(out), "--work-dir", str(work), "--catalog", str(catalog), env=env)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    final = stemworks(*separate[3:], env=env)
    assert final.returncode == 0, final.stdout + final.stderr
    again = stemworks("clean", "--out", str(out), "--work-dir", str(work), "--catalog", str(catalog), env=env)
    assert again.returncode == 0 and "removed 0 items" in again.stdout and "closed 0 dead runs" in again.stdout, (
        again.stdout
    )

    manifests = sorted(out.glob("*/manifest.json"))
    assert len(manifests) == 5
    listed: dict[str, str] = {}
    for path in manifests:
        manifest = json.loads(path.read_text())
        for stem in manifest["stems"]:
            file = path.parent / stem["file"]
            assert file.stat().st_size == stem["bytes"] and sha256(file) == stem["sha256"], f"{file} != its manifest"
            listed[str(file)] = stem["sha256"]
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(
            ["manifest.json", *(s["file"] for s in manifest["stems"])]
        )

    with duckdb.connect(str(catalog), read_only=True) as con:
        stems = con.execute("SELECT uri, sha256 FROM stems").fetchall()
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone() == (0,)
        doubled = con.execute(
            "SELECT job_key FROM tracks WHERE status = 'succeeded' GROUP BY job_key HAVING count(*) > 1"
        ).fetchall()
    assert doubled == []
    assert len(stems) == len({uri for uri, _ in stems}), "a stem file recorded twice"
    assert dict(stems) == listed, "the catalog's stems are exactly the published files, with their bytes"

    assert not (out / STAGING_DIR).exists() or not any((out / STAGING_DIR).iterdir())
    assert not (out / CLAIMS_DIR).exists() or not any((out / CLAIMS_DIR).iterdir())
    assert not work.exists() or not any(work.iterdir())
    assert not list(scratch.glob("stemworks-prefect-*"))


def test_ctrl_c_closes_the_run_as_cancelled_and_leaves_nothing_behind(tmp_path: Path, model_repo: Path) -> None:
    """Ctrl-C (SIGINT to the CLI's process group) after a track is published: exit 130 with a line saying what
    happened, the run recorded `cancelled` with the tracks it recorded, no staging, claim or work file left."""
    music, out, work, catalog = tmp_path / "music", tmp_path / "stems", tmp_path / "work", tmp_path / "c.duckdb"
    for seed in range(4):
        audio_file(music, f"song{seed}.wav", "wav", seconds=2.0, seed=seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    separate = [sys.executable, "-m", "flows.cli", "separate", str(music), "--model-repo", str(model_repo)]
    separate += ["--model", MODEL_NAME, "--out", str(out), "--catalog", str(catalog), "--work-dir", str(work)]
    run = subprocess.Popen(
        separate, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while run.poll() is None and not list(out.glob("*/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, "the run ended before a track was published: nothing to interrupt"
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends: the CLI and its Prefect server
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stdout[-2000:] + stderr[-4000:]
    assert "interrupted: what was published is kept" in stderr and "Traceback" not in stderr, stderr[-4000:]
    with duckdb.connect(str(catalog), read_only=True) as con:
        runs = con.execute("SELECT status, tracks_total, tracks_succeeded FROM runs").fetchall()
        recorded = con.execute("SELECT count(*), count(*) FILTER (status = 'succeeded') FROM tracks").fetchone()
    assert runs == [("cancelled", *recorded)] and recorded[1] >= 1
    assert len(list(out.glob("*/manifest.json"))) == recorded[1]
    assert not (out / STAGING_DIR).exists() or not any((out / STAGING_DIR).iterdir())
    assert not (out / CLAIMS_DIR).exists() or not any((out / CLAIMS_DIR).iterdir())
    assert not work.exists() or not any(work.iterdir())


def test_ctrl_c_during_a_catalog_query_stops_the_command(tmp_path: Path) -> None:
    """DuckDB takes a Ctrl-C that arrives mid-query for a failed query (`RuntimeError: Query interrupted`): in a
    run, one track failed and the run went on. It must stop the command like any Ctrl-C: exit 130, no traceback."""
    catalog = tmp_path / "c.duckdb"
    Catalog(catalog)
    endless = "SELECT count(*) FROM range(1000000000000) AS t(i) WHERE i % 7 = 3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    query = [sys.executable, "-m", "flows.cli", "catalog", "query", endless, "--catalog", str(catalog)]
    run = subprocess.Popen(query, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while run.poll() is None and not reading(catalog) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, "the query ended before it could be interrupted"
        time.sleep(0.5)  # into the query itself (opening the file takes milliseconds); either way it must stop
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()  # the query would otherwise run on for hours
    assert run.returncode == 130, stdout[-2000:] + stderr[-4000:]
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-4000:]


def reading(catalog: Path) -> bool:
    """Whether some process holds the catalog's sidecar lock (a reader holds it shared while its query runs)."""
    fd = os.open(f"{catalog}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False
