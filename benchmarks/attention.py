"""CPU: one full-size HTDemucs segment with Demucs's own attention and with `tasks.engine.attention`'s fused one.

Random weights, one intra-op thread (what each of the engine's CPU workers gets on 2 cores), a
7.8 s segment of real music from ../shared/testdata/music; the two variants alternate, three
times each, and the best time of each is kept. Prints seconds per segment, the ratio and the
signal-to-difference of the fused output against the unfused one.

    python benchmarks/attention.py --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MUSIC, SR, decode_file, load, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "attention.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from demucs.pretrained import get_model

    from tasks.engine.attention import fused_attention
    from tasks.engine.model_repo import write_random_htdemucs

    torch.set_num_threads(args.threads)
    repo = Path(tempfile.mkdtemp())
    write_random_htdemucs(repo, name="full", size="full")
    model = get_model("full", repo=repo).eval()
    song = decode_file(min(MUSIC.glob("*.ogg")))
    length = int(model.segment * SR)
    segment = torch.from_numpy(np.ascontiguousarray(song[:, 30 * SR : 30 * SR + length]))[None]
    segment = (segment - segment.mean()) / segment.std()
    load_before = load()
    best = {"unfused": float("inf"), "fused": float("inf")}
    outputs = {}
    with torch.inference_mode():
        model(segment)  # warm-up: first-call allocations are not the steady state
        for _ in range(args.repeats):
            for variant in best:
                with fused_attention(model) if variant == "fused" else nullcontext(0):
                    started = time.perf_counter()
                    outputs[variant] = model(segment)
                    best[variant] = min(best[variant], time.perf_counter() - started)
    reference, fused = outputs["unfused"], outputs["fused"]
    sdr = float(10 * torch.log10((reference**2).sum() / ((reference - fused) ** 2).sum()))
    report = {
        "machine": machine(),
        "threads": args.threads,
        "segment_s": float(model.segment),
        "command": " ".join(["python", "benchmarks/attention.py", *sys.argv[1:]]),
        "load": {"before": load_before, "after": load()},
        "unfused_s": round(best["unfused"], 3),
        "fused_s": round(best["fused"], 3),
        "ratio": round(best["fused"] / best["unfused"], 3),
        "sdr_fused_vs_unfused_db": round(sdr, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
