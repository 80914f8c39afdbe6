"""Why the catalog takes a sidecar lock: W processes each commit N one-row transactions to one DuckDB file,
opening and closing it per write and retrying DuckDB's "Could not set lock" error. Counts rows that landed.

    python benchmarks/duckdb_multiprocess_writes.py [--writers 8] [--writes 100]

`retry-only` retries duckdb.connect alone; `sidecar-flock` first takes an exclusive flock on a separate
file (what catalog.store does), while a plain read-only reader keeps opening the file without any lock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb


def connect(path: str) -> duckdb.DuckDBPyConnection:
    while True:
        try:
            return duckdb.connect(path)
        except duckdb.IOException as exc:
            if "Could not set lock" not in str(exc):
                raise
            time.sleep(random.uniform(0.001, 0.02))


def write(path: str, writer: str, writes: int, flock: bool) -> None:
    for i in range(writes):
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT) if flock else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        con = connect(path)
        con.execute("BEGIN")
        con.execute("INSERT INTO t VALUES (?, ?)", [writer, i])
        con.execute("COMMIT")
        con.close()
        if fd is not None:
            os.close(fd)


def read(path: str, stop: str) -> None:
    while not os.path.exists(stop):
        with contextlib.suppress(duckdb.IOException):
            duckdb.connect(path, read_only=True).close()


def trial(folder: Path, writers: int, writes: int, flock: bool) -> tuple[int, int]:
    path, stop = str(folder / f"{flock}.duckdb"), str(folder / f"{flock}.stop")
    with duckdb.connect(path) as con:
        con.execute("CREATE TABLE t (writer VARCHAR, i INTEGER)")
    reader = subprocess.Popen([sys.executable, __file__, "--read", path, stop]) if flock else None
    procs = [
        subprocess.Popen([sys.executable, __file__, "--write", path, f"w{w}", str(writes), str(flock)])
        for w in range(writers)
    ]
    codes = [p.wait() for p in procs]
    Path(stop).touch()
    if reader:
        reader.wait()
    with duckdb.connect(path, read_only=True) as con:
        row = con.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None  # an aggregate always returns one row
        landed = row[0]
    return landed, sum(1 for c in codes if c != 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--write", nargs=4)
    parser.add_argument("--read", nargs=2)
    args = parser.parse_args()
    if args.write:
        path, writer, writes, flock = args.write
        write(path, writer, int(writes), flock == "True")
        return
    if args.read:
        read(*args.read)
        return
    print(f"duckdb {duckdb.__version__}, {args.writers} writer processes x {args.writes} committed writes each")
    with tempfile.TemporaryDirectory() as tmp:
        for flock in (False, True):
            landed, crashed = trial(Path(tmp), args.writers, args.writes, flock)
            name = "sidecar-flock (+ plain read-only reader)" if flock else "retry-only"
            print(f"- {name}: {landed} of {args.writers * args.writes} rows landed; {crashed} writers crashed")


if __name__ == "__main__":
    main()
