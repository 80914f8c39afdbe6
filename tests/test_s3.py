"""S3 as source and destination, against moto's standalone S3 server on 127.0.0.1 (a real HTTP server
in its own process). The client reaches it through a relay that tests can take down, as an outage would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import boto3
import duckdb
import pytest

from tasks import prefect_tasks as steps
from tasks.core.errors import PublishError
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.io.claims import CLAIMS_DIR
from tasks.io.manifest import MANIFEST_NAME as MANIFEST
from tasks.steps.publish import publish
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME
from tests.helpers.flows import library_run
from tests.helpers.manifests import manifest_for
from tests.helpers.servers import MotoServer, Relay, clear_s3fs_cache, in_thread, s3_env

ROOT = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-K7MDENG-stemworks-SECRET"
STEMS = {"drums", "bass", "other", "vocals"}
SOURCES = "label-archive"
OUT = "label-stems"

pytestmark = [pytest.mark.s3, pytest.mark.slow]  # moto runs as a process of its own


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """moto server + relay, the AWS environment pointing at the relay, and a library of masters."""
    root = tmp_path_factory.mktemp("s3")
    moto = MotoServer(root / "moto.log").start()
    relay = Relay(moto.port)
    relay.up()
    client = boto3.client(
        "s3", endpoint_url=moto.endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    )
    client.create_bucket(Bucket=SOURCES)
    client.create_bucket(Bucket=OUT)
    local = root / "masters"
    for name, kind, seconds, seed in [
        ("a/one.wav", "wav", 1.5, 1),
        ("a/b/two.flac", "flac", 1.2, 2),
        ("three.mp3", "mp3", 1.3, 3),
    ]:
        path = audio_file(local / Path(name).parent, Path(name).name, kind, seconds=seconds, seed=seed)
        client.upload_file(str(path), SOURCES, f"masters/{name}")
    client.put_object(Bucket=SOURCES, Key="masters/cover.jpg", Body=b"\xff\xd8 not audio")
    client.put_object(Bucket=SOURCES, Key="masters/.hidden/x.wav", Body=b"junk")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_env(relay.endpoint, SECRET).items():
            mp.setenv(key, value)
        clear_s3fs_cache()
        yield {"moto": moto, "relay": relay, "client": client, "local": local, "root": root}
        clear_s3fs_cache()
    relay.down()
    moto.stop()


def run(sources: list[str], out: str, catalog: Path, model_repo: Path) -> object:
    return library_run(
        sources,
        separation=SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        output=OutputSettings(out=out),
        limits=Limits(),
        catalog=str(catalog),
    )


def objects(client, prefix: str) -> dict[str, tuple[int, str]]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=OUT, Prefix=prefix)
    return {o["Key"]: (o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])}


def assert_manifests_complete(client, prefix: str) -> int:
    """Every manifest under prefix lists only stems that exist with the listed size; returns how many."""
    found = objects(client, prefix)
    manifests = [key for key in found if key.endswith(MANIFEST)]
    for key in manifests:
        manifest = json.loads(client.get_object(Bucket=OUT, Key=key)["Body"].read())
        folder = key.rsplit("/", 1)[0]
        assert {s["stem"] for s in manifest["stems"]} == STEMS
        for stem in manifest["stems"]:
            assert found.get(f"{folder}/{stem['file']}", (None,))[0] == stem["bytes"], (key, stem["file"])
    return len(manifests)


def catalog_text(catalog: Path) -> str:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return "\n".join(str(con.execute(f"SELECT * FROM {table}").fetchall()) for table in ("runs", "tracks", "stems"))


@pytest.fixture(scope="module")
def s3_run(store, model_repo, prefect_harness):
    catalog = store["root"] / "catalog.duckdb"
    summary = run([f"s3://{SOURCES}/masters/"], f"s3://{OUT}/lib", catalog, model_repo)
    return {"summary": summary, "catalog": catalog}


@pytest.mark.prefect_server
def test_library_from_s3_to_s3(store, s3_run) -> None:
    summary = s3_run["summary"]
    assert sorted(t.source for t in summary.tracks) == sorted(
        f"s3://{SOURCES}/masters/{n}" for n in ("a/one.wav", "a/b/two.flac", "three.mp3")
    )
    assert {t.status for t in summary.tracks} == {"succeeded"}, summary.tracks
    assert assert_manifests_complete(store["client"], "lib/") == 3
    assert all(t.manifest_uri.startswith(f"s3://{OUT}/lib/") for t in summary.tracks)
    with duckdb.connect(str(s3_run["catalog"]), read_only=True) as con:
        uris = [u for (u,) in con.execute("SELECT uri FROM stems").fetchall()]
    assert len(uris) == 12 and all(u.startswith(f"s3://{OUT}/lib/") for u in uris)
    keys = set(objects(store["client"], "lib/"))
    assert {f"s3://{OUT}/{k}" for k in keys} == {*uris, *(t.manifest_uri for t in summary.tracks)}


@pytest.mark.prefect_server
def test_rerun_skips_and_writes_nothing(store, s3_run, model_repo) -> None:
    before = objects(store["client"], "lib/")
    summary = run([f"s3://{SOURCES}/masters/"], f"s3://{OUT}/lib", s3_run["catalog"], model_repo)
    assert [t.status for t in summary.tracks] == ["skipped"] * 3
    assert objects(store["client"], "lib/") == before


@pytest.mark.prefect_server
def test_mixed_local_and_s3_sources_and_skips_across_stores(store, s3_run, model_repo) -> None:
    """A local copy of an S3 master is recognised by content; a new local file, an S3 glob and a single
    S3 object are handled in one run; a missing object fails alone with its reason."""
    new = audio_file(store["root"] / "local", "new.wav", "wav", seconds=1.1, seed=9)
    copy = store["local"] / "a" / "one.wav"  # same bytes as s3://.../masters/a/one.wav, already published
    summary = run(
        [
            str(new),
            str(copy),
            f"s3://{SOURCES}/masters/*.mp3",
            f"s3://{SOURCES}/masters/a/b/two.flac",
            f"s3://{SOURCES}/masters/nope.wav",
        ],
        f"s3://{OUT}/lib",
        s3_run["catalog"],
        model_repo,
    )
    statuses = {Path(t.source).name: t.status for t in summary.tracks}
    assert statuses == {
        "new.wav": "succeeded",
        "one.wav": "skipped",
        "three.mp3": "skipped",
        "two.flac": "skipped",
        "nope.wav": "failed",
    }
    missing = next(t for t in summary.tracks if t.status == "failed")
    assert missing.error == "no such file or folder" and missing.error_step == "expand"
    assert assert_manifests_complete(store["client"], "lib/") == 4


@pytest.mark.prefect_server
def test_no_secret_in_catalog_manifests_or_logs(store, s3_run, caplog, capsys) -> None:
    assert SECRET not in catalog_text(s3_run["catalog"])
    assert "AKIASTEMWORKSTEST" not in catalog_text(s3_run["catalog"])
    client = store["client"]
    for key in objects(client, "lib/"):
        if key.endswith(MANIFEST):
            assert SECRET not in client.get_object(Bucket=OUT, Key=key)["Body"].read().decode()
    assert SECRET not in caplog.text and SECRET not in "".join(capsys.readouterr())


def test_failed_publish_aborts_multipart_uploads_and_leaves_no_manifest(store, tmp_path) -> None:
    client, folder = store["client"], "aborts/track-0123456789ab"
    client.create_multipart_upload(Bucket=OUT, Key=f"{folder}/drums.wav")  # an attempt that died mid-upload
    good = tmp_path / "drums.wav"
    good.write_bytes(b"RIFF" + bytes(1000))
    files = {"drums": good, "bass": tmp_path / "bass.wav"}  # bass.wav is missing: the upload fails midway
    manifest = manifest_for(files, size_of=1004)
    with pytest.raises(PublishError, match="failed"):
        publish(out=f"s3://{OUT}/aborts", folder="track-0123456789ab", manifest=manifest, files=files)
    assert client.list_multipart_uploads(Bucket=OUT, Prefix=f"{folder}/").get("Uploads", []) == []
    assert objects(client, f"{folder}/") == {}  # neither a manifest nor the stem it would have listed


CLAIM = rf"{re.escape(CLAIMS_DIR)}/\w+\.json"  # a job claim, taken right before separating
ENDS = {"manifest": re.escape(MANIFEST), "stem": r"\.wav", "claim": CLAIM}


@pytest.mark.prefect_server
@pytest.mark.parametrize(
    "trigger, back_after",
    [
        ("manifest", None),  # down between tracks: the next tracks cannot even check the destination
        ("stem", None),  # down in the middle of a publish: retried with backoff, then the track fails
        ("stem", 1.5),  # a short blip in the middle of a publish: retries ride it out
        ("claim", 5.0),  # down as the first track takes its claim, past the S3 client's own retries: ridden out
    ],
)
def test_store_outage_mid_run_fails_cleanly_and_rerun_completes(
    store, model_repo, tmp_path, monkeypatch, prefect_harness, trigger, back_after
) -> None:
    monkeypatch.setattr(steps, "publish", steps.publish.with_options(retry_delay_seconds=[0.5, 1, 1]))
    monkeypatch.setattr(steps, "IO_RETRY_DELAYS_S", [1, 3, 6])  # the store calls between steps
    sources = [str(audio_file(tmp_path / "in", f"t{i}.wav", "wav", seconds=1.0, seed=20 + i)) for i in range(3)]
    relay, client, catalog = store["relay"], store["client"], tmp_path / "c.duckdb"
    prefix = f"outage-{tmp_path.name}/"

    # The relay cuts at the first claim, the first stem upload (mid-publish) or right after the first manifest
    # is stored (between tracks): the same request every run, however fast the uploads are.
    target = rf"^PUT /{OUT}/{re.escape(prefix)}\S*{ENDS[trigger]}[ ?]".encode()
    tripped = relay.down_on(target, after_reply=trigger == "manifest")

    def outage() -> None:
        tripped.wait()
        if back_after is not None:
            time.sleep(back_after)
            relay.up()

    watcher = in_thread(outage)
    try:
        with pytest.MonkeyPatch.context() as env:  # undone before the cache is cleared: later tests retry as usual
            if trigger == "claim":
                env.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore alone would ride out a short outage
                clear_s3fs_cache()
            first = run(sources, f"s3://{OUT}/{prefix}", catalog, model_repo)
    finally:
        went_down = tripped.is_set()
        relay.disarm()
        tripped.set()  # releases the watcher when nothing matched
        watcher.join(timeout=60)
        relay.up()
        clear_s3fs_cache()
    assert went_down, f"no request matched {target!r}"
    statuses = [t.status for t in first.tracks]
    if back_after is None:
        assert statuses[0] == ("succeeded" if trigger == "manifest" else "failed") and "failed" in statuses[1:]
    else:
        assert statuses == ["succeeded"] * 3, first.tracks
    for track in (t for t in first.tracks if t.status == "failed"):
        assert "Could not connect to the endpoint URL" in track.error and SECRET not in track.error
        # A track meets the outage in whichever store call it is making: checking its destination or
        # publishing (step publish), or taking its job claim right before separating (step separate).
        assert track.error_step == "publish" or (track.error_step == "separate" and "job claim" in track.error)
    if trigger == "stem" and back_after is None:
        assert first.tracks[0].error_step == "publish"
    assert assert_manifests_complete(client, prefix) == statuses.count("succeeded")
    assert client.list_multipart_uploads(Bucket=OUT, Prefix=prefix).get("Uploads", []) == []

    second = run(sources, f"s3://{OUT}/{prefix}", catalog, model_repo)
    assert [t.status for t in second.tracks] == ["skipped" if s == "succeeded" else "succeeded" for s in statuses]
    assert assert_manifests_complete(client, prefix) == 3


def cli(args: list[str], store) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        **s3_env(store["moto"].endpoint, SECRET),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    return stemworks("separate", *args, env=env)


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness")
def test_cli_separates_a_bucket_into_a_bucket_and_rerun_skips(store, model_repo, tmp_path) -> None:
    args = [
        f"s3://{SOURCES}/masters/",
        "--out",
        f"s3://{OUT}/cli/",
        "--catalog",
        str(tmp_path / "c.duckdb"),
        "--model",
        MODEL_NAME,
        "--model-repo",
        str(model_repo),
        "--shifts",
        "0",
    ]
    first = cli(args, store)
    assert first.returncode == 0 and "3 succeeded, 0 skipped, 0 failed" in first.stdout, first.stdout + first.stderr
    assert assert_manifests_complete(store["client"], "cli/") == 3
    second = cli(args, store)
    assert second.returncode == 0 and "0 succeeded, 3 skipped, 0 failed" in second.stdout, second.stdout
    assert SECRET not in first.stdout + first.stderr + second.stdout + second.stderr
    assert SECRET not in catalog_text(tmp_path / "c.duckdb")
