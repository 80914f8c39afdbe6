"""GPU: throughput of the engine against Demucs's `apply_model` on the same GPU, full-size HTDemucs.

A batch of tracks cut from ../shared/testdata/music, random weights (the cost does not depend on
them), shifts 0. The reference separates the tracks one by one with `apply_model` (batch of one
segment, float32, the way the demucs CLI runs); the engine gets all tracks in one call, batch size
from free memory, at each precision. Reports audio seconds per second (x real time), the speed-up,
the signal-to-difference of each precision against the float32 reference, and model FLOP
utilisation with HTDemucs's ~22 GFLOP per second of audio per pass.

    python benchmarks/gpu_throughput.py --out benchmarks/results/gpu_throughput.json
    python benchmarks/gpu_throughput.py --device cpu --size tiny --tracks 2 --seconds 20   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MUSIC, SR, decode_file, load, machine, stems_sdr

if TYPE_CHECKING:
    from tasks.engine.overlap_add import DemucsModel, Precision

GFLOP_PER_AUDIO_SECOND = 22.0
PEAK_TFLOPS = {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}  # H100 SXM dense; override with --peak-tflops


def tracks(count: int, seconds: float) -> list[np.ndarray]:
    songs = [decode_file(path) for path in sorted(MUSIC.glob("*.ogg"))]
    length = int(seconds * SR)
    out = []
    for i in range(count):
        song = songs[i % len(songs)]
        index = (np.arange(length) + i * SR) % song.shape[1]
        out.append(np.ascontiguousarray(song[:, index]))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference(model: DemucsModel, mixes: list[np.ndarray], device: str) -> tuple[float, list[np.ndarray]]:
    from demucs.apply import apply_model

    outs = []
    sync(device)
    started = time.perf_counter()
    for mix in mixes:
        wav = torch.from_numpy(mix)
        ref = wav.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        with torch.inference_mode():
            out = apply_model(model, ((wav - mean) / std)[None], shifts=0, split=True, overlap=0.25, device=device)
        outs.append((out[0] * std + mean).cpu().numpy())
    sync(device)
    return time.perf_counter() - started, outs


def engine(
    model: DemucsModel, paths: list[Path], work: Path, device: str, precision: Precision, batch_size: int | None
) -> tuple[float, list[np.ndarray]]:
    from tasks.engine.overlap_add import EngineOptions, TrackFiles, separate_files

    files = [TrackFiles(str(p), {s: str(work / f"{p.stem}-{precision}-{s}.npy") for s in model.sources}) for p in paths]
    options = EngineOptions(shifts=0, precision=precision, batch_size=batch_size)
    sync(device)
    started = time.perf_counter()
    separate_files(model, files, options, device)
    sync(device)
    wall = time.perf_counter() - started
    return wall, [np.stack([np.load(f.stems[s]) for s in model.sources]) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--tracks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, help="default: chosen from free memory")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense peak for the precision used")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "gpu_throughput.json")
    args = parser.parse_args()
    from demucs.pretrained import get_model

    from tasks.engine.model_repo import write_random_htdemucs

    work = Path(tempfile.mkdtemp(prefix="stemworks-gpu-"))
    write_random_htdemucs(work, "bench", args.size, seed=0)
    model = get_model("bench", repo=work).to(args.device).eval()
    mixes = tracks(args.tracks, args.seconds)
    paths = []
    for i, mix in enumerate(mixes):
        paths.append(work / f"track{i:02d}.npy")
        np.save(paths[-1], mix)
    audio_seconds = args.tracks * args.seconds
    engine(model, paths[:1], work, args.device, "fp32", args.batch_size)  # warm-up: kernels, allocator
    ref_wall, ref_out = reference(model, mixes, args.device)
    result: dict = {
        "machine": machine(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tracks": args.tracks,
        "seconds_each": args.seconds,
        "model_size": args.size,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "load_before": load(),
        "reference_apply_model": {"wall_s": round(ref_wall, 3), "x_realtime": round(audio_seconds / ref_wall, 1)},
    }
    for precision in args.precisions:
        wall, out = engine(model, paths, work, args.device, precision, args.batch_size)
        flops = GFLOP_PER_AUDIO_SECOND * 1e9 * audio_seconds / wall
        peak = (args.peak_tflops or PEAK_TFLOPS[precision]) * 1e12
        result[precision] = {
            "wall_s": round(wall, 3),
            "x_realtime": round(audio_seconds / wall, 1),
            "speedup_vs_apply_model": round(ref_wall / wall, 2),
            "mfu": round(flops / peak, 4),
            "sdr_vs_apply_model_fp32_db": round(
                min(
                    stems_sdr(r[k], o[k]) for r, o in zip(ref_out, out, strict=True) for k in range(len(model.sources))
                ),
                1,
            ),
        }
        print(precision, result[precision], flush=True)
    result["load_after"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
