"""Expand what a user names (files, folders, globs, store prefixes, playlist pages) into tracks."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from tasks.io.faults import describe
from tasks.io.hashcopy import file_kind
from tasks.io.locations import has_scheme, is_audio_name, is_glob, normalise, redact
from tasks.io.storage import filesystem, is_local
from tasks.io.web.policy import NetworkPolicy, is_local_source, is_url_source, source_problem
from tasks.io.web.urls import expand_url


@dataclass
class ExpandedSources:
    """Tracks found, and sources that could not be expanded, each with its reason."""

    tracks: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


# `@PATH` names a file listing sources, one per line: how sources that carry credentials (signed URLs,
# user:password@) reach a run without becoming flow parameters, which Prefect stores and shows.
LIST_PREFIX = "@"


def read_source_list(entry: str) -> list[str]:
    """The sources listed in the file `entry` names (`@PATH`); blank lines and `#` comments are skipped."""
    path = normalise(entry.removeprefix(LIST_PREFIX))
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        lines = [line.strip() for line in handle]
    return [line for line in lines if line and not line.startswith("#")]


def with_lists(sources: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """`sources` with every `@PATH` replaced by the sources it lists; unreadable lists as problems."""
    flat: list[str] = []
    problems: list[tuple[str, str]] = []
    for source in sources:
        if not source.startswith(LIST_PREFIX):
            flat.append(source)
            continue
        try:
            flat.extend(read_source_list(source))
        except OSError as exc:
            problems.append((redact(source), f"cannot read source list: {exc.strerror or exc}"))
    return flat, problems


def shown_sources(sources: list[str]) -> list[str]:
    """What a run records as its sources: lists expanded (their entries redacted), credentials dropped."""
    flat, problems = with_lists(sources)
    return [redact(s) for s in flat] + [source for source, _ in problems]


def expand_sources(sources: list[str], max_playlist_entries: int = 50) -> ExpandedSources:
    """Files stay as given; folders are scanned recursively for audio; globs are expanded;
    playlist URLs become their entries (at most `max_playlist_entries` each); `@PATH` lists are read.

    Every source and every track found is held to the source policy (`source_problem`) before anything
    is contacted; special files (FIFOs, devices, sockets) and folders that cannot be read are reported,
    never silently skipped or opened.
    """
    sources, unreadable = with_lists(sources)
    expanded = ExpandedSources(problems=unreadable)
    seen: set[str] = set()
    for source in sources:
        problem = source_problem(source)
        if problem is not None:
            expanded.problems.append((redact(source), f"refused: {problem}"))
            continue
        try:
            found = _expand_one(source, max_playlist_entries)
        except Exception as exc:  # noqa: BLE001 - store clients raise their own types; report, go on
            expanded.problems.append((redact(source), f"cannot list source: {describe(exc)}"))
            continue
        if not found.tracks and not found.problems:
            expanded.problems.append((redact(source), _nothing_found_reason(source)))
        expanded.problems.extend(found.problems)
        for track in found.tracks:
            problem = source_problem(track)  # e.g. a playlist entry pointing elsewhere
            if problem is not None:
                expanded.problems.append((redact(track), f"refused: {problem}"))
            elif track not in seen:
                seen.add(track)
                expanded.tracks.append(track)
    return expanded


def _expand_one(source: str, max_playlist_entries: int) -> ExpandedSources:
    if is_url_source(source):
        return ExpandedSources(tracks=expand_url(source, max_playlist_entries, NetworkPolicy.from_env()))
    if is_local_source(source):
        return _expand_local(source)
    scheme = source.split("://", 1)[0].lower()
    fs, path = filesystem(source)
    if is_glob(path):
        matches = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        matches = [p for p in fs.find(path) if is_audio_name(p) and not _hidden(p[len(path) :])]
    elif fs.exists(path):
        matches = [path]
    else:
        matches = []
    # Addressed with the source's own scheme, so the tracks pass the same source policy.
    return ExpandedSources(tracks=sorted(p if is_local(fs) else f"{scheme}://{p}" for p in matches))


def _expand_local(source: str) -> ExpandedSources:
    path = normalise(source)
    found = ExpandedSources()
    if is_glob(source):
        for match in sorted(glob.glob(path, recursive=True)):
            if not os.path.isdir(match):
                _add_file(found, match)
    elif os.path.isdir(path):

        def unreadable(exc: OSError) -> None:
            folder = redact(str(exc.filename))
            found.problems.append((folder, f"cannot read folder {folder}: {exc.strerror or exc}"))

        files: list[str] = []
        for root, dirs, names in os.walk(path, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, f) for f in names if is_audio_name(f) and not f.startswith("."))
        for file in sorted(files):
            _add_file(found, file)
    elif os.path.lexists(path):
        _add_file(found, path)
    return found


def _add_file(found: ExpandedSources, path: str) -> None:
    """A regular file becomes a track; a FIFO, device or socket a problem: opening one can block forever."""
    try:
        kind = file_kind(os.stat(path).st_mode)
    except OSError:  # a dangling link or a link loop: fetch reports it (and does not retry it)
        kind = None
    if kind is None:
        found.tracks.append(path)
    else:
        found.problems.append((redact(path), f"not a regular file ({kind})"))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _nothing_found_reason(source: str) -> str:
    if is_glob(source):
        return "pattern matched no files"
    path = source if has_scheme(source) else normalise(source)
    if not has_scheme(source) and os.path.isdir(path):
        return "folder holds no audio files"
    return "no such file or folder"
