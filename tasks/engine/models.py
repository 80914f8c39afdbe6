"""Demucs models: resolve the device, load a model once per process, and sign its weights."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.pretrained import get_model
from demucs.repo import ModelLoadingError

from tasks.core.errors import ConfigurationError
from tasks.core.records import ModelInfo
from tasks.core.settings import SeparationSettings
from tasks.engine.overlap_add import DemucsModel, EngineOptions, Precision, resolve_precision

# Where `get_model` downloads pretrained models from: the HuggingFace hub first, then Demucs's own files.
MODEL_HUB_HOSTS = ("huggingface.co", "dl.fbaipublicfiles.com")
HUB_PROBE_TIMEOUT_S = 3.0


def _can_connect(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the model hubs answer within `timeout` seconds (name lookup included, which a plain
    connect timeout does not bound: the probe runs in a daemon thread and is abandoned when late)."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_can_connect(MODEL_HUB_HOSTS[0], timeout)), daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answer and answer[0])


def offline_help(name: str) -> str:
    """What to do when `name` cannot be downloaded: the exact commands, so nobody has to guess."""
    return (
        f"Without network access, load models from a local Demucs model repository: "
        f"`stemworks separate SOURCE... --model-repo DIR --model {name}` (DIR holds {name}-<sha8>.th files "
        f"or a {name}.yaml bag). To try the pipeline without pretrained weights: "
        f"`stemworks model random models --name random_htdemucs --size full`, then "
        f"`stemworks separate SOURCE... --model-repo models --model random_htdemucs`."
    )


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was requested but no CUDA device is available")
    return requested


@functools.lru_cache(maxsize=2)
def _load(name: str, repo: str | None, device: str) -> tuple[DemucsModel, ModelInfo]:
    # Cached per process: a worker keeps one model on its device across all the tracks it serves.
    if repo is not None and not Path(repo).is_dir():
        raise ConfigurationError(f"model repository {repo} is not a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_model(name, repo=Path(repo) if repo else None)
    except (ModelLoadingError, SystemExit) as exc:
        where = f"repository {repo}" if repo else "the Demucs hub (pass --model-repo DIR to load offline)"
        raise ConfigurationError(f"could not load model '{name}' from {where}: {exc}") from None
    except OSError as exc:  # urllib's URLError included: no network, or the hub is down
        reason = getattr(exc, "reason", None) or exc
        raise ConfigurationError(
            f"could not download model '{name}' ({reason}) and it is not in the local "
            f"model cache. {offline_help(name)}",
            retryable=True,
        ) from None
    model.to(device).eval()
    info = ModelInfo(
        name=name,
        signature=model_signature(model),
        sources=list(model.sources),
        sample_rate=int(model.samplerate),
        audio_channels=int(model.audio_channels),
    )
    return model, info


def load_model(settings: SeparationSettings) -> tuple[DemucsModel, ModelInfo, str]:
    """Return the (cached) model, its description and the device it lives on."""
    device = resolve_device(settings.device)
    model, info = _load(settings.model, settings.model_repo, device)
    _check_two_stems(settings, info)
    return model, info, device


def model_signature(model: DemucsModel) -> str:
    """sha256 over architecture and weights, so any change of weights changes the job key."""
    digest = hashlib.sha256()
    members = model.models if isinstance(model, BagOfModels) else [model]
    for member in members:
        digest.update(type(member).__name__.encode())
        for key, tensor in sorted(member.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if isinstance(model, BagOfModels):
        digest.update(np.asarray(model.weights, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def _check_two_stems(settings: SeparationSettings, info: ModelInfo) -> None:
    if settings.two_stems is not None and settings.two_stems not in info.sources:
        raise ConfigurationError(
            f"two_stems '{settings.two_stems}' is not a source of model '{info.name}' ({', '.join(info.sources)})"
        )


def precision_for(settings: SeparationSettings, device: str) -> Precision:
    """The precision a run on `device` uses; part of the job key because it changes the output."""
    return resolve_precision(settings.precision, device)


def engine_options(settings: SeparationSettings, device: str) -> EngineOptions:
    return EngineOptions(
        shifts=settings.shifts,
        overlap=settings.overlap,
        segment=settings.segment,
        two_stems=settings.two_stems,
        precision=precision_for(settings, device),
        batch_size=settings.batch_size,
    )
