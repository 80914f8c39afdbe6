"""CPU: end-to-end `stemworks separate` against the `demucs` CLI on the same library, in one run.

Full-size HTDemucs architecture with random weights, 8 clips of 30 s cut from ../shared/testdata/music
(as 16-bit wav: the demucs CLI reads them with sphn; there is no ffmpeg/torchaudio here), the same
settings on both sides (shifts 0 so that outputs can be compared, overlap 0.25, 16-bit wav out, CPU).
Prints and writes JSON.

    python benchmarks/cpu_vs_demucs.py --work /tmp/bench-cpu --out benchmarks/results/cpu_vs_demucs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cut_library, decode_file, load, machine, stems_sdr, timed

MODEL = "random_htdemucs_full"
STEMS = ["drums", "bass", "other", "vocals"]


def demucs_cli(repo: Path, clips: list[Path], out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "demucs.separate",
        "--repo",
        str(repo),
        "-n",
        MODEL,
        "-d",
        "cpu",
        "--shifts",
        "0",
        "--overlap",
        "0.25",
        "-o",
        str(out),
        *map(str, clips),
    ]


def stemworks_cli(repo: Path, clips: list[Path], out: Path, precision: str, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "separate",
        *map(str, clips),
        "--model",
        MODEL,
        "--model-repo",
        str(repo),
        "--device",
        "cpu",
        "--shifts",
        "0",
        "--overlap",
        "0.25",
        "--precision",
        precision,
        "--out",
        str(out),
        "--catalog",
        str(work / f"catalog-{precision}.duckdb"),
        "--work-dir",
        str(work / "tmp"),
    ]


def our_stems(out: Path) -> dict[str, np.ndarray]:
    """clip name -> (stems, 2, n) from a stemworks output folder."""
    found = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        clip = folder.name.rsplit("-", 1)[0]
        found[clip] = np.stack([decode_file(folder / f"{stem}.wav") for stem in STEMS])
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/stemworks-bench-cpu"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "cpu_vs_demucs.json")
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    from tasks.engine.model_repo import write_random_htdemucs

    repo = args.work / "models"
    write_random_htdemucs(repo, MODEL, "full", seed=0)
    clips = cut_library(args.work / "clips", args.tracks, args.seconds)
    result: dict = {
        "machine": machine(),
        "tracks": len(clips),
        "seconds_each": args.seconds,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "load": {},
    }
    runs = {
        "demucs_cli": demucs_cli(repo, clips, args.work / "demucs"),
        "stemworks_fp32": stemworks_cli(repo, clips, args.work / "fp32", "fp32", args.work),
        "stemworks_bf16": stemworks_cli(repo, clips, args.work / "bf16", "bf16", args.work),
    }
    for name, command in runs.items():
        result["load"][f"before_{name}"] = load()
        result[name] = timed(command)
        print(name, result[name]["wall_s"], "s", result[name]["peak_rss_mb"], "MB", flush=True)
    result["load"]["after"] = load()
    demucs_wall = result["demucs_cli"]["wall_s"]
    result["ratio_fp32"] = round(result["stemworks_fp32"]["wall_s"] / demucs_wall, 3)
    result["ratio_bf16"] = round(result["stemworks_bf16"]["wall_s"] / demucs_wall, 3)
    fp32, bf16 = our_stems(args.work / "fp32"), our_stems(args.work / "bf16")
    result["bf16_vs_fp32_sdr_db"] = {
        stem: round(min(stems_sdr(fp32[clip][k], bf16[clip][k]) for clip in fp32), 2) for k, stem in enumerate(STEMS)
    }
    reference = {
        clip.stem: np.stack([decode_file(args.work / "demucs" / MODEL / clip.stem / f"{stem}.wav") for stem in STEMS])
        for clip in clips
    }
    result["fp32_vs_demucs_cli_sdr_db"] = {
        stem: round(min(stems_sdr(reference[clip][k], fp32[clip][k]) for clip in fp32), 2)
        for k, stem in enumerate(STEMS)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("ratio_fp32", "ratio_bf16", "bf16_vs_fp32_sdr_db", "fp32_vs_demucs_cli_sdr_db", "load")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
