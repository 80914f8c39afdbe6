"""Realistic catalog records (runs, succeeded/failed/skipped outcomes) for catalog tests and benchmarks."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from catalog import Catalog
from tasks.core.records import (
    AudioInfo,
    PublishedStem,
    PublishedTrack,
    RunRecord,
    StemQuality,
    TrackOutcome,
    TrackQuality,
)
from tasks.core.vocabulary import STEPS

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STEM_NAMES = ("drums", "bass", "other", "vocals")
OUT = "/data/out"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_run(run_id: str = "run-1", **changes: object) -> RunRecord:
    fields: dict = {
        "run_id": run_id,
        "flow_run_id": "flow-run-1",
        "flow_name": "separate-library",
        "started_at": T0,
        "parameters": {"model": "htdemucs", "shifts": 1},
        "sources": ["/music"],
        "out": OUT,
        "model_name": "htdemucs",
        "model_signature": "955717e8",
        "device": "cpu",
        "code_version": "0.1.0",
        "hostname": "box",
    }
    return RunRecord(**{**fields, **changes})


def make_succeeded(
    name: str,
    *,
    start: datetime = T0,
    out: str = OUT,
    job_key: str | None = None,
    stems: tuple[str, ...] = STEM_NAMES,
    scored: tuple[str, ...] = STEM_NAMES,
    **changes: object,
) -> TrackOutcome:
    folder = f"{out}/{name}"
    published = PublishedTrack(
        manifest_uri=f"{folder}/manifest.json",
        track_uri=folder,
        stems=[
            PublishedStem(
                stem=s, uri=f"{folder}/{s}.flac", sha256=sha(name + s), seconds=30.0, bytes=1000 + i, format="flac"
            )
            for i, s in enumerate(stems)
        ],
    )
    quality = TrackQuality(
        residual_db=-42.5,
        stems=[
            StemQuality(
                stem=s,
                peak_dbfs=-1.0 - i,
                rms_dbfs=-20.0 - i,
                silence_ratio=0.1 * i,
                clipped_ratio=0.0,
                energy_share_db=-6.0 - i,
            )
            for i, s in enumerate(scored)
        ],
    )
    fields: dict = {
        "source": f"/music/{name}.mp3",
        "status": "succeeded",
        "content_sha256": sha(name),
        "job_key": job_key or f"job-{name}",
        "started_at": start,
        "finished_at": start + timedelta(seconds=9),
        "step_seconds": {step: 1.0 + i for i, step in enumerate(STEPS)},
        "audio_seconds": 30.0,
        "info": AudioInfo(
            container="mp3", codec="mp3", stream_index=0, audio_streams=1, sample_rate=44100, channels=2, seconds=30.0
        ),
        "origin": {"path": f"/music/{name}.mp3", "title": None},
        "quality": quality,
        "published": published,
        "flow_run_id": "flow-run-1",
    }
    return TrackOutcome(**{**fields, **changes})


def make_failed(name: str = "broken") -> TrackOutcome:
    return TrackOutcome(
        source=f"/music/{name}.mp3",
        status="failed",
        content_sha256=sha(name),
        job_key=f"job-{name}",
        error="not audio: no audio stream",
        error_step="validate",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        step_seconds={"fetch": 0.5, "validate": 0.25},
    )


def make_skipped(name: str = "again") -> TrackOutcome:
    return TrackOutcome(
        source=f"/music/{name}.mp3",
        status="skipped",
        content_sha256=sha(name),
        job_key=f"job-{name}",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        step_seconds={"fetch": 0.5},
    )


def recorded_library(catalog: Catalog) -> dict[str, str]:
    """2 succeeded tracks (4 stems each), 1 failed, 1 skipped; returns source name -> track_id."""
    catalog.start_run(make_run())
    outcomes = {"a": make_succeeded("a"), "b": make_succeeded("b"), "broken": make_failed(), "again": make_skipped()}
    return {name: catalog.record_track("run-1", outcome) for name, outcome in outcomes.items()}


def read_plain(path: Path, sql: str) -> list[tuple]:
    """Read the file the way an analyst would: a separate read-only DuckDB connection."""
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).fetchall()
