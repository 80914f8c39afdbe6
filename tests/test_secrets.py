"""Credentials in source URLs never leave the fetch: not upstream in `Host`, not in Prefect's stored
parameters or logs, not in the catalog, manifests or terminal. A real CLI run against a loopback server."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import duckdb
import pytest

from tasks.io.locations import has_secret, redact
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME
from tests.helpers.servers import MediaServer, Route

PASSWORD = "pw-" + uuid.uuid4().hex[:8]
SIGNATURE = "sig-" + uuid.uuid4().hex[:8]


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://h/a.mp3?X-Amz-Signature=abc&X-Amz-Credential=k", "https://h/a.mp3"),
        ("https://h/a.mp3?sv=1&sig=abc", "https://h/a.mp3"),
        ("https://h/a.mp3?password=x", "https://h/a.mp3"),
        ("https://u:p@h/a.mp3?x=1", "https://h/a.mp3?x=1"),
        ("https://h/watch?v=abc", "https://h/watch?v=abc"),
    ],
)
def test_redaction_drops_credentials_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert has_secret(url) is (url != shown)


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness")
def test_credentials_stay_out_of_headers_parameters_logs_catalog_and_manifests(
    tmp_path: Path, model_repo: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    song = audio_file(tmp_path / "media", "song.mp3", "mp3", seconds=1.0, seed=7).read_bytes()
    server = MediaServer()
    server.routes["/song.mp3"] = Route(body=song, content_type="audio/mpeg")
    try:
        url = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}/song.mp3?sig={SIGNATURE}&v=1"
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STEMWORKS_ALLOW")},
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "STEMWORKS_ALLOWED_NETWORKS": "127.0.0.1/32",
            "TMPDIR": str(scratch),
        }
        out, catalog = tmp_path / "out", tmp_path / "c.duckdb"
        args = [url, "--out", str(out), "--catalog", str(catalog), "--model", MODEL_NAME]
        result = stemworks("separate", *args, "--model-repo", str(model_repo), "--shifts", "0", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.close()

    secrets = (PASSWORD, SIGNATURE)
    [(path, headers)] = server.requests
    assert path == "/song.mp3"
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    assert headers["Authorization"] == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    def clean(text: str, where: str) -> None:
        for secret in secrets:
            assert secret not in text, f"a credential leaked into {where}"

    clean(result.stdout + result.stderr, "the terminal")
    with duckdb.connect(str(catalog), read_only=True) as con:
        for table in ("runs", "tracks", "stems"):
            clean(json.dumps(con.execute(f"SELECT * FROM {table}").fetchall(), default=str), f"catalog table {table}")
        [(flow_run_id,)] = con.execute("SELECT flow_run_id FROM runs").fetchall()
        [(sources,)] = con.execute("SELECT sources FROM runs").fetchall()
    assert json.loads(sources) == [f"http://127.0.0.1:{server.port}/song.mp3"]  # the list file's entry, redacted
    for manifest in out.glob("*/manifest.json"):
        clean(manifest.read_text(), "a manifest")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    clean(json.dumps(run.parameters, default=str), "Prefect's stored flow-run parameters")
    clean(" ".join(log.message for log in logs), "Prefect's logs")
    assert not list(scratch.glob("stemworks-sources-*")), "the private source list is removed after the run"
