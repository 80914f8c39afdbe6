"""Set up a fresh (or existing) Prefect server for stemworks; safe to run again.

    python -m deployments.setup [--gpu-slots N] [--out DIR|s3://...] [--catalog FILE|ducklake:...]
                                [--catalog-data-path DIR|s3://...] [--library-root DIR]

1. work pools `cpu` and `gpu` (process type) unless they exist;
2. the global concurrency limit that GPU separations hold (one slot per GPU), created or resized;
3. `prefect deploy --all` from the repository root, with the variables prefect.yaml reads filled in;
4. prints what each worker host needs (`--no-guide` leaves it out): the variables, and the worker command.

Talks to the server in PREFECT_API_URL (with PREFECT_API_AUTH_STRING when the server wants auth).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from tasks.core.settings import SeparationSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_POOLS = ("cpu", "gpu")
# The name the flows acquire, taken from the settings so setup and flows cannot drift apart.
DEFAULT_GPU_SLOT_LIMIT: str = SeparationSettings.model_fields["gpu_slot_limit"].default


@dataclass(frozen=True)
class SetupPlan:
    gpu_slots: int
    gpu_slot_limit: str
    code_dir: Path
    out: str
    catalog: str
    library_root: str
    deploy: bool
    names: tuple[str, ...]
    catalog_data_path: str = ""  # a DuckLake catalog's data files; "" for a DuckDB file
    guide: bool = True  # print what each worker host needs

    def deploy_env(self) -> dict[str, str]:
        """The variables prefect.yaml's `{{ $NAME }}` placeholders are resolved from."""
        return {
            "STEMWORKS_CODE_DIR": str(self.code_dir),
            "STEMWORKS_OUT": self.out,
            "STEMWORKS_CATALOG": self.catalog,
            "STEMWORKS_CATALOG_DATA_PATH": self.catalog_data_path,
            "STEMWORKS_LIBRARY_ROOT": self.library_root,
        }


def ensure_work_pools(names: tuple[str, ...] = WORK_POOLS) -> dict[str, str]:
    """Create missing process pools; leave existing ones (and their settings) alone."""
    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                done[name] = "exists"
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        description=f"stemworks {name} hosts",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                done[name] = "created"
    return done


def ensure_gpu_slots(name: str, slots: int) -> None:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name=name, limit=slots)


def deploy(plan: SetupPlan) -> None:
    selection = [arg for name in plan.names for arg in ("--name", name)] or ["--all"]
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *selection]
    subprocess.run(command, cwd=plan.code_dir, env={**os.environ, **plan.deploy_env()}, check=True)


def host_guide(plan: SetupPlan, api_url: str | None = None) -> str:
    """What every worker host runs: the same checkout, these variables, one worker per pool (fan-out shards
    of a library run go to whichever worker of the pool polls; a worker also running the parent needs
    --limit 2 or more). No secret is printed: the auth string and credentials are named, not shown."""
    lines = [
        "On each worker host (same checkout at the same path, project installed):",
        f"  cd {plan.code_dir}",
        f"  export PREFECT_API_URL={api_url or '<the server URL>/api'}",
        "  export PREFECT_API_AUTH_STRING=<the server's auth string>",
        "  export STEMWORKS_WORKER=<a name for this worker, recorded per track>",
        "  export STEMWORKS_WORK_DIR=<local scratch folder>",
        "  export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... [AWS_ENDPOINT_URL=...]   # for s3:// stems",
        "  export PGPASSWORD=...   # or ~/.pgpass, when the catalog is a DuckLake in PostgreSQL",
        "  prefect worker start --pool cpu --limit 2     # GPU hosts: --pool gpu --limit <GPUs>",
        f"Every host reaches the same stems ({plan.out}), catalog ({_shown(plan.catalog)})",
        f"and DuckLake data path ({plan.catalog_data_path or 'none set'}): the deployments' defaults.",
    ]
    return "\n".join(lines)


def _shown(catalog: str) -> str:
    return re.sub(r"password=\S+", "password=***", catalog)


def run(plan: SetupPlan, *, guide: bool = True) -> None:
    for pool, state in ensure_work_pools().items():
        print(f"work pool {pool}: {state}")
    ensure_gpu_slots(plan.gpu_slot_limit, plan.gpu_slots)
    print(f"global concurrency limit {plan.gpu_slot_limit}: {plan.gpu_slots} slot(s)")
    if plan.deploy:
        deploy(plan)
    if guide:
        print(host_guide(plan, os.environ.get("PREFECT_API_URL")))


def parse(argv: list[str] | None = None) -> SetupPlan:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gpu-slots",
        type=int,
        default=int(env("STEMWORKS_GPU_SLOTS", "1")),
        help="GPUs that may separate at once, over all GPU hosts (default 1)",
    )
    parser.add_argument("--gpu-slot-limit", default=DEFAULT_GPU_SLOT_LIMIT, help="name of the concurrency limit")
    parser.add_argument(
        "--code-dir",
        type=Path,
        default=Path(env("STEMWORKS_CODE_DIR", REPO_ROOT)),
        help="checkout of this repository, at the same path on every worker host",
    )
    parser.add_argument("--out", default=env("STEMWORKS_OUT"), help="stems destination (default CODE_DIR/separated)")
    parser.add_argument(
        "--catalog",
        default=env("STEMWORKS_CATALOG"),
        help="DuckDB catalog file, or a shared DuckLake 'ducklake:postgres:...' (default CODE_DIR/stemworks.duckdb)",
    )
    parser.add_argument(
        "--catalog-data-path",
        default=env("STEMWORKS_CATALOG_DATA_PATH", ""),
        help="a DuckLake catalog's data files: a folder every host reaches, or s3://bucket/prefix",
    )
    parser.add_argument(
        "--library-root",
        default=env("STEMWORKS_LIBRARY_ROOT"),
        help="what the nightly run scans (default CODE_DIR/library)",
    )
    parser.add_argument("--no-deploy", action="store_true", help="only pools and limits")
    parser.add_argument("--no-guide", action="store_true", help="do not print what each worker host needs")
    parser.add_argument("--name", action="append", default=[], help="deploy only this deployment (repeatable)")
    args = parser.parse_args(argv)
    if args.gpu_slots < 1:
        parser.error("--gpu-slots must be at least 1")
    code_dir = args.code_dir.resolve()
    return SetupPlan(
        gpu_slots=args.gpu_slots,
        gpu_slot_limit=args.gpu_slot_limit,
        code_dir=code_dir,
        out=args.out or str(code_dir / "separated"),
        catalog=args.catalog or str(code_dir / "stemworks.duckdb"),
        library_root=args.library_root or str(code_dir / "library"),
        catalog_data_path=args.catalog_data_path,
        deploy=not args.no_deploy,
        names=tuple(args.name),
        guide=not args.no_guide,
    )


def main(argv: list[str] | None = None) -> None:
    plan = parse(argv)
    run(plan, guide=plan.guide)


if __name__ == "__main__":
    main()
