"""Expand what a user names (files, folders, globs, store prefixes, playlist pages) into tracks."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from tasks.io.faults import describe
from tasks.io.locations import has_scheme, is_audio_name, normalise, redact
from tasks.io.storage import filesystem, is_local
from tasks.io.web.policy import NetworkPolicy
from tasks.io.web.urls import expand_url

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class ExpandedSources:
    """Tracks found, and sources that could not be expanded, each with its reason."""

    tracks: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def expand_sources(sources: list[str], max_playlist_entries: int = 50) -> ExpandedSources:
    """Files stay as given; folders are scanned recursively for audio; globs are expanded;
    playlist URLs become their entries (at most `max_playlist_entries` each)."""
    expanded = ExpandedSources()
    seen: set[str] = set()
    for source in sources:
        try:
            found = _expand_one(source, max_playlist_entries)
        except Exception as exc:  # noqa: BLE001 - store clients raise their own types; report, go on
            expanded.problems.append((redact(source), f"cannot list source: {describe(exc)}"))
            continue
        if not found:
            expanded.problems.append((redact(source), _nothing_found_reason(source)))
        for track in found:
            if track not in seen:
                seen.add(track)
                expanded.tracks.append(track)
    return expanded


def _expand_one(source: str, max_playlist_entries: int) -> list[str]:
    if source.lower().startswith(("http://", "https://")):
        return expand_url(source, max_playlist_entries, NetworkPolicy.from_env())
    if not has_scheme(source) and not source.startswith("file://"):
        return _expand_local(source)
    fs, path = filesystem(source)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if _GLOB_CHARS.search(path):
        matches = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        matches = [p for p in fs.find(path) if is_audio_name(p) and not _hidden(p[len(path) :])]
    elif fs.exists(path):
        matches = [path]
    else:
        return []
    return sorted(p if is_local(fs) else f"{protocol}://{p}" for p in matches)


def _expand_local(source: str) -> list[str]:
    path = normalise(source)
    if _GLOB_CHARS.search(source):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isdir(path):
        found: list[str] = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, f) for f in files if is_audio_name(f) and not f.startswith("."))
        return sorted(found)
    if os.path.lexists(path):
        return [path]
    return []


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _nothing_found_reason(source: str) -> str:
    if _GLOB_CHARS.search(source):
        return "pattern matched no files"
    path = source if has_scheme(source) else normalise(source)
    if not has_scheme(source) and os.path.isdir(path):
        return "folder holds no audio files"
    return "no such file or folder"
