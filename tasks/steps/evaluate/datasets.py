"""Find the tracks with true stems in what a user names, and read their references.

Accepted layouts (`LAYOUTS`; README: "Evaluate a model on your own stem files"):

- **NI stem files** (`*.stem.mp4`, `*.stem.m4a`, as MUSDB18 is distributed): audio stream 0 is the mixture,
  streams 1-4 the references of drums, bass, other and vocals.
- **Reference folders** (MUSDB18-HQ's layout, and the one for custom sets): a folder holding `mixture.<ext>`
  and, beside it, one `<stem>.<ext>` per stem the model produces (`drums.wav`, `bass.flac`, ...; any audio
  extension the pipeline reads). Other files in the folder are ignored.

A dataset argument is one stem file, one reference folder, or a folder searched recursively for both. With
`two_stems` (`vocals` + `no_vocals`), the reference of `no_vocals` is the sum of the other references.

Every reference must match its mixture: same sample rate, same channel count, and the same length (within
`LENGTH_TOLERANCE_S`, the codec padding of independently encoded files; all are then cut to the shortest).
A reference that is missing or mismatched fails its item alone, with the reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.core.errors import StemworksError
from tasks.core.evaluation import DatasetItem, ReferenceSource
from tasks.core.records import AudioInfo
from tasks.core.settings import Limits
from tasks.io.locations import AUDIO_EXTENSIONS, is_audio_name, normalise
from tasks.steps.decode import decode_blocks
from tasks.steps.validate import NI_STEM_STREAMS, STEM_SUFFIXES, probe

# NI stem files (and MUSDB18) keep the references in this order after the mixture (stream 0).
NI_STEM_ORDER = ("drums", "bass", "other", "vocals")
MIXTURE_NAME = "mixture"
# Lengths may differ by this much (codec priming and padding of files encoded one by one); more is a mismatch.
LENGTH_TOLERANCE_S = 0.05
LAYOUTS = (
    "NI stem files (*.stem.mp4 / *.stem.m4a: stream 0 the mixture, streams 1-4 drums, bass, other, vocals)",
    (
        "reference folders (MUSDB18-HQ layout: <track>/mixture.wav beside drums.wav, bass.wav, other.wav, vocals.wav; "
        "any audio extension)"
    ),
)


class ReferencesError(StemworksError):
    """An item's references are missing or do not match its mixture: that item cannot be evaluated."""

    step = "validate"


@dataclass
class Discovered:
    """Items found, and dataset arguments that could not be read, each with its reason."""

    items: list[DatasetItem] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def accepted_layouts() -> str:
    return "; ".join(LAYOUTS)


def discover(datasets: list[str]) -> Discovered:
    """Every item in `datasets` (local files and folders), in a stable order, each mixture listed once."""
    found = Discovered()
    seen: set[str] = set()
    for dataset in datasets:
        path = Path(normalise(dataset))
        if not path.exists():
            found.problems.append((dataset, "no such file or folder"))
            continue
        for item in _items(dataset, path):
            if item.mixture not in seen:
                seen.add(item.mixture)
                found.items.append(item)
    return found


def _items(dataset: str, path: Path) -> list[DatasetItem]:
    if path.is_file():
        return [_stem_file_item(dataset, path, path.parent)] if _is_stem_file(path.name) else []
    base = path.parent
    items: list[DatasetItem] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folder = Path(root)
        visible = sorted(n for n in names if not n.startswith("."))
        mixture = _mixture_file(folder, visible)
        if mixture is not None:
            items.append(_folder_item(dataset, folder, mixture, visible, base))
        items.extend(_stem_file_item(dataset, folder / n, base) for n in visible if _is_stem_file(n))
    return items


def _is_stem_file(name: str) -> bool:
    return name.lower().endswith(STEM_SUFFIXES)


def _mixture_file(folder: Path, names: list[str]) -> Path | None:
    candidates = [n for n in names if Path(n).stem == MIXTURE_NAME and is_audio_name(n)]
    return folder / candidates[0] if candidates else None


