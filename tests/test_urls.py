"""URL sources end to end: a real HTTP server on 127.0.0.1, pages driven through yt-dlp, the SSRF policy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import pytest

from tasks import prefect_tasks as steps
from tasks.core.settings import Limits, OutputSettings, SeparationSettings
from tasks.io.sources import expand_sources
from tasks.io.web.policy import NetworkPolicy, UnsafeURLError, check_scheme
from tasks.io.web.urls import _check_before_download
from tests.helpers.audiogen import audio_file
from tests.helpers.cli import stemworks
from tests.helpers.constants import MODEL_NAME
from tests.helpers.flows import library_run
from tests.helpers.servers import MediaServer, Route, self_signed_certificate

ROOT = Path(__file__).resolve().parents[1]
STEMS = {"drums", "bass", "other", "vocals"}
EVIL_TITLE = "../../etc/passwd\x07 CON: Live/Take 2"
MiB = 1 << 20


def page(title: str, *media: str) -> bytes:
    tags = "".join(f'<audio controls src="{m}"></audio>' for m in media)
    return f"<html><head><title>{title}</title></head><body>{tags}</body></html>".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    song = audio_file(folder, "song.mp3", "mp3", seconds=1.5, seed=3).read_bytes()
    other = audio_file(folder, "other.mp3", "mp3", seconds=1.2, seed=4).read_bytes()
    srv = MediaServer()
    big = os.urandom(64 * MiB)  # far beyond what loopback socket buffers can hold in flight
    srv.routes.update(
        {
            "/song.mp3": Route(body=song, content_type="audio/mpeg"),
            "/watch": Route(body=page(EVIL_TITLE, "/media/clip.mp3"), content_type="text/html"),
            "/media/clip.mp3": Route(body=other, content_type="audio/mpeg"),
            "/playlist": Route(
                body=page("Mixtape", "/song.mp3", "/media/clip.mp3", "/flaky.mp3"), content_type="text/html"
            ),
            "/big.wav": Route(body=big, content_type="audio/wav"),
            "/big-unsized.wav": Route(body=big, content_type="audio/wav", send_length=False),
            "/notaudio.mp3": Route(body=b"<html>login page</html>", content_type="text/html"),
            "/garbage.mp3": Route(body=os.urandom(4096), content_type="application/octet-stream"),
            "/text-page": Route(
                body=b"<html><head><title>Nothing</title></head><body>hi</body></html>", content_type="text/html"
            ),
            "/to-metadata.mp3": Route(
                status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/x.mp3"}
            ),
            "/to-loopback.mp3": Route(status=302, headers={"Location": f"http://127.0.0.2:{srv.port}/song.mp3"}),
            "/to-file.mp3": Route(status=302, headers={"Location": "file:///etc/passwd"}),
            "/page-to-metadata": Route(status=301, headers={"Location": "http://169.254.169.254/latest/"}),
            "/flaky.mp3": Route(body=song, content_type="audio/mpeg", failures_first=2),
        }
    )
    yield srv
    srv.close()


def run(sources: list[str], out: Path, catalog: Path, model_repo: Path, **limits) -> object:
    return library_run(
        sources,
        separation=SeparationSettings(model=MODEL_NAME, model_repo=str(model_repo), shifts=0),
        output=OutputSettings(out=str(out)),
        limits=Limits(**limits),
        catalog=str(catalog),
    )


def origins(catalog: Path) -> dict[str, dict]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return {src: json.loads(origin) for src, origin in con.execute("SELECT source, origin FROM tracks").fetchall()}


@pytest.fixture
def private_ok(monkeypatch):
    monkeypatch.setenv("STEMWORKS_ALLOW_PRIVATE_URLS", "1")


@pytest.fixture
def only_test_server(monkeypatch):
    """Trust 127.0.0.1 alone (as an operator would trust one internal host): everything else is refused."""
    monkeypatch.delenv("STEMWORKS_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("STEMWORKS_ALLOWED_NETWORKS", "127.0.0.1/32")


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(steps, "fetch", steps.fetch.with_options(retry_delay_seconds=[0.2, 0.2, 0.2]))


# -- policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not a public"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_internal_addresses_are_refused_by_default(address: str, kind: str) -> None:
    problem = NetworkPolicy().address_problem(address)
    assert problem is not None and kind in problem


def test_public_addresses_pass_and_settings_open_only_what_they_say() -> None:
    assert NetworkPolicy().address_problem("93.184.216.34") is None
    assert NetworkPolicy().address_problem("2606:4700::1111") is None
    assert NetworkPolicy.from_env({"STEMWORKS_ALLOW_PRIVATE_URLS": "1"}).address_problem("10.0.0.1") is None
    narrow = NetworkPolicy.from_env({"STEMWORKS_ALLOWED_NETWORKS": "127.0.0.1/32, 10.9.0.0/16"})
    assert narrow.address_problem("127.0.0.1") is None and narrow.address_problem("10.9.3.4") is None
    assert narrow.address_problem("127.0.0.2") is not None and narrow.address_problem("169.254.169.254") is not None


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.mp3", "data:audio/wav;base64,AAAA", "gopher://x/", "/etc/passwd"]
)
def test_only_http_and_https_are_url_schemes(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="not allowed"):
        check_scheme(url)


def test_live_streams_and_over_long_media_are_refused_before_download() -> None:
    limits = Limits(max_seconds=600, max_file_bytes=MiB)
    with pytest.raises(Exception, match="live streams are not supported"):
        _check_before_download({"live_status": "is_live"}, limits, "u")
    with pytest.raises(Exception, match="duration 3600 s is over the limit of 600 s"):
        _check_before_download({"duration": 3600}, limits, "u")
    with pytest.raises(Exception, match=r"reported size .* over the limit"):
        _check_before_download({"filesize_approx": 5 * MiB}, limits, "u")
    with pytest.raises(Exception, match="no audio"):
        _check_before_download({"vcodec": "avc1", "acodec": "none"}, limits, "u")


def test_playlist_expands_to_its_entries_up_to_the_maximum(server, only_test_server) -> None:
    expanded = expand_sources([server.url("/playlist")], max_playlist_entries=2)
    assert expanded.tracks == [server.url("/song.mp3"), server.url("/media/clip.mp3")]
    assert expand_sources([server.url("/song.mp3")]).tracks == [server.url("/song.mp3")]


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url_run(tmp_path_factory, server, model_repo, prefect_harness):
    root = tmp_path_factory.mktemp("urlrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEMWORKS_ALLOW_PRIVATE_URLS", "1")
        summary = run([server.url("/watch"), server.url("/song.mp3")], root / "out", root / "c.duckdb", model_repo)
    return {"summary": summary, "out": root / "out", "catalog": root / "c.duckdb", "root": root}


@pytest.mark.prefect_server
def test_page_and_direct_link_are_separated_with_origin_recorded(url_run, server) -> None:
    summary = url_run["summary"]
    assert [t.status for t in summary.tracks] == ["succeeded", "succeeded"], summary.tracks
    for track in summary.tracks:
        manifest = json.loads(Path(track.manifest_uri).read_text())
        assert {s["stem"] for s in manifest["stems"]} == STEMS
        assert all(
            (Path(track.manifest_uri).parent / s["file"]).stat().st_size == s["bytes"] for s in manifest["stems"]
        )
    recorded = origins(url_run["catalog"])
    page_origin = recorded[server.url("/watch")]
    assert page_origin["url"] == server.url("/watch") and page_origin["webpage_url"] == server.url("/watch")
    assert page_origin["extractor"] == "HTML5MediaEmbed" and page_origin["title"].startswith(EVIL_TITLE[:15])
    assert set(page_origin) == {"url", "extractor", "title", "uploader", "upload_date", "webpage_url"}
    assert recorded[server.url("/song.mp3")]["extractor"] == "direct"
    manifest = json.loads(Path(summary.tracks[0].manifest_uri).read_text())
    assert manifest["origin"] == page_origin


@pytest.mark.prefect_server
def test_titles_never_become_paths_unescaped(url_run) -> None:
    out = url_run["out"]
    folders = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 2 and all(p.parent == out for p in folders)
    titled = next(p for p in folders if "passwd" in p.name)
    assert ".." not in titled.name and "/" not in titled.name and "\x07" not in titled.name
    assert not titled.name.lower().startswith("con")
    assert not (url_run["root"] / "etc").exists()


@pytest.mark.prefect_server
def test_rerun_of_urls_skips(url_run, server, model_repo, private_ok) -> None:
    summary = run([server.url("/watch"), server.url("/song.mp3")], url_run["out"], url_run["catalog"], model_repo)
    assert [t.status for t in summary.tracks] == ["skipped", "skipped"]


@pytest.mark.slow
@pytest.mark.prefect_server
def test_loopback_url_is_refused_by_default(server, model_repo, tmp_path, prefect_harness, monkeypatch) -> None:
    monkeypatch.delenv("STEMWORKS_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("STEMWORKS_ALLOWED_NETWORKS", raising=False)
    before = dict(server.hits)
    summary = run([server.url("/song.mp3"), server.url("/watch")], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
    for track in summary.tracks:
        assert track.status == "failed" and track.error_step == "fetch"
        assert "127.0.0.1 is a loopback address" in track.error and "STEMWORKS_ALLOW_PRIVATE_URLS=1" in track.error
    assert server.hits == before  # not one request reached the server
    assert not (tmp_path / "out").exists()


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness", "only_test_server")
@pytest.mark.parametrize(
    "path, message",
    [
        ("/to-metadata.mp3", "169.254.169.254 is a link-local address"),
        ("/to-loopback.mp3", "127.0.0.2 is a loopback address"),
        ("/page-to-metadata", "169.254.169.254 is a link-local address"),
        ("/to-file.mp3", "scheme 'file' is not allowed"),
    ],
)
def test_redirects_to_internal_addresses_are_refused(server, model_repo, tmp_path, path, message) -> None:
    hits = server.hits.get(path, 0)
    summary = run([server.url(path)], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
    (track,) = summary.tracks
    assert track.status == "failed" and track.error_step == "fetch" and message in track.error
    assert server.hits[path] - hits <= 2  # refused, not retried (at most expansion + fetch)


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness", "private_ok")
@pytest.mark.parametrize(
    "path, message, step",
    [
        ("/missing.mp3", "HTTP 404 Not Found", "fetch"),
        ("/notaudio.mp3", "not audio: the server sent text/html", "validate"),
        ("/text-page", "no audio or video found at this URL", "fetch"),
        ("/garbage.mp3", "not readable as audio", "validate"),
    ],
)
def test_bad_urls_fail_alone_with_clear_reasons(server, model_repo, tmp_path, path, message, step) -> None:
    summary = run([server.url(path), server.url("/song.mp3")], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
    bad, good = summary.tracks
    assert bad.status == "failed" and message in bad.error and bad.error_step == step, bad
    assert good.status == "succeeded"


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness", "private_ok")
@pytest.mark.parametrize("path", ["/big.wav", "/big-unsized.wav"])
def test_over_size_downloads_are_aborted_early(server, model_repo, tmp_path, path) -> None:
    summary = run([server.url(path)], tmp_path / "out", tmp_path / "c.duckdb", model_repo, max_file_bytes=MiB)
    (track,) = summary.tracks
    assert track.status == "failed" and "over the limit of 1048576 bytes" in track.error
    assert server.sent.get(path, 0) < 32 * MiB  # the 64 MiB body was never fully sent
    assert not any((tmp_path / "work").rglob("source*"))


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness", "private_ok", "fast_retries")
def test_transient_http_errors_are_retried(server, model_repo, tmp_path) -> None:
    summary = run([server.url("/flaky.mp3")], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
    assert summary.tracks[0].status == "succeeded" and server.hits["/flaky.mp3"] == 3


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness")
def test_https_goes_through_the_same_checks(server, model_repo, tmp_path, monkeypatch) -> None:
    """HTTPS is tunnelled (CONNECT) through the egress proxy: certificates verified, addresses checked."""
    cert, key = self_signed_certificate(tmp_path)
    tls = MediaServer(tls=(cert, key))
    tls.routes.update({"/watch": server.routes["/watch"], "/media/clip.mp3": server.routes["/media/clip.mp3"]})
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    try:
        monkeypatch.delenv("STEMWORKS_ALLOW_PRIVATE_URLS", raising=False)
        refused = run([tls.url("/watch")], tmp_path / "out", tmp_path / "c.duckdb", model_repo)
        assert refused.tracks[0].status == "failed" and "loopback address" in refused.tracks[0].error
        assert tls.hits == {}
        monkeypatch.setenv("STEMWORKS_ALLOW_PRIVATE_URLS", "1")
        # Direct links trust SSL_CERT_FILE; yt-dlp trusts only certifi's bundle, so the page fails verification.
        summary = run(
            [tls.url("/media/clip.mp3"), tls.url("/watch")], tmp_path / "out", tmp_path / "c.duckdb", model_repo
        )
        direct, page_track = summary.tracks
        assert direct.status == "succeeded", summary.tracks
        assert page_track.status == "failed" and "certificate verify failed" in page_track.error
    finally:
        tls.close()


# -- the command line, as the "done when" states it --------------------------------------


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    inherited = {k: v for k, v in os.environ.items() if not k.startswith("STEMWORKS_ALLOW")}
    full_env = {**inherited, "PREFECT_API_URL": PREFECT_API_URL.value(), **env}
    return stemworks("separate", *args, env=full_env)


@pytest.mark.slow
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_harness")
def test_cli_refuses_loopback_by_default_and_allows_it_when_told(server, model_repo, tmp_path) -> None:
    args = [
        server.url("/song.mp3"),
        "--out",
        str(tmp_path / "out"),
        "--catalog",
        str(tmp_path / "c.duckdb"),
        "--model",
        MODEL_NAME,
        "--model-repo",
        str(model_repo),
        "--shifts",
        "0",
    ]
    refused = cli(args, {})
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "127.0.0.1 is a loopback address" in refused.stdout and "STEMWORKS_ALLOW_PRIVATE_URLS=1" in refused.stdout
    allowed = cli(args, {"STEMWORKS_ALLOW_PRIVATE_URLS": "1"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "1 succeeded" in allowed.stdout
    assert len(list((tmp_path / "out").glob("song-*/manifest.json"))) == 1
