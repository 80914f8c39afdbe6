"""Job claims: one job key, one worker at a time, across threads, processes and hosts sharing an output.

Real processes race for the same keys on a local folder; a SIGKILLed holder's claim is taken over at
once; a lapsed lease is taken over; S3 claims use conditional writes against moto's S3 server.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from tasks.io.claims import CLAIMS_DIR, Claim, ClaimKeeper, Holder, claim_path, read_claims, release, renew, try_claim
from tasks.io.processes import ProcessStamp
from tests.helpers.audiogen import audio_file
from tests.helpers.constants import MODEL_NAME
from tests.helpers.servers import MotoServer, Relay, clear_s3fs_cache, in_thread, s3_env

ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"{i:064x}" for i in range(12)]


def _race(out: str, barrier: multiprocessing.synchronize.Barrier, queue: multiprocessing.Queue) -> None:
    barrier.wait()
    won = [key for key in KEYS if isinstance(try_claim(out, key, run_id=f"run-{os.getpid()}", source="x"), Claim)]
    queue.put(won)
    barrier.wait()  # hold the claims (stay alive) until every process has tried


def test_processes_racing_for_the_same_keys_each_key_has_one_winner(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    won = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=300)
    assert sorted(key for keys in won for key in keys) == KEYS


def test_a_live_holder_is_respected_and_its_release_frees_the_key(tmp_path: Path) -> None:
    first = try_claim(str(tmp_path), KEYS[0], run_id="a", source="/music/a.wav")
    assert isinstance(first, Claim)
    second = try_claim(str(tmp_path), KEYS[0], run_id="b", source="/music/b.wav")
    assert isinstance(second, Holder) and second.run_id == "a" and second.source == "/music/a.wav"
    assert renew(first)
    release(first)
    assert isinstance(try_claim(str(tmp_path), KEYS[0], run_id="b", source="/music/b.wav"), Claim)


def test_a_killed_holders_claim_is_taken_over_at_once(tmp_path: Path) -> None:
    script = (
        "import sys, time; from tasks.io.claims import try_claim;"
        f"try_claim({str(tmp_path)!r}, {KEYS[1]!r}, run_id='doomed', source='s', lease_s=3600);"
        "print('claimed', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"claimed"
        assert isinstance(try_claim(str(tmp_path), KEYS[1], run_id="other", source="s"), Holder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = try_claim(str(tmp_path), KEYS[1], run_id="other", source="s")
    assert isinstance(taken, Claim)


def test_another_hosts_claim_is_waited_for_until_its_lease_lapses(tmp_path: Path) -> None:
    elsewhere = Holder(
        job_key=KEYS[2],
        run_id="remote",
        token="t",
        source="s",
        process=ProcessStamp(hostname="another-host.invalid", pid=1, started=0.0),
        claimed_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(seconds=1.5),
    )
    path = Path(claim_path(str(tmp_path), KEYS[2]))
    path.parent.mkdir(parents=True)
    path.write_bytes(elsewhere.to_bytes())
    seen = try_claim(str(tmp_path), KEYS[2], run_id="here", source="s")
    assert isinstance(seen, Holder) and seen.run_id == "remote"  # pid 1 is alive here, but it is not that host's
    deadline = time.monotonic() + 60
    while isinstance(got := try_claim(str(tmp_path), KEYS[2], run_id="here", source="s"), Holder):
        assert time.monotonic() < deadline, "the lapsed claim was never taken over"
        time.sleep(0.2)
    assert got.holder.run_id == "here"


def test_a_keeper_renews_while_held_and_releases_everything_on_close(tmp_path: Path) -> None:
    keeper = ClaimKeeper(str(tmp_path), "run", lease_s=1.5)
    claim = keeper.acquire(KEYS[3], "s")
    assert isinstance(claim, Claim)
    first_expiry = claim.holder.expires_at
    deadline = time.monotonic() + 60
    while json.loads(Path(claim_path(str(tmp_path), KEYS[3])).read_text())["expires_at"] == first_expiry.isoformat():
        assert time.monotonic() < deadline, "the claim was never renewed"
        time.sleep(0.1)
    assert isinstance(try_claim(str(tmp_path), KEYS[3], run_id="other", source="s"), Holder)
    keeper.close()
    assert read_claims(str(tmp_path)) == []


@pytest.mark.s3
@pytest.mark.slow
def test_s3_claims_are_conditional_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    moto = MotoServer(tmp_path / "moto.log").start()
    try:
        for name, value in s3_env(moto.endpoint, "secret").items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1").create_bucket(Bucket="claims")
        out = "s3://claims/stems"
        first = try_claim(out, KEYS[4], run_id="a", source="s", lease_s=1.5)
        assert isinstance(first, Claim) and first.etag
        assert isinstance(try_claim(out, KEYS[4], run_id="b", source="s"), Holder)
        assert renew(first, lease_s=1.5)
        deadline = time.monotonic() + 60
        while isinstance(taken := try_claim(out, KEYS[4], run_id="b", source="s"), Holder):
            assert time.monotonic() < deadline, "the lapsed S3 claim was never taken over"
            time.sleep(0.2)
        assert not renew(first)  # lost: the etag changed under it
        release(first)  # not ours any more: must not remove b's claim
        [(_, holder)] = read_claims(out)
        assert holder is not None and holder.run_id == "b"
        release(taken)
        assert read_claims(out) == []
    finally:
        moto.stop()


@pytest.mark.slow
@pytest.mark.prefect_server
def test_runs_started_at_once_on_one_output_separate_each_track_once(tmp_path: Path, model_repo: Path) -> None:
    """Three `stemworks separate` processes, same library and output, started together (no shared API).

    Output is not deterministic (`--shifts 1`), so a second separation of a track would leave catalog
    rows whose sha256 no longer matches the file. The library holds the same content under two names.
    """
    music = tmp_path / "music"
    for seed in range(3):
        audio_file(music, f"song{seed}.wav", "wav", seconds=1.0, seed=seed)
    (music / "copy of song0.wav").write_bytes((music / "song0.wav").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    out, catalog = tmp_path / "stems", tmp_path / "c.duckdb"
    command = [sys.executable, "-m", "flows.cli", "separate", str(music), "--model-repo", str(model_repo)]
    command += ["--model", MODEL_NAME, "--out", str(out), "--catalog", str(catalog), "--shifts", "1"]
    runs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stdout + stderr

    with duckdb.connect(str(catalog), read_only=True) as con:
        succeeded = con.execute(
            "SELECT job_key, count(*) FROM tracks WHERE status = 'succeeded' GROUP BY job_key"
        ).fetchall()
        statuses = con.execute("SELECT status, count(*) FROM tracks GROUP BY ALL ORDER BY 1").fetchall()
        reasons = [r for (r,) in con.execute("SELECT skip_reason FROM tracks WHERE status = 'skipped'").fetchall()]
        stems = con.execute("SELECT uri, sha256 FROM stems").fetchall()
    assert len(succeeded) == 3 and all(count == 1 for _, count in succeeded)  # three contents, each separated once
    assert statuses == [("skipped", 9), ("succeeded", 3)]  # 3 runs x 4 names
    assert all(reasons), "every skipped track says why"
    import hashlib

    for uri, sha in stems:
        assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == sha, f"{uri} no longer holds the recorded bytes"
    assert len({uri for uri, _ in stems}) == len(stems) == 12
    assert len(list(out.glob("*/manifest.json"))) == 3
    assert not list((out / CLAIMS_DIR).glob("*.json")), "every claim was released"


@pytest.mark.s3
@pytest.mark.slow
def test_s3_claim_writes_whose_reply_was_lost_stay_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store takes the claim (or its renewal) but the connection dies before the reply: the client's retry of
    the conditional write then fails on the claim's own write. That claim is still this track's: a retried
    claim must not report its own holder as someone else (the track would skip itself as "separated
    elsewhere"), nor a retried renewal report the claim as lost."""
    import boto3

    moto = MotoServer(tmp_path / "moto.log").start()
    relay = Relay(moto.port)
    relay.up()
    try:
        for name, value in s3_env(relay.endpoint, "secret").items():
            monkeypatch.setenv(name, value)
        clear_s3fs_cache()
        boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1").create_bucket(Bucket="claims")
        out = "s3://claims/stems"

        def lose_the_reply_of_the_next_claim_write() -> threading.Thread:
            tripped = relay.down_on(rf"^PUT /claims/stems/{CLAIMS_DIR}/".encode(), lose_reply=True)

            def back_up() -> None:
                tripped.wait(timeout=60)
                deadline = time.monotonic() + 30
                while True:  # the port is free once the relay's accepting thread has let go of it
                    try:
                        relay.up()
                        return
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)

            return in_thread(back_up)

        watcher = lose_the_reply_of_the_next_claim_write()
        claim = try_claim(out, KEYS[5], run_id="a", source="s")
        watcher.join(timeout=60)
        assert relay.tripped.is_set(), "no claim write went through the relay"
        assert isinstance(claim, Claim), f"its own claim came back as another holder: {claim}"
        [(_, holder)] = read_claims(out)
        assert holder == claim.holder

        watcher = lose_the_reply_of_the_next_claim_write()
        assert renew(claim), "a renewal whose reply was lost came back as a lost claim"
        watcher.join(timeout=60)
        assert relay.tripped.is_set()
        assert renew(claim)  # the etag it keeps is the store's
        assert isinstance(try_claim(out, KEYS[5], run_id="b", source="s"), Holder)
        release(claim)
        assert read_claims(out) == []
    finally:
        clear_s3fs_cache()
        relay.down()
        moto.stop()
