"""Which process is this, and is a process recorded earlier still alive? Used to tell a dead run's
claims, work files and staging folders from those of a run that is still going.

A process is named by host, pid and start time: a pid alone is reused by the system, and a pid on
another host says nothing here. Liveness can only be known for processes on this host; for others
the answer is "unknown" and callers fall back on a lease or an age.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path

from pydantic import Field

from tasks.core.records import Record

# A process whose start time differs from the recorded one by more than this is another process
# that got the same pid (start times come from clock ticks, so they carry some rounding).
_START_TOLERANCE_S = 2.0


def worker_label() -> str | None:
    """`STEMWORKS_WORKER`: names a worker among several on one host (each track records it)."""
    return os.environ.get("STEMWORKS_WORKER") or None


@cache
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def process_started(pid: int) -> float | None:
    """Start time of process `pid` on this host (epoch seconds), or None when there is no such process
    (or no /proc to ask)."""
    boot = _boot_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if boot is None:
        return None
    # Field 22 (starttime, in clock ticks since boot) counts from after the command name, which may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


class ProcessStamp(Record):
    """A process, named so that it can be recognised later (or found gone)."""

    hostname: str
    pid: int = Field(ge=0)
    started: float | None = Field(default=None, description="Process start, epoch seconds (None: unknown).")
    worker: str | None = None

    @classmethod
    def current(cls) -> ProcessStamp:
        pid = os.getpid()
        return cls(hostname=socket.gethostname(), pid=pid, started=process_started(pid), worker=worker_label())

    def on_this_host(self) -> bool:
        return self.hostname == socket.gethostname()

    def alive(self) -> bool | None:
        """True or False for a process of this host; None when it ran elsewhere (cannot be known here)."""
        if not self.on_this_host():
            return None
        started = process_started(self.pid)
        if started is None:
            return _pid_exists(self.pid)
        return self.started is None or abs(started - self.started) <= _START_TOLERANCE_S

    def describe(self) -> str:
        worker = f", worker {self.worker}" if self.worker else ""
        return f"pid {self.pid} on {self.hostname}{worker}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def alive_since(hostname: str, pid: int, not_after: float) -> bool | None:
    """Is `pid` on `hostname` a process that started no later than `not_after` (epoch seconds)?

    For records that kept only a pid and the time they were made (the catalog's runs): a process that
    started after the record was written is another process with the same pid.
    """
    if hostname != socket.gethostname():
        return None
    started = process_started(pid)
    if started is None:
        return _pid_exists(pid) if _boot_time() is None else False
    return started <= not_after + _START_TOLERANCE_S
