"""Shared by the benchmarks: test inputs cut from ../shared/testdata, timed subprocesses with peak RSS."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.steps.encode import Frames

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
MUSIC = TESTDATA / "music"
SR = 44100


def decode_file(path: Path) -> np.ndarray:
    from tasks.core.settings import Limits
    from tasks.steps.validate import probe
    from tests.helpers.audio import decode_to_array

    return decode_to_array(path, probe(path, Limits()), SR, Limits())


def write_wav(samples: Frames, path: Path) -> Path:
    """16-bit wav through the project's encoder; `samples` may be any (2, n) sliceable object."""
    from tasks.core.settings import OutputSettings
    from tasks.steps.encode import encode

    path.parent.mkdir(parents=True, exist_ok=True)
    encode(samples, SR, path, OutputSettings(format="wav", bit_depth=16))
    return path


def cut_library(directory: Path, count: int, seconds: float) -> list[Path]:
    """`count` clips of `seconds` cut one after another from the real songs in testdata/music."""
    clips: list[Path] = []
    length = int(seconds * SR)
    songs = sorted(MUSIC.glob("*.ogg"))
    while len(clips) < count:
        for song in songs:
            audio = decode_file(song)
            for start in range(0, audio.shape[1] - length + 1, length):
                if len(clips) == count:
                    return clips
                clips.append(write_wav(audio[:, start : start + length], directory / f"clip{len(clips):02d}.wav"))
        length -= SR  # more clips than the songs hold at this length: shorter ones (never reached for 8 x 30 s)
    return clips


class Looped:
    """A (2, n) array-like that repeats a song: lets the encoder write an hour without holding it."""

    def __init__(self, song: np.ndarray, frames: int) -> None:
        self.song, self.shape = song, (song.shape[0], frames)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        start, stop, _ = key[1].indices(self.shape[1])
        index = np.arange(start, stop) % self.song.shape[1]
        return self.song[:, index][key[0]]


def timed(command: list[str], *, env: dict[str, str] | None = None) -> dict:
    """Run `command` in a fresh wrapper process; wall seconds and the peak RSS of its largest process."""
    wrapper = [sys.executable, str(Path(__file__).with_name("peak_rss.py")), "--", *command]
    started = time.perf_counter()
    # A loaded machine can take longer than Prefect's default to start its temporary API server.
    defaults = {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    result = subprocess.run(
        wrapper,
        cwd=ROOT,
        env={**os.environ, **defaults, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_rss_mb": measured["peak_rss_mb"], "command": " ".join(command)}


def load() -> str:
    return Path("/proc/loadavg").read_text().strip()


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def stems_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    n = min(reference.shape[-1], estimate.shape[-1])
    reference, estimate = reference[..., :n].astype(np.float64), estimate[..., :n].astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - estimate) ** 2), 1e-30)))
