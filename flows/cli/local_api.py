"""The Prefect API of a CLI run without PREFECT_API_URL: a temporary server this process starts and stops.

Prefect's own ephemeral server is a child in the CLI's process group, so Ctrl-C in the terminal stops it at the
same moment as the CLI, which then spends minutes retrying a dead API while it unwinds (and cannot report its
run's end). This one runs in a session of its own: Ctrl-C reaches the CLI alone, the run is closed as
`cancelled` through a server that is still there, and the server is stopped at exit. It still dies with the CLI
(Linux: the parent-death signal), so a CLI killed outright leaves no server behind.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.pipeline.workarea import prefect_scratch_prefix

# A busy machine (several runs starting at once on 2 cores) can take longer than Prefect's default 20 s.
EPHEMERAL_STARTUP_TIMEOUT_S = 300
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextmanager
def prefect_api_of_this_process() -> Iterator[None]:
    """Without PREFECT_API_URL, a temporary Prefect API server for this process, with a database of its own.

    By default every temporary server uses the one SQLite file in PREFECT_HOME: several `stemworks
    separate` started at once then contend for it while starting, and time out. The run's record is the
    catalog; Prefect's database of a CLI run is scratch and is removed at the end. A database the user
    configured (PREFECT_SERVER_DATABASE_CONNECTION_URL) is used instead of the scratch one.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    updates: dict[Any, Any] = {}
    configured = {"PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"} & set(os.environ)
    if not configured:
        scratch = Path(tempfile.mkdtemp(prefix=prefect_scratch_prefix()))  # by process: `clean` finds a dead one's
        updates[PREFECT_SERVER_DATABASE_CONNECTION_URL] = f"sqlite+aiosqlite:///{scratch / 'prefect.db'}"
        # Removed at exit, after the server has stopped (atexit runs handlers last-registered first).
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    with temporary_settings(updates=updates):
        server = _detached_server()
        # Stopped at exit (`start` registers it): after Prefect's log handler has sent its last records, which
        # it does at exit too, later-registered handlers running first.
        server.start(timeout=EPHEMERAL_STARTUP_TIMEOUT_S)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield


def _detached_server() -> Any:
    """Prefect's temporary-server class, its process started in a new session that dies with this one."""
    from prefect.server.api.server import SubprocessASGIServer

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect
            from prefect.settings import get_current_settings

            # As SubprocessASGIServer runs it (prefect 3.8.8), plus the session and the parent-death signal.
            command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
            command += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
            command += ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            env = {
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            # preexec_fn: started before the run starts its threads, and the child only calls prctl
            return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent())  # noqa: PLW1509

    return DetachedServer()


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` asking Linux to SIGTERM the child when its parent dies; None elsewhere. The libc function
    is looked up here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def request() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return request
