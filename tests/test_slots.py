"""The GPU slot: a Prefect global concurrency limit held only while separating on CUDA."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client

from tasks.core.settings import SeparationSettings
from tasks.prefect_tasks import gpu_slot

pytestmark = [pytest.mark.prefect_server, pytest.mark.usefixtures("prefect_harness")]


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


@pytest.fixture
def limit():
    name = "gpu-slots-test"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name=name, limit=1)
    yield name
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)


def test_cuda_separation_holds_one_slot_and_gives_it_back(limit: str) -> None:
    settings = SeparationSettings(device="cpu", gpu_slot_limit=limit)
    with gpu_slot(settings, device="cuda"):
        assert active_slots(limit) == 1
    assert active_slots(limit) == 0


def test_cpu_separation_never_takes_a_gpu_slot(limit: str) -> None:
    with gpu_slot(SeparationSettings(device="cpu", gpu_slot_limit=limit)):
        assert active_slots(limit) == 0


def test_missing_limit_does_not_block_a_gpu_run() -> None:
    settings = SeparationSettings(device="cpu", gpu_slot_limit="never-created")
    with gpu_slot(settings, device="cuda"):
        ran = True
    assert ran


def test_unset_limit_means_no_throttling(limit: str) -> None:
    with gpu_slot(SeparationSettings(device="cpu", gpu_slot_limit=None), device="cuda"):
        assert active_slots(limit) == 0
