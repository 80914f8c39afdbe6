"""Write Demucs local model repositories: `<name>-<sha256[:8]>.th` packages of klass/args/kwargs/state.

Used to make real-architecture HTDemucs models with random weights for tests, benchmarks and
offline demos; they load through exactly the `demucs.pretrained.get_model(name, repo=DIR)` path
that pretrained models take.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Literal

import torch
from demucs.htdemucs import HTDemucs

ModelSize = Literal["tiny", "full"]

SOURCES = ["drums", "bass", "other", "vocals"]
# Smallest HTDemucs whose transformer runs on few tokens: depth 4 keeps the sequence short.
_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"channels": 8, "depth": 4, "t_layers": 1},
    "full": {},  # the published htdemucs hyper-parameters are HTDemucs's defaults
}


def write_random_htdemucs(repo: str | Path, name: str, size: ModelSize = "tiny", seed: int = 0) -> Path:
    """Create (or replace) model `name` in `repo`; return the written file."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    kwargs = {"sources": SOURCES, "audio_channels": 2, "samplerate": 44100, "segment": 7.8, **_SIZES[size]}
    torch.manual_seed(seed)
    model = HTDemucs(**kwargs)
    buffer = io.BytesIO()
    torch.save({"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": model.state_dict()}, buffer)
    data = buffer.getvalue()
    for stale in repo.glob(f"{name}-*.th"):
        stale.unlink()
    target = repo / f"{name}-{hashlib.sha256(data).hexdigest()[:8]}.th"
    target.write_bytes(data)
    return target
