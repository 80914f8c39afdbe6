"""Step `separate`: run Demucs on a decoded mixture. The model is loaded once per process (`tasks.engine`)."""

from __future__ import annotations

from pathlib import Path

from tasks.core.errors import SeparationError
from tasks.core.progress import reporter
from tasks.core.records import DecodedAudio, SeparatedStems
from tasks.core.settings import SeparationSettings
from tasks.engine.models import engine_options, load_model
from tasks.engine.overlap_add import TrackFiles, output_names, separate_files


def separate(
    decoded: DecodedAudio, settings: SeparationSettings, work_dir: str | Path, *, source: str = ""
) -> SeparatedStems:
    """Separate the decoded mixture `.npy` into one `.npy` per stem, streaming windows through the engine."""
    model, info, device = load_model(settings)
    if decoded.sample_rate != info.sample_rate:
        raise SeparationError(
            f"decoded at {decoded.sample_rate} Hz but the model needs {info.sample_rate} Hz", source=source
        )
    names = output_names(info.sources, settings.two_stems)
    paths = {name: str(Path(work_dir) / f"stem-{name}.npy") for name in names}
    separate_files(
        model,
        [TrackFiles(mixture=decoded.path, stems=paths, source=source)],
        engine_options(settings, device),
        device,
        progress=reporter().fraction,
    )
    return SeparatedStems(paths=paths, sample_rate=info.sample_rate, frames=decoded.frames, model=info, device=device)
