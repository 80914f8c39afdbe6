"""File names that are not UTF-8 (any byte string is a file name on Linux): processed, shown escaped,
recorded with their exact bytes; and `catalog rebuild` skips, with the reason, a manifest it cannot use.

Real files with such names, real DuckDB catalogs, real manifests on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog
from catalog.rebuild import rebuild
from tasks.core.settings import Limits
from tasks.io.manifest import Manifest, read_manifest
from tasks.io.sources import expand_sources
from tasks.steps.fetch import fetch
from tests.helpers.audiogen import audio_file
from tests.helpers.manifests import manifest_for
from tests.helpers.records import make_failed, make_run, make_succeeded

NAME = b"caf\xe9 \xff.wav"  # Latin-1 é and a byte that is never UTF-8
SHOWN = "caf\\xe9 \\xff.wav"


def odd_path(folder: Path) -> tuple[str, bytes]:
    """A real audio file named NAME in `folder`: its path as Python holds it (surrogate escapes), and its bytes."""
    song = audio_file(folder, "song.wav", seconds=0.3)
    raw = os.path.join(os.fsencode(folder), NAME)
    os.rename(song, raw)
    return os.fsdecode(raw), raw


def test_a_name_that_is_not_utf8_is_fetched_shown_escaped_and_kept_exactly(tmp_path: Path) -> None:
    path, raw = odd_path(tmp_path / "music")
    assert expand_sources([str(tmp_path / "music")]).tracks == [path]
    fetched = fetch(path, tmp_path, Limits())
    assert fetched.source == f"{tmp_path}/music/{SHOWN}"
    assert fetched.origin == {"path_bytes_hex": raw.hex()}
    assert bytes.fromhex(fetched.origin["path_bytes_hex"] or "") == raw
    # The manifest publishing writes from it is valid UTF-8 JSON that reads back, origin included.
    manifest = manifest_for({}).model_copy(update={"source": fetched.source, "origin": fetched.origin})
    text = manifest.to_bytes().decode("utf-8")
    assert Manifest.model_validate_json(text) == manifest


def test_a_name_that_is_not_utf8_is_recorded(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.start_run(make_run("run-1", sources=[os.fsdecode(b"/music/" + NAME)]))
    raw = b"/music/" + NAME
    catalog.record_track("run-1", make_succeeded("one", source=os.fsdecode(raw)))
    failed = make_failed("two").model_copy(
        update={"source": os.fsdecode(raw), "error": f"cannot read {os.fsdecode(raw)}: Permission denied"}
    )
    catalog.record_track("run-1", failed)
    with duckdb.connect(str(catalog.path), read_only=True) as con:
        rows = con.execute("SELECT source, origin, error FROM tracks ORDER BY status DESC").fetchall()
        sources = con.execute("SELECT sources FROM runs").fetchone()
    assert [row[0] for row in rows] == [f"/music/{SHOWN}"] * 2
    assert all(json.loads(row[1])["path_bytes_hex"] == raw.hex() for row in rows)
    assert rows[1][2] == f"cannot read /music/{SHOWN}: Permission denied"
    assert sources is not None and json.loads(sources[0]) == [f"/music/{SHOWN}"]


def publish_fake_track(out: Path, folder: str, **changes: object) -> Path:
    """A track folder with one stem file and a complete manifest (with `changes`) written last."""
    stem = out / folder / "drums.wav"
    stem.parent.mkdir(parents=True)
    stem.write_bytes(b"RIFF" + bytes(100))
    manifest = manifest_for({"drums": stem}, key=folder.ljust(64, "0")[:64]).model_copy(update=changes)
    (out / folder / "manifest.json").write_bytes(manifest.to_bytes())
    return out / folder / "manifest.json"


def test_rebuild_skips_what_it_cannot_use_and_leaves_no_partial_file(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "catalog.duckdb"
    good = publish_fake_track(out, "aaaa", source=f"/music/{SHOWN}", origin={"path_bytes_hex": NAME.hex()})
    not_json = publish_fake_track(out, "bbbb")
    not_json.write_bytes(b"{ this is not json \xff")
    # What earlier versions wrote for such a name: a lone surrogate escape, which no JSON reader accepts.
    old_style = publish_fake_track(out, "cccc")
    data = json.loads(old_style.read_text())
    old_style.write_text(json.dumps({**data, "source": os.fsdecode(b"/music/" + NAME)}))
    refused = publish_fake_track(out, "dddd", content_sha256="not a sha-256")  # the catalog's checks refuse it

    report = rebuild(str(out), path)

    assert (report.runs, report.tracks) == (1, 1)
    skipped = dict(report.skipped)
    assert set(skipped) == {str(not_json), str(old_style), str(refused)}
    assert "ValidationError" in skipped[str(not_json)] and "surrogate" in skipped[str(old_style)]
    assert "content_sha256" in skipped[str(refused)]
    assert not Path(f"{path}.rebuilding").exists() and path.exists()
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT source, origin, manifest_uri FROM tracks").fetchone()
        runs = con.execute("SELECT tracks_total, tracks_succeeded FROM runs").fetchone()
    assert row is not None and row[0] == f"/music/{SHOWN}" and row[2] == str(good)
    assert json.loads(row[1]) == {"path_bytes_hex": NAME.hex()}
    assert runs == (1, 1)  # the run counts the tracks recorded, not the manifests read
    assert read_manifest(str(good)).origin == {"path_bytes_hex": NAME.hex()}


def test_a_rebuild_that_fails_leaves_no_partial_file(tmp_path: Path) -> None:
    out, path = tmp_path / "out", tmp_path / "catalog.duckdb"
    publish_fake_track(out, "aaaa")
    blocker = Path(f"{path}.rebuilding.wal")
    blocker.mkdir()  # DuckDB cannot use a WAL that is a folder: the new catalog cannot be written
    with pytest.raises(duckdb.Error, match="Is a directory"):  # DuckDB's own error, not one from the clean-up
        rebuild(str(out), path)
    assert not Path(f"{path}.rebuilding").exists() and not Path(f"{path}.rebuilding.lock").exists()
    assert not path.exists()
