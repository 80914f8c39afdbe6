"""A real Prefect server and process worker as subprocesses on loopback, for deployment tests.

Each runs in its own process group so teardown ends the server's uvicorn child and the worker's
flow-run subprocesses too, never anything else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any PREFECT_* that would point elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still there after `grace` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class RetryingTransport(httpx.HTTPTransport):
    """Retries what Prefect's own client retries: 429, 502 and 503, with exponential backoff. The
    server answers 503 when SQLite reports SQLITE_BUSY, which WAL mode returns at once (no busy
    wait) when a read transaction's upgrade to a write collides with another writer.
    Safe for the requests tests send: reads, filters, and create_flow_run with an idempotency key."""

    RETRY_CODES = frozenset({429, 502, 503})

    def __init__(self, attempts: int = 6, first_delay: float = 1.0) -> None:
        super().__init__()
        self.attempts = attempts
        self.first_delay = first_delay

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.attempts):
            response = super().handle_request(request)
            if response.status_code not in self.RETRY_CODES or attempt == self.attempts - 1:
                return response
            response.read()
            response.close()
            retry_after = response.headers.get("Retry-After", "")
            time.sleep(float(retry_after) if retry_after.isdigit() else self.first_delay * 2**attempt)
        raise AssertionError("unreachable")


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class PrefectServer:
    url: str  # http://127.0.0.1:PORT/api
    auth: str  # user:password, as PREFECT_SERVER_API_AUTH_STRING
    home: Path
    log: Path
    process: subprocess.Popen

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def client_env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            PREFECT_HOME=str(self.home / "client"), PREFECT_API_URL=self.url, PREFECT_API_AUTH_STRING=self.auth, **extra
        )

    def http(self, authenticated: bool = True) -> httpx.Client:
        user, _, password = self.auth.partition(":")
        return httpx.Client(
            base_url=self.url,
            timeout=60,
            auth=(user, password) if authenticated else None,
            transport=RetryingTransport(),
        )

    def deployment_id(self, name: str) -> str:
        with self.http() as api:
            response = api.get(f"/deployments/name/{name}")
            response.raise_for_status()
            return response.json()["id"]

    def flow_run(self, flow_run_id: str) -> dict:
        with self.http() as api:
            response = api.get(f"/flow_runs/{flow_run_id}")
            response.raise_for_status()
            return response.json()

    def wait_terminal(self, flow_run_id: str, timeout: float = 600) -> dict:
        def finished() -> dict | None:
            run = self.flow_run(flow_run_id)
            return run if run["state"]["type"] in TERMINAL else None

        return wait_for(finished, timeout, f"flow run {flow_run_id} to finish", every=2)

    def artifacts(self, flow_run_id: str) -> list[dict]:
        with self.http() as api:
            response = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
            response.raise_for_status()
            return response.json()


def start_server(home: Path, auth: str, timeout: float = 240, **extra: str) -> PrefectServer:
    """`prefect server start` on a free loopback port; `extra` environment variables, e.g.
    PREFECT_SERVER_DATABASE_CONNECTION_URL for PostgreSQL instead of SQLite in `home`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_AUTH_STRING=auth,
        PREFECT_UI_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra,
    )
    log = home / "server.log"
    process = start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log
    )
    server = PrefectServer(url=url, auth=auth, home=home, log=log, process=process)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{tail(log)}")
        return httpx.get(f"{url}/health", timeout=5).status_code == 200

    try:
        wait_for(healthy, timeout, "prefect server health")
    except BaseException:
        stop(process)
        raise
    return server


def start_worker(server: PrefectServer, pool: str, log: Path, *options: str, **env: str) -> subprocess.Popen:
    # Polls every 2 s (default 10) so tests do not idle; --limit 2 lets the UI and API runs overlap.
    worker_env = server.client_env(PREFECT_WORKER_QUERY_SECONDS="2", **env)
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "2", *options]
    return start(command, worker_env, log)
