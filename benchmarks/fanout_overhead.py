"""What fanning a library out over a work pool costs: wall time and Prefect API traffic, per track and per shard.

A real Prefect server on PostgreSQL (started here, behind a request counter wrapped around its ASGI app),
the `adhoc` deployment, 1, 2 and 3 `prefect worker start --pool cpu --limit 2` processes, a DuckLake catalog
in the same PostgreSQL, stems in a local folder, and the tiny random-weight model, so that orchestration is
not hidden behind separation. Each configuration separates the same library into a fresh output folder:

- `in-process`: fan-out off (one flow run separates every track; the baseline);
- `fan-out`: `shard_tracks` tracks a shard, every shard a flow run of the deployment.

Counted: HTTP requests the server answered while the run went on (by everyone: the parent, the shard runs and
the workers' polling, shown apart) and messages on its websockets (events: task-run states, heartbeats, logs
go over HTTP). The benchmark's own polling is not counted.

    python benchmarks/fanout_overhead.py --work /tmp/bench-fanout --tracks 24 --shard-tracks 4 \
        --out benchmarks/results/fanout_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
UNCOUNTED = "x-stemworks-benchmark"  # requests carrying this header (the benchmark's own) are not counted
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- the counting server (this file run with --serve) ------------------------------------------------------


def serve(port: int) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(final=True)
    counts: Counter[str] = Counter()

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] == "/__counts__":
            body = json.dumps(counts).encode()
            if scope.get("query_string") == b"reset":
                counts.clear()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        uncounted = any(name.decode() == UNCOUNTED for name, _ in scope.get("headers", []))
        if kind in ("http", "websocket") and not uncounted:
            path = _ID.sub("{id}", scope["path"])
            counts[f"{scope.get('method', 'WS')} {path}"] += 1
            if kind == "websocket":
                inner = receive

                async def receive() -> dict[str, Any]:  # every message a client sends (an event) counts
                    message = await inner()
                    if message["type"] == "websocket.receive":
                        counts[f"WS-MESSAGE {path}"] += 1
                    return message

        await app(scope, receive, send)

    uvicorn.run(counting, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


# -- the benchmark -------------------------------------------------------------------------------------------


def start_server(root: Path, database_url: str) -> tuple[subprocess.Popen, str]:
    from tests.helpers.prefect_stack import clean_env, free_port, wait_for

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = clean_env(
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=url,
        PREFECT_API_URL=url,
    )
    log = (root / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )
    wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 300, "prefect server")
    return process, url


def counts(url: str, reset: bool = False) -> Counter[str]:
    base = url.removesuffix("/api")
    response = httpx.get(f"{base}/__counts__" + ("?reset" if reset else ""), timeout=30)
    return Counter(response.json())


def trigger(api: httpx.Client, deployment_id: str, parameters: dict[str, Any]) -> str:
    response = api.post(
        f"/deployments/{deployment_id}/create_flow_run",
        json={"parameters": parameters, "idempotency_key": uuid.uuid4().hex},
    )
    response.raise_for_status()
    return response.json()["id"]


def wait_finished(api: httpx.Client, flow_run_id: str, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(flow_run_id)


def summarise(traffic: Counter[str]) -> dict[str, int]:
    polling = sum(n for key, n in traffic.items() if "/work_pools/" in key and "WS" not in key)
    messages = sum(n for key, n in traffic.items() if key.startswith("WS-MESSAGE"))
    http = sum(n for key, n in traffic.items() if not key.startswith(("WS ", "WS-MESSAGE")))
    return {"http_requests": http, "worker_polling_requests": polling, "websocket_messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-fanout"))
    parser.add_argument("--tracks", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each generated track")
    parser.add_argument("--shard-tracks", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    from catalog.ducklake import DuckLakeCatalog
    from tasks.engine.model_repo import write_random_htdemucs
    from tests.helpers.audiogen import audio_file
    from tests.helpers.postgres import PostgresServer, postgres_bin
    from tests.helpers.prefect_stack import start, stop

    root = args.work / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    bindir = postgres_bin()
    if bindir is None:
        sys.exit("PostgreSQL server binaries not found (apt-get install postgresql)")
    postgres = PostgresServer(bindir).start()
    server: subprocess.Popen | None = None
    results: list[dict[str, Any]] = []
    try:
        postgres.create_database("prefect")
        lake = "ducklake:postgres:" + postgres.create_database("lake")
        server, url = start_server(root, f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/prefect")
        from tests.helpers.prefect_stack import clean_env

        client_env = clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(root / "client"))
        subprocess.run(
            [sys.executable, "-m", "deployments.setup", "--name", "adhoc", "--no-guide", "--out", str(root / "out"),
             "--catalog", lake, "--catalog-data-path", str(root / "lake")],
            env=client_env, cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        models = root / "models"
        write_random_htdemucs(models, MODEL, "tiny", seed=0)
        library = root / "library"
        for index in range(args.tracks):
            audio_file(library, f"track {index:03d}.wav", "wav", seconds=args.seconds, seed=index)
        separation = {"model": MODEL, "model_repo": str(models), "device": "cpu", "shifts": 0}
        api = httpx.Client(base_url=url, timeout=60, headers={UNCOUNTED: "1"})
        deployment = api.get("/deployments/name/separate-library/adhoc").json()["id"]
        configurations = [("in-process", 1, False)] + [("fan-out", w, True) for w in args.workers]
        for label, workers, fan_out in configurations:
            processes = [
                start(
                    [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--limit", "2"],
                    {
                        **client_env,
                        "PREFECT_WORKER_QUERY_SECONDS": "2",
                        "STEMWORKS_WORKER": f"w{i}",
                        "STEMWORKS_WORK_DIR": str(root / f"work-{i}"),
                        "STEMWORKS_FANOUT_POLL_S": "2",
                    },
                    root / f"worker-{label}-{workers}-{i}.log",
                )
                for i in range(workers)
            ]
            try:
                time.sleep(10)  # workers registered and polling
                counts(url, reset=True)
                started = time.monotonic()
                flow_run_id = trigger(
                    api,
                    deployment,
                    {
                        "sources": [str(library)],
                        "separation": separation,
                        "output": {"out": str(root / f"out-{label}-{workers}")},
                        "fanout": {"enabled": fan_out, "shard_tracks": args.shard_tracks, "shards_at_once": 64},
                    },
                )
                run = wait_finished(api, flow_run_id)
                wall = time.monotonic() - started
                traffic = counts(url)
            finally:
                for process in processes:
                    stop(process)
            catalog = DuckLakeCatalog(lake, str(root / "lake"), read_only=True)
            (parent,) = catalog.query(f"SELECT run_id FROM runs WHERE flow_run_id = '{flow_run_id}'")[1]
            (separate_s, tracks, shards, hosts) = catalog.query(
                "SELECT sum(t.separate_s), count(*), count(DISTINCT t.run_id), count(DISTINCT t.worker) FROM tracks t "
                f"JOIN runs r ON r.run_id = t.run_id WHERE r.run_id = '{parent[0]}' OR r.parent_run_id = '{parent[0]}'"
            )[1][0]
            figures = summarise(traffic)
            result = {
                "configuration": label,
                "workers": workers,
                "state": run["state"]["type"],
                "tracks": tracks,
                "shards": shards if fan_out else 0,
                "workers_used": hosts,
                "wall_s": round(wall, 1),
                "separate_s_sum": round(separate_s or 0.0, 1),
                **figures,
                "http_per_track": round(figures["http_requests"] / max(1, tracks), 1),
                "http_per_shard": round(figures["http_requests"] / shards, 1) if fan_out and shards else None,
                "top_requests": traffic.most_common(12),
            }
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "top_requests"}), flush=True)
    finally:
        if server is not None:
            stop(server)
        postgres.stop()
    report = {"machine": machine(), "tracks": args.tracks, "shard_tracks": args.shard_tracks, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print("| configuration | workers | wall s | sum separate_s | HTTP requests | per track | per shard | "
          "of which worker polling | websocket messages |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['configuration']} | {r['workers']} | {r['wall_s']} | {r['separate_s_sum']} | {r['http_requests']} | "
            f"{r['http_per_track']} | {r['http_per_shard'] or '-'} | {r['worker_polling_requests']} | "
            f"{r['websocket_messages']} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
