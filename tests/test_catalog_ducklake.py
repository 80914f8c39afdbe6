"""The catalog in a DuckLake (metadata in a real PostgreSQL started here, data in a folder or on moto's S3):
writer processes at once, an analyst attaching it from plain DuckDB, the CLI, upgrades, and bad locations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import boto3
import duckdb
import pytest

from catalog import Catalog
from catalog.backend import open_catalog
from catalog.ducklake import DuckLakeCatalog, DuckLakeLocation, redact_location, without_constraints
from catalog.errors import CatalogError
from catalog.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, create_table_statements
from catalog.views import VIEWS
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.postgres import SKIP_REASON, PostgresServer, postgres_bin
from tests.helpers.records import make_failed, make_run, make_skipped, make_succeeded
from tests.helpers.servers import MotoServer, free_port, s3_env

REPO = Path(__file__).resolve().parents[1]
WRITERS, TRACKS_EACH = 4, 10
SECRET = "wJalrXUtnFEMI-K7MDENG-stemworks-LAKE"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip(SKIP_REASON)
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


def new_lake(postgres: PostgresServer) -> str:
    return "ducklake:postgres:" + postgres.create_database("lake_" + uuid.uuid4().hex[:12])


# -- no server needed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "says"),
    [
        ("ducklake:mydb.ducklake", "metadata in PostgreSQL"),
        ("ducklake:postgres:", "names no database"),
        ("ducklake:postgres:host=localhost port=5432", "no dbname"),
        ("ducklake:postgres:dbname=lake host", "cannot read 'host' as key=value"),
    ],
)
def test_a_malformed_location_is_refused_with_the_form_to_use(location: str, says: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(says)):
        DuckLakeLocation.parse(location)


def test_passwords_never_show() -> None:
    location = DuckLakeLocation.parse("ducklake:postgres:dbname=lake host=db password='s3 cret' user=u", "/tmp/lake")
    assert "s3 cret" not in str(location) and "password=***" in str(location)
    assert redact_location("dbname=x password=hunter2") == "dbname=x password=***"
    assert location.data_path == "/tmp/lake/"


def test_ducklake_tables_are_the_file_tables_without_key_constraints() -> None:
    for statement in [*create_table_statements(), *(s for m in MIGRATIONS.values() for s in m)]:
        stripped = without_constraints(statement)
        assert "KEY" not in stripped and "REFERENCES" not in stripped

        def not_null(text: str) -> list[str]:
            return [line.rstrip(",") for line in text.splitlines() if "NOT NULL" in line]

        assert not_null(stripped) == not_null(statement)


# -- writers at once -------------------------------------------------------------------------------


def start_writers(location: str, data_path: str, go: Path, env: dict[str, str], count: int = WRITERS) -> list:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.lake_writer",
                location,
                data_path,
                f"w{i}",
                str(TRACKS_EACH),
                str(go),
            ],
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


def finish(writers: list) -> list[dict]:
    results = []
    for writer in writers:
        out, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def plain_attach(location: str, alias: str = "lake") -> duckdb.DuckDBPyConnection:
    """What an analyst types: extensions, then ATTACH (read-only) — no stemworks code involved."""
    con = duckdb.connect()
    con.execute("LOAD postgres; LOAD ducklake; SET TimeZone = 'UTC'")
    con.execute(f"ATTACH '{location}' AS {alias} (READ_ONLY)")
    return con


def consistent_counts(con: duckdb.DuckDBPyConnection) -> tuple[int, int, int]:
    """Runs, tracks, stems from one snapshot; asserts that every committed track came with its stems
    and every finished run with all its tracks."""
    runs, tracks, stems, torn, unfinished = con.execute(
        """
        SELECT (SELECT count(*) FROM lake.runs),
               (SELECT count(*) FROM lake.tracks),
               (SELECT count(*) FROM lake.stems),
               (SELECT count(*) FROM lake.tracks t WHERE t.status = 'succeeded'
                  AND (SELECT count(*) FROM lake.stems s WHERE s.track_id = t.track_id) <> 4),
               (SELECT count(*) FROM lake.runs r WHERE r.status <> 'running'
                  AND (SELECT count(*) FROM lake.tracks t WHERE t.run_id = r.run_id) <> r.tracks_total)
        """
    ).fetchone()
    assert (torn, unfinished) == (0, 0)
    return runs, tracks, stems


def check_everything_landed(location: str, results: list[dict]) -> None:
    succeeded_each = sum(1 for i in range(TRACKS_EACH) if i % 5 != 4)
    with plain_attach(location) as con:
        assert consistent_counts(con) == (WRITERS, WRITERS * TRACKS_EACH, WRITERS * succeeded_each * 4)
        ids = {row[0] for row in con.execute("SELECT track_id FROM lake.tracks").fetchall()}
        assert ids == {track for result in results for track in result["track_ids"]}
        duplicates = con.execute(
            "SELECT (SELECT count(*) - count(DISTINCT run_id) FROM lake.runs),"
            " (SELECT count(*) - count(DISTINCT (track_id, stem)) FROM lake.stems)"
        ).fetchone()
        assert duplicates == (0, 0)
        statuses = con.execute("SELECT DISTINCT status FROM lake.runs").fetchall()
        assert statuses == [("failed",)]  # every run finished (each has failed tracks), none left running


@pytest.mark.slow
def test_writer_processes_at_once_while_an_analyst_reads(postgres: PostgresServer, tmp_path: Path) -> None:
    location, data = new_lake(postgres), str(tmp_path / "lake-data")
    DuckLakeCatalog(location, data).close()  # created once first: extensions installed, tables made
    go = tmp_path / "go"
    writers = start_writers(location, data, go, dict(os.environ))
    reads: list[tuple[int, int, int]] = []
    go.touch()
    with plain_attach(location) as con:
        while any(w.poll() is None for w in writers):
            con.execute("BEGIN TRANSACTION")
            reads.append(consistent_counts(con))
            con.execute("COMMIT")
    results = finish(writers)
    check_everything_landed(location, results)
    assert reads and all(a <= b for earlier, later in pairwise(reads) for a, b in zip(earlier, later, strict=True))
    print(f"analyst reads while writing: {len(reads)}; writer retries: {[r['retries'] for r in results]}")


@pytest.mark.slow
@pytest.mark.s3
def test_writer_processes_with_data_on_s3(postgres: PostgresServer, tmp_path: Path, monkeypatch) -> None:
    moto = MotoServer(tmp_path / "moto.log").start()
    try:
        env = s3_env(moto.endpoint, SECRET)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="lake")
        location, data = new_lake(postgres), "s3://lake/catalog"
        catalog = open_catalog(location, data)
        assert isinstance(catalog, DuckLakeCatalog)
        go = tmp_path / "go"
        writers = start_writers(location, data, go, dict(os.environ))
        go.touch()
        results = finish(writers)
        check_everything_landed(location, results)
        catalog.flush()  # inlined rows out to Parquet on S3
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix="catalog/").get("Contents", [])]
        assert any(k.endswith(".parquet") and "/tracks/" in k for k in keys), keys
        catalog.close()
        with plain_attach(location) as con:  # reading the Parquet back needs the S3 secret
            endpoint = moto.endpoint.removeprefix("http://")
            con.execute(
                f"CREATE SECRET (TYPE s3, KEY_ID '{env['AWS_ACCESS_KEY_ID']}', SECRET '{SECRET}', REGION 'us-east-1', "
                f"ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)"
            )
            assert con.execute("SELECT count(*) FROM lake.stems").fetchone() == (WRITERS * 8 * 4,)
    finally:
        moto.stop()


# -- same tables and views as the file catalog -----------------------------------------------------


def fill(catalog: Catalog) -> None:
    run = make_run("run-a")
    catalog.start_run(run)
    for outcome in [make_succeeded("verse"), make_succeeded("chorus"), make_failed("broken"), make_skipped("again")]:
        catalog.record_track("run-a", outcome)


def readme_queries() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r'\$ stemworks catalog query "(.+?)" --format', text)


@pytest.mark.slow
def test_views_and_readme_queries_answer_alike_on_both(postgres: PostgresServer, tmp_path: Path) -> None:
    location = new_lake(postgres)
    lake = open_catalog(location, str(tmp_path / "data"))
    file = open_catalog(tmp_path / "catalog.duckdb")
    fill(lake)
    fill(file)
    assert lake.counts() == file.counts()
    for name in [*TABLES, *VIEWS]:
        lake_columns = lake.query(f'DESCRIBE "{name}"')[1]
        file_columns = file.query(f'DESCRIBE "{name}"')[1]
        assert [(c[0], c[1]) for c in lake_columns] == [(c[0], c[1]) for c in file_columns], name
    queries = readme_queries()
    assert len(queries) >= 5
    for sql in queries:
        lake_answer, file_answer = lake.query(sql), file.query(sql)
        assert lake_answer[0] == file_answer[0], sql
        assert sorted(map(repr, lake_answer[1])) == sorted(map(repr, file_answer[1])), sql
    with plain_attach(location, "analytics") as con:  # views resolve inside the lake, whatever its alias
        assert con.execute("SELECT count(*) FROM analytics.lineage").fetchone() == (8,)
        assert con.execute("SELECT count(*) FROM analytics.failures").fetchone() == (1,)


@pytest.mark.slow
def test_an_older_lake_is_upgraded_by_concurrent_openers(postgres: PostgresServer, tmp_path: Path) -> None:
    location, data = new_lake(postgres), str(tmp_path / "data")
    open_catalog(location, data)
    with duckdb.connect() as con:  # take the lake back to schema 3 by undoing migrations 4.. by hand
        con.execute("LOAD postgres; LOAD ducklake")
        con.execute(f"ATTACH '{location}' AS lake")
        for version in range(SCHEMA_VERSION, 3, -1):
            for statement in reversed(MIGRATIONS[version]):
                if added := re.match(r'ALTER TABLE "(\w+)" ADD COLUMN "(\w+)"', statement):
                    con.execute(f'ALTER TABLE lake."{added[1]}" DROP COLUMN "{added[2]}"')
                elif created := re.match(r'CREATE TABLE IF NOT EXISTS "(\w+)"', statement):
                    con.execute(f'DROP TABLE lake."{created[1]}"')
        con.execute("DELETE FROM lake.schema_version")
        con.execute("INSERT INTO lake.schema_version VALUES (3, now())")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", f"from catalog.backend import open_catalog; open_catalog({location!r})"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
    lake = open_catalog(location)
    assert lake.query("SELECT max(version) FROM schema_version")[1] == [(SCHEMA_VERSION,)]
    fill(lake)
    assert lake.query("SELECT count(*) FROM track_latest")[1] == [(4,)]


# -- the command line ------------------------------------------------------------------------------


def publish_fake_track(out: Path, folder: str) -> None:
    from tests.helpers.manifests import manifest_for

    stem = out / folder / "drums.wav"
    stem.parent.mkdir(parents=True)
    stem.write_bytes(b"RIFF" + bytes(100))
    manifest = manifest_for({"drums": stem}, key=folder.ljust(64, "0")[:64])
    (out / folder / "manifest.json").write_bytes(manifest.to_bytes())


@pytest.mark.slow
def test_cli_query_export_and_rebuild_on_a_ducklake(postgres: PostgresServer, tmp_path: Path) -> None:
    location, data = new_lake(postgres), str(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMWORKS_CATALOG")}
    fill(open_catalog(location, data))

    query = stemworks(
        "catalog",
        "query",
        "SELECT status, count(*) AS n FROM tracks GROUP BY ALL ORDER BY 1",
        "--catalog",
        location,
        "--format",
        "json",
        env=env,
    )
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == [
        {"status": "failed", "n": 1},
        {"status": "skipped", "n": 1},
        {"status": "succeeded", "n": 2},
    ]
    refused = stemworks("catalog", "query", "DELETE FROM runs", "--catalog", location, env=env)
    assert refused.returncode == 2 and "read-only" in refused.stderr

    exported = stemworks("catalog", "export", str(tmp_path / "export"), "--catalog", location, env=env)
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in (tmp_path / "export").iterdir()} == {f"{n}.parquet" for n in [*TABLES, *VIEWS]}
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'export' / 'stems.parquet'}'").fetchone() == (8,)

    out = tmp_path / "stems"
    publish_fake_track(out, "aaaa")
    publish_fake_track(out, "bbbb")
    rebuilt = stemworks("catalog", "rebuild", "--from", str(out), "--catalog", location, env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "1 runs, 2 tracks, 2 stems" in rebuilt.stdout and "snapshot" in rebuilt.stdout
    lake = open_catalog(location)
    assert lake.query("SELECT count(*), count(DISTINCT manifest_uri) FROM tracks")[1] == [(2, 2)]
    assert lake.query("SELECT rebuilt_from IS NOT NULL FROM runs")[1] == [(True,)]

    empty = stemworks("catalog", "query", "SELECT 1", "--catalog", new_lake(postgres), env=env)
    assert empty.returncode == 2 and "no catalog in" in empty.stderr


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["unreachable", "malformed", "no data path"])
def test_separate_refuses_a_bad_ducklake_at_start(problem: str, postgres: PostgresServer, tmp_path: Path) -> None:
    source = audio_file(tmp_path, "song", seconds=0.5)
    location = {
        "unreachable": f"ducklake:postgres:dbname=lake host=127.0.0.1 port={free_port()} user=postgres",
        "malformed": "ducklake:postgres:dbname=lake host",
        "no data path": new_lake(postgres),
    }[problem]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMWORKS_CATALOG")}
    out = tmp_path / "out"
    done = stemworks("separate", str(source), "--out", str(out), "--catalog", location, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    says = {"unreachable": "Connection refused", "malformed": "key=value", "no data path": "--catalog-data-path"}
    assert says[problem] in done.stderr and "stemworks: error: --catalog" in done.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing processed


def test_a_file_catalog_refuses_a_data_path(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="for DuckLake catalogs"):
        open_catalog(tmp_path / "c.duckdb", str(tmp_path / "data"))


def test_a_writer_retries_a_conflicting_transaction(postgres: PostgresServer, tmp_path: Path) -> None:
    """Two catalogs finishing runs at the same moment conflict in DuckLake; the loser runs again and lands."""
    location = new_lake(postgres)
    first, second = open_catalog(location, str(tmp_path / "d")), open_catalog(location)
    assert isinstance(first, DuckLakeCatalog) and isinstance(second, DuckLakeCatalog)
    first.start_run(make_run("run-1"))
    second.start_run(make_run("run-2"))
    calls = {"n": 0}

    def racing(con: duckdb.DuckDBPyConnection) -> None:
        calls["n"] += 1
        con.execute("UPDATE runs SET device = 'cuda' WHERE run_id = 'run-2'")
        if calls["n"] == 1:  # another process commits an update to the same table meanwhile
            first._write(lambda other: other.execute("UPDATE runs SET device = 'mps' WHERE run_id = 'run-1'"))

    second._write(racing)
    assert calls["n"] == 2 and second.retries == 1
    assert second.query("SELECT run_id, device FROM runs ORDER BY run_id")[1] == [("run-1", "mps"), ("run-2", "cuda")]
