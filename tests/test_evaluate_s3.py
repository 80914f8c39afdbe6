"""`stemworks evaluate` on a dataset in an object store: moto's standalone S3 server on 127.0.0.1 (a real HTTP
server in its own process), a real CLI process, a real Prefect API and the tiny random-weight HTDemucs."""

from __future__ import annotations

import os
import subprocess

import boto3
import duckdb
import numpy as np
import pytest

from tests.helpers.audiogen import REFERENCE_STEMS, music, reference_folder, write_audio
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME
from tests.helpers.servers import MotoServer, s3_env

BUCKET = "reference-sets"
SECRET = "wJalrXUtnFEMI-K7MDENG-stemworks-EVAL-SECRET"

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """moto with a bucket holding three reference folders (one good, one without vocals, one whose bass is
    1 s long against a 2 s mixture) and a hidden folder, which is skipped."""
    root = tmp_path_factory.mktemp("s3-evaluate")
    moto = MotoServer(root / "moto.log").start()
    client = boto3.client(
        "s3", endpoint_url=moto.endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    local = root / "sets"
    reference_folder(local / "Song A")
    reference_folder(local / "no vocals", skip="vocals")
    reference_folder(local / "short bass", bass={"seconds": 1.0})
    write_audio(local / ".trash" / "mixture.wav", music(0.5))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"sets/{path.relative_to(local).as_posix()}")
    yield moto
    moto.stop()


def evaluate(store: MotoServer, *args: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, **s3_env(store.endpoint, SECRET), "PREFECT_API_URL": PREFECT_API_URL.value()}
    return stemworks("evaluate", *args, env=env)


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness")
def test_a_dataset_in_a_bucket_is_scored_and_its_bad_items_fail_alone(store, model_repo, tmp_path) -> None:
    out, catalog, work = tmp_path / "stems", tmp_path / "catalog.duckdb", tmp_path / "work"
    result = evaluate(
        store,
        f"s3://{BUCKET}/sets",
        *("--model", MODEL_NAME, "--model-repo", str(model_repo), "--shifts", "0"),
        *("--out", str(out), "--catalog", str(catalog), "--work-dir", str(work)),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 evaluated, 2 failed" in result.stdout
    # A reference missing from the listing fails before separation; a mismatched one when it is fetched for
    # scoring. Both name the object's URL.
    assert (
        f"FAILED sets/no vocals: no reference for stem 'vocals': expected s3://{BUCKET}/sets/no vocals/vocals.<"
        in result.stdout
    )
    assert f"FAILED sets/short bass: reference 'bass' (s3://{BUCKET}/sets/short bass/bass.wav) is 1.000 s long" in (
        result.stdout
    )
    assert result.stdout.count("(stage: references)") == 2
    with duckdb.connect(str(catalog), read_only=True) as con:
        rows = con.execute("SELECT item, stem, sdr, nsdr FROM evaluations ORDER BY stem").fetchall()
        sources = con.execute("SELECT source, status FROM tracks ORDER BY source").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("sets/Song A", s) for s in sorted(REFERENCE_STEMS)]
    assert all(np.isfinite(r[2]) and np.isfinite(r[3]) for r in rows)
    # "short bass" has the same mixture as "Song A" (the same synthetic parts): separated once, for "Song A",
    # and its stems scored against the short bass reference, which is how its mismatch was found.
    assert (f"s3://{BUCKET}/sets/Song A/mixture.wav", "succeeded") in sources
    assert (f"s3://{BUCKET}/sets/short bass/mixture.wav", "skipped") in sources
    assert not [p for p in work.rglob("*") if p.is_file()], "the fetched references are removed after scoring"
    assert SECRET not in result.stdout + result.stderr


def test_a_prefix_with_nothing_under_it_exits_two(store, model_repo) -> None:
    result = evaluate(store, f"s3://{BUCKET}/nothing", "--model", MODEL_NAME, "--model-repo", str(model_repo))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no recognisable items in s3://{BUCKET}/nothing" in result.stderr
    assert "no such object or prefix" in result.stderr and "accepted layouts:" in result.stderr
