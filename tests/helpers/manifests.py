"""Manifests for tests that exercise publishing without running a separation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.io.manifest import Manifest

KEY = "ab" * 32


def manifest_for(
    files: dict[str, Path], key: str = KEY, extra_stems: tuple[dict[str, Any], ...] = (), size_of: int | None = None
) -> Manifest:
    """A complete, valid manifest listing `files` (each at its size on disk, or `size_of`) plus `extra_stems`."""
    stems = [
        {
            "stem": s,
            "file": p.name,
            "sha256": "0" * 64,
            "seconds": 0.1,
            "bytes": size_of if size_of is not None else p.stat().st_size,
        }
        for s, p in files.items()
    ]
    return Manifest.model_validate(
        {
            "job_key": key,
            "run_id": "r" * 32,
            "created_at": "2026-01-01T00:00:00+00:00",
            "source": "/music/x.wav",
            "content_sha256": "0" * 64,
            "model": {"name": "tiny", "signature": "0" * 16},
            "parameters": {},
            "source_audio": {
                "container": "wav",
                "codec": "pcm_s16le",
                "stream_index": 0,
                "audio_streams": 1,
                "sample_rate": 44100,
                "channels": 2,
                "seconds": 0.1,
            },
            "sample_rate": 44100,
            "seconds": 0.1,
            "residual_db": -150.0,
            "stems": [*stems, *extra_stems],
            "code_version": "test",
        }
    )
