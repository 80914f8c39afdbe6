"""One track's way through the pipeline, shared by the `separate-library` and `separate-track` flows.

- `track.py`: the phases of one track (prepare: fetch → key → skip? → validate → decode; separate;
  finish: score → publish; record), each returning an outcome instead of raising for a bad track;
- `overlap.py`: three tracks in flight (the next prepared, this one separating, the last finishing);
- `runs.py`: a run's catalog record and summary;
- `workarea.py`: where scratch files live.
"""
