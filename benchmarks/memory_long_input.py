"""Memory: peak RSS separating a 5-minute and a 60-minute input, `stemworks separate` against the demucs CLI.

The tiny random-weight HTDemucs (memory here is about audio buffers, not the model), CPU, default
settings on both sides (shifts 1, overlap 0.25, 16-bit wav out). Inputs are 16-bit wav files made by
looping a real song from ../shared/testdata/music. Each command runs in its own wrapper process and
the peak RSS of its largest process is read from getrusage.

    python benchmarks/memory_long_input.py --work /tmp/bench-mem --out benchmarks/results/memory_long_input.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MUSIC, SR, Looped, decode_file, load, machine, timed, write_wav

MODEL = "tiny"
SONG = "Karissa_Hobbs_-_Lets_Go_Fishin.hq.ogg"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/stemworks-bench-mem"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "memory_long_input.json")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 60.0])
    parser.add_argument("--skip-demucs", action="store_true", help="measure stemworks only")
    args = parser.parse_args()
    from tasks.engine.model_repo import write_random_htdemucs

    repo = args.work / "models"
    write_random_htdemucs(repo, MODEL, "tiny", seed=0)
    song = decode_file(MUSIC / SONG)
    result: dict = {
        "machine": machine(),
        "model": "tiny random-weight HTDemucs",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "runs": [],
    }
    for minutes in args.minutes:
        source = write_wav(Looped(song, int(minutes * 60 * SR)), args.work / f"mix-{minutes:g}min.wav")
        commands = {
            "stemworks": [
                sys.executable,
                "-m",
                "flows.cli",
                "separate",
                str(source),
                "--model",
                MODEL,
                "--model-repo",
                str(repo),
                "--device",
                "cpu",
                "--out",
                str(args.work / "ours"),
                "--catalog",
                str(args.work / "catalog.duckdb"),
                "--work-dir",
                str(args.work / "tmp"),
            ]
        }
        if not args.skip_demucs:
            commands["demucs_cli"] = [
                sys.executable,
                "-m",
                "demucs.separate",
                "--repo",
                str(repo),
                "-n",
                MODEL,
                "-d",
                "cpu",
                "-o",
                str(args.work / "demucs"),
                str(source),
            ]
        for tool, command in commands.items():
            before = load()
            run = timed(command)
            run.update(tool=tool, minutes=minutes, load_before=before, load_after=load())
            result["runs"].append(run)
            print(tool, minutes, "min:", run["peak_rss_mb"], "MB", run["wall_s"], "s", flush=True)
        for folder in ("ours", "demucs"):
            shutil.rmtree(args.work / folder, ignore_errors=True)
        (args.work / "catalog.duckdb").unlink(missing_ok=True)
        source.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps([{k: r[k] for k in ("tool", "minutes", "peak_rss_mb", "wall_s")} for r in result["runs"]], indent=2)
    )


if __name__ == "__main__":
    main()
