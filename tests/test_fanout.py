"""Fan-out for real: a library run of the `adhoc` deployment splits its tracks into shards that three
`prefect worker start --pool cpu` processes take; Prefect's server on PostgreSQL, stems on moto's S3, the
catalog a DuckLake whose metadata is in the same PostgreSQL. One stack for the module (the slow part)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from catalog.ducklake import DuckLakeCatalog
from catalog.errors import CatalogError
from tasks.io.manifest import Manifest
from tests.helpers.audiogen import audio_file
from tests.helpers.constants import MODEL_NAME
from tests.helpers.postgres import SKIP_REASON, PostgresServer, postgres_bin
from tests.helpers.prefect_stack import REPO_ROOT, PrefectServer, start_server, start_worker, stop, tail, wait_for
from tests.helpers.servers import MotoServer, s3_env

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.s3, pytest.mark.timeout(2400)]
AUTH = "stemworks:not-a-real-secret"
SECRET = "wJalrXUtnFEMI-K7MDENG-stemworks-FANOUT"
BUCKET = "fanout-stems"
STEMS = {"drums", "bass", "other", "vocals"}
WORKERS = 3
# Flow-run heartbeats every 30 s (Prefect's minimum); a shard run silent for 75 s is taken for dead.
HEARTBEAT_S, STALL_S = 30, 75.0
CANCEL_CLEANUP_S = 2
TERMINAL_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class FanoutStack:
    server: PrefectServer
    root: Path
    lake: str  # ducklake:postgres:...
    lake_data: Path
    model_repo: Path
    s3: dict[str, str]
    workers: dict[str, subprocess.Popen]

    def worker_env(self, name: str) -> dict[str, str]:
        return {
            **self.s3,
            "STEMWORKS_WORKER": name,
            "STEMWORKS_WORK_DIR": str(self.root / f"work-{name}"),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            "STEMWORKS_FANOUT_POLL_S": "1",
        }

    def start_worker(self, name: str) -> None:
        log = self.root / f"{name}.log"
        self.workers[name] = start_worker(self.server, "cpu", log, "--name", name, **self.worker_env(name))

    def catalog(self) -> DuckLakeCatalog:
        return DuckLakeCatalog(self.lake, str(self.lake_data), read_only=True)

    def explain(self) -> str:
        logs = "\n".join(f"--- {name}:\n{tail(self.root / f'{name}.log', 3000)}" for name in self.workers)
        return f"{logs}\n--- server:\n{tail(self.server.log, 2000)}"

    def trigger(self, sources: list[str], out: str, **fanout: object) -> str:
        parameters = {
            "sources": sources,
            "separation": {"model": MODEL_NAME, "model_repo": str(self.model_repo), "device": "cpu", "shifts": 0},
            "output": {"out": out},
            "fanout": fanout,
        }
        with self.server.http() as api:
            deployment = self.server.deployment_id("separate-library/adhoc")
            response = api.post(
                f"/deployments/{deployment}/create_flow_run",
                json={"parameters": parameters, "idempotency_key": uuid.uuid4().hex},
            )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def finished(self, flow_run_id: str) -> dict:
        try:
            return self.server.wait_terminal(flow_run_id, timeout=1200)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.explain()}") from exc

    def run_id_of(self, flow_run_id: str) -> str:
        (row,) = self.catalog().query(f"SELECT run_id FROM runs WHERE flow_run_id = '{flow_run_id}'")[1]
        return row[0]

    def table(self, flow_run_id: str) -> tuple[list[dict], str]:
        (artifact,) = [a for a in self.server.artifacts(flow_run_id) if a["type"] == "table"]
        return json.loads(artifact["data"]), artifact["description"]


@pytest.fixture(scope="module")
def fanout_stack(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[FanoutStack]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("fanout")
    postgres = PostgresServer(bindir).start()
    moto: MotoServer | None = None
    server: PrefectServer | None = None
    stack: FanoutStack | None = None
    try:
        prefect_db = postgres.create_database("prefect")
        lake = "ducklake:postgres:" + postgres.create_database("lake")
        database_url = f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/prefect"
        assert "dbname=prefect" in prefect_db
        moto = MotoServer(root / "moto.log").start()
        s3 = s3_env(moto.endpoint, SECRET)
        boto3.client(
            "s3", endpoint_url=moto.endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
        ).create_bucket(Bucket=BUCKET)
        server = start_server(
            root / "prefect",
            AUTH,
            PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url,
            # how often the server cancels the sub-runs of cancelled runs (default 20 s)
            PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS=str(CANCEL_CLEANUP_S),
        )
        lake_data = root / "lake-data"
        setup = subprocess.run(
            [
                sys.executable,
                "-m",
                "deployments.setup",
                "--out",
                f"s3://{BUCKET}/default",
                "--catalog",
                lake,
                "--catalog-data-path",
                str(lake_data),
                "--name",
                "adhoc",
            ],
            env=server.client_env(),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert setup.returncode == 0, f"setup failed:\n{setup.stdout[-3000:]}\n{setup.stderr[-3000:]}"
        stack = FanoutStack(server, root, lake, lake_data, model_repo, s3, {})
        for index in range(WORKERS):
            stack.start_worker(f"worker-{index}")
        yield stack
    finally:
        if stack is not None:
            for process in stack.workers.values():
                stop(process)
        if server is not None:
            stop(server.process)
        if moto is not None:
            moto.stop()
        postgres.stop()


def library(root: Path, count: int, seed: int) -> Path:
    folder = root / f"library-{seed}"
    for index in range(count):
        audio_file(folder, f"track {index:02d}.wav", "wav", seconds=0.6 + 0.1 * (index % 5), seed=seed + index)
    return folder


def s3_manifests(stack: FanoutStack, prefix: str) -> dict[str, Manifest]:
    """Every manifest under s3://BUCKET/prefix, after checking that each stem it lists is there, at its size."""
    client = boto3.client(
        "s3",
        endpoint_url=stack.s3["AWS_ENDPOINT_URL"],
        aws_access_key_id=stack.s3["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.s3["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        objects.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    manifests: dict[str, Manifest] = {}
    for key in (k for k in objects if k.endswith("/manifest.json")):
        manifest = Manifest.model_validate_json(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        folder = key.rsplit("/", 1)[0]
        for stem in manifest.stems:
            assert objects.get(f"{folder}/{stem.file}") == stem.bytes, f"{key} lists {stem.file}, not there as listed"
        assert {s.stem for s in manifest.stems} == STEMS
        manifests[key] = manifest
    return manifests


def shard_tracks(stack: FanoutStack, parent_run_ids: list[str]) -> list[tuple]:
    """(parent, source, job_key, status, worker, shard, run status) of every track the parents' shard runs recorded."""
    ids = ", ".join(f"'{r}'" for r in parent_run_ids)
    return stack.catalog().query(
        "SELECT r.parent_run_id, t.source, t.job_key, t.status, t.worker, t.shard, r.status "
        f"FROM tracks t JOIN runs r ON r.run_id = t.run_id WHERE r.parent_run_id IN ({ids})"
    )[1]


def test_a_library_is_fanned_out_over_the_workers(fanout_stack: FanoutStack) -> None:
    stack = fanout_stack
    folder = library(stack.root, 24, seed=100)
    flow_run_id = stack.trigger([str(folder)], f"s3://{BUCKET}/spread", shard_tracks=4, shards_at_once=6)
    run = stack.finished(flow_run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.explain()}"

    manifests = s3_manifests(stack, "spread")
    assert len(manifests) == 24
    parent = stack.run_id_of(flow_run_id)
    rows = shard_tracks(stack, [parent])
    assert len(rows) == 24
    succeeded = Counter(job_key for _, _, job_key, status, *_ in rows if status == "succeeded")
    assert sorted(succeeded) == sorted(m.job_key for m in manifests.values())
    assert set(succeeded.values()) == {1}
    assert {shard for *_, shard, _ in rows} == set(range(6))
    workers = {worker for *_, worker, _, _ in rows}
    assert len(workers) >= 2 and workers <= {f"worker-{i}" for i in range(WORKERS)}, workers
    catalog = stack.catalog()
    shards = catalog.query(f"SELECT shard, status, flow_run_id FROM runs WHERE parent_run_id = '{parent}' ORDER BY 1")
    assert [(s, status) for s, status, _ in shards[1]] == [(i, "completed") for i in range(6)]
    counts = catalog.query(
        f"SELECT status, tracks_total, tracks_succeeded, tracks_skipped FROM runs WHERE run_id = '{parent}'"
    )[1]
    assert counts == [("completed", 24, 24, 0)]

    table, description = stack.table(flow_run_id)
    assert sorted(Path(row["source"]).name for row in table) == sorted(p.name for p in folder.iterdir())
    assert {row["status"] for row in table} == {"succeeded"}
    assert {row["worker"] for row in table} == workers and {row["shard"] for row in table} == set(map(str, range(6)))
    assert "24 separated, 0 skipped (unchanged), 0 failed" in description
    # each shard is a flow run of the same deployment, named after the parent, with a parent-derived idempotency key
    children = [stack.server.flow_run(flow_run_id) for _, _, flow_run_id in shards[1]]
    assert {c["deployment_id"] for c in children} == {run["deployment_id"]}
    assert all(c["idempotency_key"].startswith(f"{flow_run_id}:shard-") for c in children)


def test_two_runs_of_one_library_at_once_separate_each_track_once(fanout_stack: FanoutStack) -> None:
    stack = fanout_stack
    folder = library(stack.root, 8, seed=200)
    flow_runs = [stack.trigger([str(folder)], f"s3://{BUCKET}/twice", shard_tracks=4) for _ in range(2)]
    finished = [stack.finished(f) for f in flow_runs]
    assert [r["state"]["type"] for r in finished] == ["COMPLETED", "COMPLETED"], stack.explain()

    manifests = s3_manifests(stack, "twice")
    assert len(manifests) == 8
    parents = [stack.run_id_of(f) for f in flow_runs]
    rows = shard_tracks(stack, parents)
    succeeded = Counter(job_key for _, _, job_key, status, *_ in rows if status == "succeeded")
    assert sorted(succeeded) == sorted(m.job_key for m in manifests.values()) and set(succeeded.values()) == {1}
    # Each run lists all eight; per track, one run separated it and the other reports it skipped.
    tables = [{Path(row["source"]).name: row["status"] for row in stack.table(f)[0]} for f in flow_runs]
    assert all(len(t) == 8 for t in tables)
    assert all(sorted((tables[0][name], tables[1][name])) == ["skipped", "succeeded"] for name in tables[0]), tables


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def worker_of(stack: FanoutStack, pid: int) -> str | None:
    """Which of the stack's workers started process `pid` (its ancestor; Prefect gives each flow run its own
    session, so a worker's process group does not hold its flow runs)."""
    workers = {process.pid: name for name, process in stack.workers.items()}
    seen = 0
    while pid not in workers and pid > 1 and seen < 64:
        pid, seen = parent_pid(pid) or 0, seen + 1
    return workers.get(pid)


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it, as a host that dies would stop them all at once."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ppid := parent_pid(int(entry.name))) is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_killed_mid_shard_is_survived(fanout_stack: FanoutStack) -> None:
    stack = fanout_stack
    folder = library(stack.root, 9, seed=300)
    flow_run_id = stack.trigger([str(folder)], f"s3://{BUCKET}/killed", shard_tracks=3, stall_s=STALL_S)

    def parent_run() -> tuple[str, int] | None:
        try:
            found = stack.catalog().query(f"SELECT run_id, pid FROM runs WHERE flow_run_id = '{flow_run_id}'")[1]
        except CatalogError:  # no lake yet (this test alone): the parent creates it
            return None
        return found[0] if found else None

    parent, parent_pid = wait_for(parent_run, 600, "the parent run to start")
    catalog = stack.catalog()
    parent_worker = worker_of(stack, parent_pid)

    def shard_mid_way() -> tuple[str, str, str] | None:
        """A running shard run on a worker other than the parent's, that has recorded some of its tracks."""
        running = catalog.query(
            "SELECT r.run_id, r.pid, r.flow_run_id, count(t.track_id) FROM runs r LEFT JOIN tracks t USING (run_id) "
            f"WHERE r.parent_run_id = '{parent}' AND r.status = 'running' GROUP BY ALL"
        )[1]
        for run_id, pid, shard_flow_run, recorded in running:
            worker = worker_of(stack, pid)
            if worker not in (None, parent_worker) and 1 <= recorded < 3:
                return run_id, shard_flow_run, worker
        return None

    victim_run, victim_flow_run, victim = wait_for(shard_mid_way, 900, "a shard run half way", every=0.3)
    kill_tree(stack.workers[victim].pid)  # the worker and its flow-run processes, at once
    stack.workers[victim].wait(timeout=60)
    try:
        run = stack.finished(flow_run_id)
    finally:
        stack.start_worker(victim)  # the module's stack keeps its three workers
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.explain()}"

    crashed = stack.server.flow_run(victim_flow_run)
    assert crashed["state"]["type"] == "CRASHED" and "heartbeat" in crashed["state"]["message"], crashed["state"]
    runs = dict(catalog.query(f"SELECT run_id, status FROM runs WHERE parent_run_id = '{parent}'")[1])
    lost = {run_id for run_id, status in runs.items() if status == "crashed"}  # the victim ran one or two shards
    assert victim_run in lost and len(runs) == 3 + len(lost), runs  # each lost shard ran again, once
    assert set(runs.values()) == {"crashed", "completed"}, runs

    manifests = s3_manifests(stack, "killed")  # and no manifest lists a missing file
    assert len(manifests) == 9
    rows = shard_tracks(stack, [parent])
    per_source = Counter(source for _, source, *_ in rows)
    assert len(per_source) == 9 and set(per_source.values()) == {1}, per_source  # each track recorded once
    assert Counter(status for _, _, _, status, *_ in rows) <= Counter(succeeded=9, skipped=9)
    # Published once each: every job key's stems are recorded by exactly one track row (a track the dead shard
    # published without recording is skipped by its job key on the next attempt, which records its stems).
    stems = catalog.query(
        "SELECT t.job_key, count(DISTINCT t.track_id), count(*) FROM stems s JOIN tracks t ON t.track_id = s.track_id "
        f"JOIN runs r ON r.run_id = t.run_id WHERE r.parent_run_id = '{parent}' GROUP BY ALL"
    )[1]
    assert sorted(k for k, _, _ in stems) == sorted(m.job_key for m in manifests.values())
    assert {(tracks, files) for _, tracks, files in stems} == {(1, 4)}
    table, description = stack.table(flow_run_id)
    assert sorted(Path(row["source"]).name for row in table) == sorted(p.name for p in folder.iterdir())
    assert {row["status"] for row in table} <= {"succeeded", "skipped"}, table
    assert " 0 failed;" in description, description


def test_cancelling_the_parent_cancels_its_shard_runs(fanout_stack: FanoutStack) -> None:
    """Shard runs are sub-runs of the parent (`run_deployment` inside its flow), so Prefect's cancellation
    clean-up cancels the ones not finished once the parent is Cancelled; nothing is dispatched after that."""
    stack = fanout_stack
    folder = stack.root / "library-cancelled"
    for index in range(8):  # shards of four 2 s tracks: long enough to be running when the clean-up comes
        audio_file(folder, f"track {index:02d}.wav", "wav", seconds=2.0, seed=400 + index)
    flow_run_id = stack.trigger([str(folder)], f"s3://{BUCKET}/cancelled", shard_tracks=4)

    def shard_runs() -> list[dict]:
        with stack.server.http() as api:
            response = api.post(
                "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}
            )
            response.raise_for_status()
            return response.json()

    running = wait_for(
        lambda: [r for r in shard_runs() if r["state"]["type"] == "RUNNING"], 900, "a shard run to run", every=0.5
    )
    with stack.server.http() as api:
        cancel = {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}
        response = api.post(f"/flow_runs/{flow_run_id}/set_state", json=cancel)
    assert response.status_code in (200, 201), response.text
    parent = stack.finished(flow_run_id)
    assert parent["state"]["type"] == "CANCELLED", f"{parent['state']}\n{stack.explain()}"

    def all_ended() -> list[dict] | None:
        children = shard_runs()
        return children if all(c["state"]["type"] in TERMINAL_TYPES for c in children) else None

    try:
        children = wait_for(all_ended, 600, "every shard run to end", every=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {[(c['name'], c['state']['type']) for c in shard_runs()]}") from exc
    ended = Counter(c["state"]["type"] for c in children)
    assert {r["id"] for r in running} <= {c["id"] for c in children}
    # a shard that finished between the read and the cancel completed; the others were cancelled
    assert ended["CANCELLED"] >= 1 and set(ended) <= {"CANCELLED", "COMPLETED"}, ended
    # The catalog says so too: each stopped flow closed its run as cancelled, with what it had recorded.
    catalog = stack.catalog()
    parent_run = catalog.query(f"SELECT run_id, status FROM runs WHERE flow_run_id = '{flow_run_id}'")[1]
    assert [status for _, status in parent_run] == ["cancelled"]
    shards = catalog.query(f"SELECT flow_run_id, status FROM runs WHERE parent_run_id = '{parent_run[0][0]}'")[1]
    assert dict(shards) == {c["id"]: c["state"]["type"].lower() for c in children}
