"""The catalog's lock holds when its lock file is deleted or replaced under the writers.

Real processes. A reader holds the catalog while its lock file is pulled away: a writer must still wait on
stemworks' lock, never reach DuckDB's own (racing DuckDB's lock is what loses committed rows,
benchmarks/catalog_writes.md). Then several writers record tracks as fast as they can while another process
deletes `<catalog>.lock` (and now and then puts a new file in its place): every row a writer saw committed
must be in the file at the end.
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog
from catalog.errors import CatalogBusyError
from tests.helpers.records import make_failed, make_run

REPO = Path(__file__).resolve().parents[1]
WRITERS, TRACKS_EACH = 6, 40
DEADLINE_S = 400.0  # bounded: the writers finish in well under this on a busy 2-core machine

pytestmark = pytest.mark.slow  # writer and deleter processes

WRITER = textwrap.dedent(
    """
    import sys
    from catalog import Catalog
    from tests.helpers.records import make_failed, make_run

    path, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    catalog = Catalog(path)
    catalog.start_run(make_run(run_id))
    committed = 0
    for i in range(count):
        catalog.record_track(run_id, make_failed(f"{run_id}-{i}"))
        committed += 1  # record_track returned: its transaction committed
    print(committed, flush=True)
    """
)
DELETER = textwrap.dedent(
    """
    import os, sys, time
    lock, stop = sys.argv[1], sys.argv[2]
    rounds = deleted = replaced = 0
    while not os.path.exists(stop):
        rounds += 1
        try:
            os.unlink(lock)
            deleted += 1
        except FileNotFoundError:
            pass
        if rounds % 5 == 0:  # now and then a new file in its place, as an editor or a sync tool would leave
            with open(lock + ".new", "w"):
                pass
            os.replace(lock + ".new", lock)
            replaced += 1
        time.sleep(0.001)
    print(deleted, replaced, flush=True)
    """
)


READER = textwrap.dedent(
    """
    import sys
    from catalog import Catalog

    with Catalog(sys.argv[1]).reading() as con:
        con.execute("SELECT count(*) FROM tracks").fetchall()
        print("reading", flush=True)
        sys.stdin.readline()  # holds the catalog open until the test says so
    """
)


def python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The process's first line of output, waited for at most `timeout` seconds."""
    assert process.stdout is not None and process.stderr is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output in {timeout:g} s: {process.stderr.read() if process.poll() is not None else ''}"
    return process.stdout.readline().strip()


@pytest.mark.parametrize("replace", [False, True], ids=["deleted", "replaced"])
def test_a_writer_still_waits_for_a_reader_when_the_lock_file_is_pulled_away(tmp_path: Path, replace: bool) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = Catalog(path)
    catalog.start_run(make_run("run-1"))
    reader = python(READER, str(path))
    try:
        assert first_line(reader, 120) == "reading"
        catalog.lock_path.unlink()
        if replace:
            catalog.lock_path.write_bytes(b"")
        impatient = Catalog(path, busy_timeout_s=2.0)
        with pytest.raises(CatalogBusyError) as caught:
            impatient.record_track("run-1", make_failed("waits"))
        # It waited on stemworks' lock; it never got as far as racing DuckDB's own lock (what loses rows).
        assert "Could not set lock" not in str(caught.value) and f"lock on {tmp_path}" in str(caught.value)
    finally:
        reader.communicate("done\n", timeout=60)
    assert reader.returncode == 0
    catalog.record_track("run-1", make_failed("after"))  # the reader has gone: writing works again
    assert catalog.counts()["tracks"] == 1


def test_no_committed_row_is_lost_when_the_lock_file_is_deleted_under_the_writers(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = Catalog(path)
    stop = tmp_path / "stop"
    deleter = python(DELETER, str(catalog.lock_path), str(stop))
    writers = [python(WRITER, str(path), f"run-{n}", str(TRACKS_EACH)) for n in range(WRITERS)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        results = [writer.communicate(timeout=max(1.0, deadline - time.monotonic())) for writer in writers]
    finally:
        stop.touch()
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
        deleter_out, deleter_err = deleter.communicate(timeout=60)
    for writer, (_, err) in zip(writers, results, strict=True):
        assert writer.returncode == 0, err[-3000:]
    committed = sum(int(out.split()[-1]) for out, _ in results)
    deleted, replaced = map(int, deleter_out.split())
    assert deleted > 0 and replaced > 0, deleter_err  # the lock file really was pulled away under the writers

    with duckdb.connect(str(path), read_only=True) as con:
        stored = con.execute("SELECT count(*) FROM tracks").fetchone()
        runs = con.execute("SELECT count(*) FROM runs").fetchone()
    assert committed == WRITERS * TRACKS_EACH
    assert stored == (committed,) and runs == (WRITERS,)
