"""GPU slots: a Prefect global concurrency limit held only while Demucs runs on a GPU.

One slot per GPU that may separate at once, counted across every worker host sharing the
server. Only the separate step holds a slot: fetching, decoding, scoring and publishing of
other tracks go on while a GPU is busy. CPU runs never touch the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

from tasks.separate import resolve_device
from tasks.settings import SeparationSettings


def needs_gpu_slot(device: str) -> bool:
    return device.startswith("cuda")


@contextmanager
def gpu_slot(settings: SeparationSettings, device: str | None = None) -> Iterator[None]:
    """Hold one slot of `settings.gpu_slot_limit` while on CUDA; do nothing on CPU or with no limit named.

    `strict=False`: on a server where the operator has not created the limit, Prefect logs
    "Concurrency limits [...] do not exist - skipping acquisition." and the step runs unthrottled,
    so a plain `stemworks separate --device cuda` still works without a Prefect setup.
    """
    device = device or resolve_device(settings.device)
    if settings.gpu_slot_limit is None or not needs_gpu_slot(device):
        yield
        return
    with concurrency(settings.gpu_slot_limit, occupy=1, strict=False):
        yield
