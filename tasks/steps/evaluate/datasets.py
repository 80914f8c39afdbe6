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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from tasks.core.errors import StemworksError
from tasks.core.evaluation import DatasetItem, ReferenceSource
from tasks.core.records import AudioInfo
from tasks.core.settings import Limits
from tasks.io.faults import describe
from tasks.io.locations import AUDIO_EXTENSIONS, is_audio_name, normalise, redact
from tasks.io.storage import filesystem
from tasks.io.web.policy import check_source, is_local_source, is_url_source
from tasks.steps.decode import decode_blocks
from tasks.steps.fetch import fetch_store
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
    """Every item in `datasets` (local files and folders, object-store files and prefixes), in a stable order,
    each mixture listed once."""
    found = Discovered()
    seen: set[str] = set()
    for dataset in datasets:
        try:
            items = _remote_items(dataset) if is_remote(dataset) else _local_items(dataset)
        except DatasetError as exc:
            found.problems.append((dataset, exc.reason))
            continue
        for item in items:
            if item.mixture not in seen:
                seen.add(item.mixture)
                found.items.append(item)
    return found


class DatasetError(StemworksError):
    """A dataset argument cannot be read or listed."""

    step = "validate"


def is_remote(location: str) -> bool:
    """In an object store (s3://...), read through fsspec; else a path on this host."""
    return not is_local_source(location)


def _local_items(dataset: str) -> list[DatasetItem]:
    path = Path(normalise(dataset))
    if not path.exists():
        raise DatasetError("no such file or folder")
    if path.is_file():
        return [_stem_file_item(dataset, str(path), str(path.parent), str)] if _is_stem_file(path.name) else []
    listing: list[tuple[str, list[str]]] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        listing.append((root, sorted(n for n in names if not n.startswith("."))))
    return _listed_items(dataset, listing, str(path.parent), str)


def _remote_items(dataset: str) -> list[DatasetItem]:
    """The items under an object-store URL: a stem file, or a prefix listed recursively (names starting with
    a dot skipped, as in local folders)."""
    if is_url_source(dataset):
        raise DatasetError("an http(s) URL cannot be listed: give a local path or an object-store URL (s3://...)")
    try:
        check_source(dataset)
        fs, root = filesystem(dataset)
        root = root.rstrip("/")
        if fs.isfile(root):
            stem_file = _is_stem_file(root)
            return [_stem_file_item(dataset, root, root.rpartition("/")[0], fs.unstrip_protocol)] if stem_file else []
        files = sorted(fs.find(root))
    except StemworksError as exc:
        raise DatasetError(exc.reason) from None
    except Exception as exc:  # noqa: BLE001 - store clients raise their own types
        raise DatasetError(f"cannot list: {describe(exc)}") from None
    if not files:
        raise DatasetError("no such object or prefix, or nothing under it")
    folders: dict[str, list[str]] = {}
    for file in files:
        folder, _, name = file.rpartition("/")
        inside = PurePosixPath(file).relative_to(PurePosixPath(root).parent).parts
        if not any(part.startswith(".") for part in inside):
            folders.setdefault(folder, []).append(name)
    base = str(PurePosixPath(root).parent)
    return _listed_items(dataset, sorted(folders.items()), base, fs.unstrip_protocol)


def _listed_items(
    dataset: str, listing: list[tuple[str, list[str]]], base: str, location: Callable[[str], str]
) -> list[DatasetItem]:
    """Items from (folder, file names) pairs, names relative to `base`; `location` turns a listed path into
    what the pipeline reads (itself for local paths, the URL for object-store keys)."""
    items: list[DatasetItem] = []
    for folder, names in listing:
        mixture = _mixture_name(names)
        if mixture is not None:
            items.append(_folder_item(dataset, folder, mixture, names, base, location))
        items.extend(_stem_file_item(dataset, f"{folder}/{n}", base, location) for n in names if _is_stem_file(n))
    return items


def _is_stem_file(name: str) -> bool:
    return name.lower().endswith(STEM_SUFFIXES)


def _mixture_name(names: list[str]) -> str | None:
    candidates = [n for n in names if PurePosixPath(n).stem == MIXTURE_NAME and is_audio_name(n)]
    return candidates[0] if candidates else None


def _name(path: str, base: str) -> str:
    try:
        return PurePosixPath(path).relative_to(PurePosixPath(base)).as_posix()
    except ValueError:
        return PurePosixPath(path).name


def _stem_file_item(dataset: str, path: str, base: str, location: Callable[[str], str]) -> DatasetItem:
    name = _name(path, base)
    for suffix in STEM_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    where = location(path)
    references = {
        stem: ReferenceSource(stem=stem, path=where, stream_index=index)
        for index, stem in enumerate(NI_STEM_ORDER, start=1)
    }
    return DatasetItem(
        name=name, dataset=dataset, layout="ni-stems", mixture=where, mixture_stream=0, references=references
    )