def _name(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def _stem_file_item(dataset: str, path: Path, base: Path) -> DatasetItem:
    name = _name(path, base)
    for suffix in STEM_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    references = {
        stem: ReferenceSource(stem=stem, path=str(path), stream_index=index)
        for index, stem in enumerate(NI_STEM_ORDER, start=1)
    }
    return DatasetItem(
        name=name, dataset=dataset, layout="ni-stems", mixture=str(path), mixture_stream=0, references=references
    )


def _folder_item(dataset: str, folder: Path, mixture: Path, names: list[str], base: Path) -> DatasetItem:
    references: dict[str, ReferenceSource] = {}
    for name in names:
        stem = Path(name).stem
        if stem != MIXTURE_NAME and Path(name).suffix.lower() in AUDIO_EXTENSIONS and stem not in references:
            references[stem] = ReferenceSource(stem=stem, path=str(folder / name))
    return DatasetItem(
        name=_name(folder, base) if folder != base else folder.name,
        dataset=dataset,
        layout="folder",
        mixture=str(mixture),
        references=references,
    )


# ---------------------------------------------------------------- references


def reference_parts(item: DatasetItem, stems: list[str]) -> dict[str, list[str]]:
    """For each estimated stem, the reference stems that sum to its reference; raises naming what is missing."""
    parts: dict[str, list[str]] = {}
    for stem in stems:
        if stem in item.references:
            parts[stem] = [stem]
        elif stem.startswith("no_") and stem[3:] in item.references and len(item.references) > 1:
            parts[stem] = [s for s in item.references if s != stem[3:]]
        else:
            raise ReferencesError(_missing(item, stem), source=item.name)
    return parts


def _missing(item: DatasetItem, stem: str) -> str:
    if item.layout == "ni-stems":
        return (
            f"no reference for stem {stem!r}: an NI stem file holds {', '.join(NI_STEM_ORDER)} "
            f"(streams 1-{len(NI_STEM_ORDER)})"
        )
    folder = Path(item.mixture).parent
    return f"no reference for stem {stem!r}: expected {folder / stem}.<wav|flac|...> beside {Path(item.mixture).name}"


def check_references(item: DatasetItem, stems: list[str], limits: Limits) -> AudioInfo:
    """Probe the mixture and every reference the `stems` need (headers, one frame each); raise ReferencesError
    naming the file and the reason when one is missing, unreadable, or of another rate or channel count.
    Returns the mixture's info."""
    mixture = _probe(item.mixture, limits, item)
    if item.layout == "ni-stems" and mixture.audio_streams != NI_STEM_STREAMS:
        raise ReferencesError(
            f"{item.mixture}: an NI stem file has {NI_STEM_STREAMS} audio streams (mixture, "
            f"{', '.join(NI_STEM_ORDER)}); this one has {mixture.audio_streams}",
            source=item.name,
        )
    needed = {s for group in reference_parts(item, stems).values() for s in group}
    for stem in sorted(needed):
        ref = item.references[stem]
        info = mixture if ref.path == item.mixture else _probe(ref.path, limits, item)
        stream = _stream_info(ref, info, item)
        if stream.sample_rate != mixture.sample_rate:
            raise ReferencesError(
                f"reference {stem!r} ({_where(ref)}) is at {stream.sample_rate} Hz, the mixture at "
                f"{mixture.sample_rate} Hz",
                source=item.name,
            )
        if stream.channels != mixture.channels:
            raise ReferencesError(
                f"reference {stem!r} ({_where(ref)}) has {stream.channels} channel(s), the mixture {mixture.channels}",
                source=item.name,
            )
        if min(stream.seconds, mixture.seconds) > 0 and abs(stream.seconds - mixture.seconds) > LENGTH_TOLERANCE_S:
            raise ReferencesError(_length_mismatch(stem, ref, stream.seconds, mixture.seconds), source=item.name)
    return mixture


def _length_mismatch(stem: str, ref: ReferenceSource, seconds: float, mixture_seconds: float) -> str:
    return (
        f"reference {stem!r} ({_where(ref)}) is {seconds:.3f} s long, the mixture {mixture_seconds:.3f} s "
        f"(more than {LENGTH_TOLERANCE_S:g} s apart)"
    )


def _where(ref: ReferenceSource) -> str:
    return f"{ref.path} stream {ref.stream_index}" if ref.stream_index else ref.path


def _probe(path: str, limits: Limits, item: DatasetItem) -> AudioInfo:
    try:
        return probe(path, limits)
    except StemworksError as exc:
        raise ReferencesError(f"{path}: {exc.reason}", source=item.name) from None


def _stream_info(ref: ReferenceSource, info: AudioInfo, item: DatasetItem) -> AudioInfo:
    """The info of the reference's own stream (NI stem files: each stream has its own rate and channels)."""
    if ref.stream_index == 0:
        return info
    import av  # only for NI stem files' other streams

    with av.open(ref.path, metadata_errors="ignore") as container:
        streams = container.streams.audio
        if ref.stream_index >= len(streams):
            raise ReferencesError(f"{_where(ref)}: the file has only {len(streams)} audio streams", source=item.name)
        stream = streams[ref.stream_index]
        context = stream.codec_context
        seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        return info.model_copy(
            update={
                "stream_index": ref.stream_index,
                "sample_rate": int(context.sample_rate or 0),
                "channels": int(context.channels or 0),
                "seconds": seconds,
            }
        )


def decode_file(path: str, info: AudioInfo, sample_rate: int, limits: Limits, *, label: str) -> np.ndarray:
    """(samples, 2) float32 at `sample_rate`: one audio stream, decoded with the pipeline's decoder; mono is
    duplicated to both channels, as the pipeline does before separating."""
    blocks = list(decode_blocks(path, info, sample_rate, limits, source=label))
    audio = np.concatenate(blocks, axis=1) if blocks else np.zeros((info.channels, 0), np.float32)
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    return np.ascontiguousarray(audio.T)


def load_references(
    item: DatasetItem, mixture: AudioInfo, parts: dict[str, list[str]], sample_rate: int, limits: Limits
) -> np.ndarray:
    """(stems, samples, 2) float32 references at `sample_rate`, in the order of `parts`, cut to the shortest;
    raises ReferencesError when a length differs from the mixture's by more than LENGTH_TOLERANCE_S."""
    mixture_audio = decode_file(item.mixture, mixture, sample_rate, limits, label=item.mixture)
    decoded: dict[str, np.ndarray] = {}
    tolerance = math.ceil(LENGTH_TOLERANCE_S * sample_rate)
    for stem in sorted({s for group in parts.values() for s in group}):
        ref = item.references[stem]
        info = _stream_info(ref, mixture if ref.path == item.mixture else _probe(ref.path, limits, item), item)
        try:
            audio = decode_file(ref.path, info, sample_rate, limits, label=_where(ref))
        except StemworksError as exc:
            raise ReferencesError(f"reference {stem!r}: {exc}", source=item.name) from None
        if abs(audio.shape[0] - mixture_audio.shape[0]) > tolerance:
            mismatch = _length_mismatch(stem, ref, audio.shape[0] / sample_rate, mixture_audio.shape[0] / sample_rate)
            raise ReferencesError(mismatch, source=item.name)
        decoded[stem] = audio
    length = min([mixture_audio.shape[0], *(a.shape[0] for a in decoded.values())])
    stacked = [np.sum([decoded[s][:length] for s in group], axis=0, dtype=np.float32) for group in parts.values()]
    return np.stack(stacked)
