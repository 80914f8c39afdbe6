"""Publication is atomic: a manifest only ever lists complete stems; crashes leave nothing half-visible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.io.locations import redact
from tasks.io.manifest import MANIFEST_NAME, STAGING_DIR, complete_manifest, manifest_uri
from tasks.io.sources import expand_sources
from tasks.steps.publish import publish, safe_name, track_folder
from tests.helpers.audiogen import music
from tests.helpers.manifests import KEY, manifest_for


def stem_files(tmp_path: Path, names=("drums", "bass")) -> dict[str, Path]:
    files = {}
    for i, name in enumerate(names):
        path = tmp_path / "work" / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.asarray(music(0.1, seed=i)).tobytes())
        files[name] = path
    return files


def published_manifest(out: str, folder: str, key: str) -> str | None:
    uri = manifest_uri(out, folder)
    return uri if complete_manifest(uri, key) is not None else None


def manifest_is_complete(uri: str, key: str) -> bool:
    return complete_manifest(uri, key) is not None


def test_publish_makes_folder_appear_complete(tmp_path: Path) -> None:
    files = stem_files(tmp_path)
    result = publish(out=str(tmp_path / "out"), folder="x-abababababab", manifest=manifest_for(files), files=files)
    folder = tmp_path / "out" / "x-abababababab"
    assert sorted(p.name for p in folder.iterdir()) == ["bass.wav", "drums.wav", MANIFEST_NAME]
    assert result.manifest_uri == str(folder / MANIFEST_NAME)
    assert published_manifest(str(tmp_path / "out"), "x-abababababab", KEY) == str(folder / MANIFEST_NAME)
    assert not list((tmp_path / "out" / STAGING_DIR).iterdir())


def test_crash_while_publishing_leaves_no_visible_folder(tmp_path: Path) -> None:
    files = stem_files(tmp_path)
    files["vocals"] = tmp_path / "work" / "vocals.wav"  # never written: copying it fails mid-publish
    manifest = manifest_for(
        {k: v for k, v in files.items() if v.exists()},
        extra_stems=({"stem": "vocals", "file": "vocals.wav", "sha256": "0" * 64, "bytes": 1, "seconds": 0.1},),
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever the failed copy raises; what counts is what is left
        publish(out=str(tmp_path / "out"), folder="x-abababababab", manifest=manifest, files=files)
    assert not (tmp_path / "out" / "x-abababababab").exists()
    assert published_manifest(str(tmp_path / "out"), "x-abababababab", KEY) is None


def test_incomplete_earlier_folder_is_replaced_whole(tmp_path: Path) -> None:
    stale = tmp_path / "out" / "x-abababababab"
    stale.mkdir(parents=True)
    (stale / "drums.wav").write_bytes(b"partial")
    files = stem_files(tmp_path)
    publish(out=str(tmp_path / "out"), folder="x-abababababab", manifest=manifest_for(files), files=files)
    assert (stale / "drums.wav").read_bytes() == files["drums"].read_bytes()
    assert manifest_is_complete(str(stale / MANIFEST_NAME), KEY)


@pytest.mark.parametrize("damage", ["delete_stem", "truncate_stem", "other_key", "garbage_manifest"])
def test_damaged_publication_is_not_trusted(tmp_path: Path, damage: str) -> None:
    files = stem_files(tmp_path)
    publish(out=str(tmp_path / "out"), folder="f", manifest=manifest_for(files), files=files)
    folder = tmp_path / "out" / "f"
    if damage == "delete_stem":
        (folder / "bass.wav").unlink()
    elif damage == "truncate_stem":
        (folder / "bass.wav").write_bytes(b"x")
    elif damage == "other_key":
        (folder / MANIFEST_NAME).write_bytes(manifest_for(files, key="cd" * 32).to_bytes())
    else:
        (folder / MANIFEST_NAME).write_text("{not json")
    assert not manifest_is_complete(str(folder / MANIFEST_NAME), KEY)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Café – déjà vu (live) [2020]", "Café – déjà vu (live) _2020_"),  # noqa: RUF001 - non-ASCII on purpose
        ("../../etc/passwd", "_._etc_passwd"),
        ("a/b\\c", "a_b_c"),
        ("line\nbreak\ttab\x00nul", "linebreaktabnul"),
        ("CON", "track_CON"),
        ("nul.txt", "track_nul.txt"),
        ("...", "track"),
        ("", "track"),
        ("x" * 300, "x" * 80),
    ],
)
def test_safe_name(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected
    assert "/" not in safe_name(raw) and ".." not in safe_name(raw)


def test_track_folder_strips_stem_suffix_and_keys_on_content() -> None:
    assert track_folder("/m/Artist - Song.stem.mp4", KEY) == "Artist - Song-abababababab"
    assert track_folder("s3://b/p/Song.flac", KEY) == "Song-abababababab"
    assert track_folder("/a/song.wav", KEY) != track_folder("/b/song.wav", "cd" * 32)


def test_expand_sources_scans_folders_globs_and_reports_problems(tmp_path: Path) -> None:
    for name in ["a/one.wav", "a/b/two.FLAC", "a/.hidden/three.mp3", "a/notes.txt", "a/.four.wav", "c/five.ogg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = expand_sources(
        [
            str(tmp_path / "a"),
            str(tmp_path / "c" / "*.ogg"),
            str(tmp_path / "missing"),
            str(tmp_path / "nothing*.wav"),
            str(tmp_path / "a" / "one.wav"),
        ]
    )
    assert found.tracks == [
        str(tmp_path / "a" / "b" / "two.FLAC"),
        str(tmp_path / "a" / "one.wav"),
        str(tmp_path / "c" / "five.ogg"),
    ]
    assert [reason for _, reason in found.problems] == ["no such file or folder", "pattern matched no files"]


def test_redact_drops_credentials() -> None:
    assert redact("https://user:secret@host/a.mp3?X-Amz-Signature=abc") == "https://host/a.mp3"
    assert redact("/local/path.wav") == "/local/path.wav"