def _folder_item(
    dataset: str, folder: str, mixture: str, names: list[str], base: str, location: Callable[[str], str]
) -> DatasetItem:
    references: dict[str, ReferenceSource] = {}
    for name in names:
        stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix.lower()
        if stem != MIXTURE_NAME and suffix in AUDIO_EXTENSIONS and stem not in references:
            references[stem] = ReferenceSource(stem=stem, path=location(f"{folder}/{name}"))
    return DatasetItem(
        name=_name(folder, base) if folder != base else PurePosixPath(folder).name,
        dataset=dataset,
        layout="folder",
        mixture=location(f"{folder}/{mixture}"),
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
    folder, _, mixture = shown(item).rpartition("/")
    return f"no reference for stem {stem!r}: expected {folder}/{stem}.<wav|flac|...> beside {mixture}"


def shown(item: DatasetItem) -> str:
    """The mixture as the user named it: its object-store URL for a local copy."""
    return redact(item.origin or item.mixture)


def precheck_references(item: DatasetItem, stems: list[str], limits: Limits) -> None:
    """What can be checked before separating: for local files everything `check_references` checks; for an
    object store, that every reference the `stems` need was listed (the files are fetched, probed and
    compared with the mixture when the item is scored, so a dataset is never copied whole to this host)."""
    if is_remote(item.mixture):
        reference_parts(item, stems)
    else:
        check_references(item, stems, limits)


def local_copy(item: DatasetItem, stems: list[str], work_dir: str | Path, limits: Limits) -> DatasetItem:
    """The item with its mixture and the references the `stems` need as local files: fetched into `work_dir`
    (each file once) from an object store, with their URLs kept as `origin`; a local item as it is."""
    if not is_remote(item.mixture):
        return item
    copies: dict[str, str] = {}

    def copy(url: str) -> str:
        if url not in copies:
            folder = Path(work_dir) / f"reference-{len(copies)}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                copies[url] = fetch_store(url, folder, limits).local_path
            except StemworksError as exc:
                reason = f"{redact(url)}: {exc.reason}"
                raise ReferencesError(reason, source=item.name, retryable=exc.retryable) from None
        return copies[url]

    needed = {s for group in reference_parts(item, stems).values() for s in group}
    references = {
        stem: ref.model_copy(update={"path": copy(ref.path), "origin": ref.path}) if stem in needed else ref
        for stem, ref in item.references.items()
    }
    return item.model_copy(update={"mixture": copy(item.mixture), "origin": item.mixture, "references": references})


def check_references(item: DatasetItem, stems: list[str], limits: Limits) -> AudioInfo:
    """Probe the mixture and every reference the `stems` need (headers, one frame each); raise ReferencesError
    naming the file and the reason when one is missing, unreadable, or of another rate or channel count.
    Returns the mixture's info."""
    mixture = _probe(item.mixture, shown(item), limits, item)
    if item.layout == "ni-stems" and mixture.audio_streams != NI_STEM_STREAMS:
        raise ReferencesError(
            f"{shown(item)}: an NI stem file has {NI_STEM_STREAMS} audio streams (mixture, "
            f"{', '.join(NI_STEM_ORDER)}); this one has {mixture.audio_streams}",
            source=item.name,
        )
    needed = {s for group in reference_parts(item, stems).values() for s in group}
    for stem in sorted(needed):
        ref = item.references[stem]
        info = mixture if ref.path == item.mixture else _probe(ref.path, _where(ref, stream=False), limits, item)
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


def _where(ref: ReferenceSource, stream: bool = True) -> str:
    """The reference's file as the user named it (its URL for a local copy), and its stream in a stem file."""
    where = redact(ref.origin or ref.path)
    return f"{where} stream {ref.stream_index}" if stream and ref.stream_index else where


def _probe(path: str, label: str, limits: Limits, item: DatasetItem) -> AudioInfo:
    try:
        return probe(path, limits, source=label)
    except StemworksError as exc:
        raise ReferencesError(f"{label}: {exc.reason}", source=item.name) from None


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
    mixture_audio = decode_file(item.mixture, mixture, sample_rate, limits, label=shown(item))
    decoded: dict[str, np.ndarray] = {}
    tolerance = math.ceil(LENGTH_TOLERANCE_S * sample_rate)
    for stem in sorted({s for group in parts.values() for s in group}):
        ref = item.references[stem]
        probed = mixture if ref.path == item.mixture else _probe(ref.path, _where(ref, stream=False), limits, item)
        info = _stream_info(ref, probed, item)
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
