"""The separation engine: Demucs's segmentation and overlap-add, run in batches, streamed through files.

It reproduces `demucs.apply.apply_model` (segments of `model.segment` seconds, `overlap` between
them, the triangular transition weight, centre padding/trimming, random shifts, bags of models with
per-source weights) with differences that change the result by float rounding only (>= 60 dB, tested):

* segments from one or many tracks and shift passes are run through the model in batches
  (batch size chosen from free device memory on GPU, 1 on CPU where batching was measured to hurt);
  on CPU, several segments run at once in worker threads that split the cores between them;
* the mixture is read window by window from a `.npy` on disk and finished stem windows are written
  as soon as no later segment overlaps them, so memory is bounded by the batch, not the track;
* on CUDA, inputs travel through pinned memory with asynchronous copies and the next batch is
  prepared while the current one runs; `precision` selects float32 or bf16/fp16 autocast;
* attention runs through fused `scaled_dot_product_attention` kernels (tasks/engine/attention.py).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
import torch
from demucs.apply import BagOfModels
from demucs.apply import Model as SubModel
from demucs.htdemucs import HTDemucs

from tasks.core.errors import SeparationError
from tasks.core.settings import PrecisionChoice
from tasks.engine.attention import fused_attention
from tasks.io.npyfile import NpyAudio, NpyOutput

Precision = Literal["fp32", "bf16", "fp16"]
ProgressFn = Callable[[str, float], None]
# What `demucs.pretrained.get_model` returns: one model (Demucs, HDemucs, HTDemucs) or a bag of them.
DemucsModel = BagOfModels | SubModel


class RandInt(Protocol):
    """The part of `random.Random` the plan uses; the `random` module itself qualifies."""

    def randint(self, a: int, b: int) -> int: ...


MAX_AUTO_BATCH = 64
MAX_CPU_WORKERS = 4
GPU_MEMORY_SHARE = 0.6  # of the memory free after the probe: leaves room for fragmentation and other work
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    shifts: int = 0
    overlap: float = 0.25
    segment: float | None = None
    two_stems: str | None = None
    precision: Precision = "fp32"
    batch_size: int | None = None  # None: chosen per device
    workers: int | None = None  # CPU only: segments computed at once, each on its own share of the threads


@dataclass(frozen=True)
class TrackFiles:
    """One track: its raw mixture `.npy` (engine normalises as the CLI does) and where each stem goes."""

    mixture: str
    stems: dict[str, str]
    source: str = ""


def output_names(sources: list[str], two_stems: str | None) -> list[str]:
    return list(sources) if two_stems is None else [two_stems, f"no_{two_stems}"]


def resolve_precision(requested: PrecisionChoice, device: str) -> Precision:
    """`auto` means float32 on CPU and the fastest reduced precision the GPU supports."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def transition_weight(segment_length: int) -> np.ndarray:
    """Demucs's triangle, maximal mid-segment (transition_power 1)."""
    ramp = np.concatenate(
        [np.arange(1, segment_length // 2 + 1), np.arange(segment_length - segment_length // 2, 0, -1)]
    ).astype(np.float32)
    return ramp / ramp.max()


def members(model: DemucsModel) -> tuple[list[SubModel], np.ndarray]:
    """Sub-models and their per-source weights, normalised as apply_model does (weight / total)."""
    if isinstance(model, BagOfModels):
        weights = np.asarray(model.weights, dtype=np.float64)
        # A bag holds plain models (BagOfModels.__init__ takes a list of them); ModuleList types them as Module.
        subs = cast(list[SubModel], list(model.models))
        return subs, weights / weights.sum(axis=0, keepdims=True)
    return [model], np.ones((1, len(model.sources)))


# --- the plan: which segments exist -------------------------------------------------------------


@dataclass
class TrackState:
    files: TrackFiles
    mixture: NpyAudio
    outputs: dict[str, NpyOutput]
    mean: np.float32
    std: np.float32


@dataclass
class Pass:
    """One sweep over one track by one sub-model at one shift: a full overlap-add of its own."""

    track: TrackState
    member: int
    delta: int  # the virtual (shifted) signal starts `delta` frames before the mixture
    coef: np.ndarray  # per-source share of this pass in the final stems
    segment_length: int
    stride: int
    weight: np.ndarray
    valid_length: Callable[[int], int]
    first: bool
    acc: np.ndarray | None = None
    wsum: np.ndarray | None = None
    base: int = 0

    @property
    def length(self) -> int:
        return self.track.mixture.frames + self.delta

    def offsets(self) -> range:
        return range(0, self.length, self.stride)


@dataclass
class Segment:
    pass_: Pass
    offset: int
    chunk_length: int
    input_length: int

    def read(self) -> np.ndarray:
        """The model input: mixture frames centred on the chunk, normalised, zero outside the track."""
        start = self.offset - (self.input_length - self.chunk_length) // 2 - self.pass_.delta
        track = self.pass_.track
        out = np.zeros((track.mixture.channels, self.input_length), dtype=np.float32)
        lo, hi = max(0, start), min(track.mixture.frames, start + self.input_length)
        if hi > lo:
            out[:, lo - start : hi - start] = (track.mixture.read(lo, hi) - track.mean) / track.std
        return out


def _valid_length_fn(member: SubModel, segment: float | None) -> Callable[[int], int]:
    if isinstance(member, HTDemucs) and segment is not None:
        fixed = int(segment * member.samplerate)
        return lambda length: fixed
    valid_length: Callable[[int], int] | None = getattr(member, "valid_length", None)  # HDemucs has none
    if valid_length is not None:
        return valid_length
    return lambda length: length


def mixture_stats(mixture: NpyAudio, window: int = 1 << 20) -> tuple[np.float32, np.float32]:
    """Mean and (unbiased) standard deviation of the channel mean, as the Demucs CLI normalises."""
    total, squares, count = 0.0, 0.0, 0
    for start, stop in mixture.windows(window):
        ref = mixture.read(start, stop).mean(axis=0, dtype=np.float64)
        total += float(ref.sum())
        squares += float(np.square(ref).sum())
        count += ref.size
    mean = total / count
    variance = max(0.0, (squares - count * mean * mean) / max(1, count - 1))
    return np.float32(mean), np.float32(math.sqrt(variance) + 1e-8)


def plan_passes(model: DemucsModel, tracks: list[TrackState], options: EngineOptions, rng: RandInt) -> list[Pass]:
    """Passes in execution order: sub-model major, so a batch never mixes sub-models."""
    subs, coefs = members(model)
    shifts = max(1, options.shifts)
    # Offsets are drawn up front in apply_model's order (track, sub-model, shift). They cannot match
    # the CLI's for a given seed: HTDemucs's forward also draws from `random`, once per call.
    drawn = {
        (t, m, s): (rng.randint(0, int(0.5 * sub.samplerate)) if options.shifts else None)
        for t in range(len(tracks))
        for m, sub in enumerate(subs)
        for s in range(shifts)
    }
    passes: list[Pass] = []
    for m, sub in enumerate(subs):
        segment = options.segment if options.segment is not None else float(sub.segment)
        segment_length = int(sub.samplerate * segment)
        stride = int((1 - options.overlap) * segment_length)
        weight = transition_weight(segment_length)
        valid = _valid_length_fn(sub, options.segment)
        for t, track in enumerate(tracks):
            for s in range(shifts):
                offset = drawn[(t, m, s)]
                delta = 0 if offset is None else int(0.5 * sub.samplerate) - offset
                passes.append(
                    Pass(
                        track=track,
                        member=m,
                        delta=delta,
                        coef=coefs[m] / shifts,
                        segment_length=segment_length,
                        stride=stride,
                        weight=weight,
                        valid_length=valid,
                        first=(m == 0 and s == 0),
                    )
                )
    return passes


def segments(passes: list[Pass]) -> Iterator[Segment]:
    for pass_ in passes:
        for offset in pass_.offsets():
            chunk = min(pass_.length - offset, pass_.segment_length)
            yield Segment(pass_, offset, chunk, pass_.valid_length(chunk))


# --- overlap-add and writing ---------------------------------------------------------------------


def add_segment(segment: Segment, output: np.ndarray, sources: list[str], two_stems: str | None) -> None:
    """Overlap-add one trimmed model output; write every frame no later segment can touch."""
    p = segment.pass_
    n = segment.chunk_length
    if p.acc is None or p.wsum is None:  # the first segment of the pass: both start here
        p.acc = np.zeros((output.shape[0], output.shape[1], 0), dtype=np.float32)
        p.wsum = np.zeros(0, dtype=np.float32)
        p.base = segment.offset
    end = segment.offset + n
    grow = end - (p.base + p.acc.shape[-1])
    if grow > 0:
        p.acc = np.concatenate([p.acc, np.zeros((*p.acc.shape[:2], grow), dtype=np.float32)], axis=-1)
        p.wsum = np.concatenate([p.wsum, np.zeros(grow, dtype=np.float32)])
    lo = segment.offset - p.base
    p.acc[..., lo : lo + n] += p.weight[:n] * output
    p.wsum[lo : lo + n] += p.weight[:n]
    last = segment.offset + p.stride >= p.length
    _flush(p, p.length if last else segment.offset + p.stride, sources, two_stems)


def _flush(p: Pass, upto: int, sources: list[str], two_stems: str | None) -> None:
    count = upto - p.base
    if count <= 0:
        return
    assert p.acc is not None and p.wsum is not None, "add_segment starts the accumulators before flushing"
    estimate = p.acc[..., :count] / p.wsum[:count]
    start = p.base - p.delta  # back to mixture coordinates; the shifted lead-in is dropped
    skip = max(0, -start)
    estimate, start = estimate[..., skip:], start + skip
    if estimate.shape[-1]:
        _write(p, start, estimate, sources, two_stems)
    p.acc, p.wsum, p.base = p.acc[..., count:], p.wsum[count:], upto


def _write(p: Pass, start: int, estimate: np.ndarray, sources: list[str], two_stems: str | None) -> None:
    track = p.track
    scaled = (estimate * track.std + track.mean) * p.coef[:, None, None].astype(np.float32)
    if not np.isfinite(scaled).all():
        raise SeparationError("model produced non-finite samples", source=track.files.source)
    stems = dict(zip(sources, scaled, strict=True))
    if two_stems is not None:
        rest = sum(array for name, array in stems.items() if name != two_stems)
        stems = {two_stems: stems[two_stems], f"no_{two_stems}": rest}
    for name, block in stems.items():
        if p.first:
            track.outputs[name].write(start, block)
        else:
            track.outputs[name].add(start, block)


# --- running batches ----------------------------------------------------------------------------


@dataclass
class Launched:
    segments: list[Segment]
    host: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    future: Future[torch.Tensor] | None = None


@dataclass
class Runner:
    """Runs batches; `depth` of them may be in flight while the host reads inputs and writes stems.

    CUDA: inputs go through pinned memory with asynchronous copies, outputs come back the same way.
    CPU: `depth` worker threads each run one batch with `threads` intra-op threads. Whole segments in
    parallel scale better than intra-op threads, and far better when the cores are shared (OpenMP's
    barriers stall whenever one of its threads is descheduled).
    """

    subs: list[SubModel]
    device: torch.device
    precision: Precision
    depth: int
    pool: ThreadPoolExecutor | None = None
    threads: int = 1  # CPU: the process's intra-op threads, all given to a segment that runs alone

    def widen(self) -> None:
        """Run the remaining batches one at a time on every thread (the caller has collected the rest).

        With fewer segments left than workers, some cores would idle while one thread finishes a
        segment alone: a track with an odd number of segments takes a segment's time longer.
        """
        if self.pool is not None:
            self.pool, self.depth = None, 1
            torch.set_num_threads(self.threads)

    def launch(self, batch: list[Segment]) -> Launched:
        inputs = torch.from_numpy(np.stack([segment.read() for segment in batch]))
        if self.device.type != "cuda":
            if self.pool is None:
                return Launched(batch, host=self._forward(batch, inputs))
            return Launched(batch, future=self.pool.submit(self._forward, batch, inputs))
        inputs = inputs.pin_memory().to(self.device, non_blocking=True)
        out = self._forward(batch, inputs)
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launched(batch, host=host, done=done)

    def _forward(self, batch: list[Segment], inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.subs[batch[0].pass_.member](inputs).float()

    def collect(self, launched: Launched) -> list[np.ndarray]:
        if launched.future is not None:
            launched.host = launched.future.result()
        if launched.done is not None:
            launched.done.synchronize()
        assert launched.host is not None, "launched with a host tensor or a future of one"
        array = launched.host.numpy()
        outputs = []
        for i, segment in enumerate(launched.segments):
            trim = (segment.input_length - segment.chunk_length) // 2
            outputs.append(array[i, ..., trim : trim + segment.chunk_length])
        return outputs


@contextmanager
def open_runner(model: DemucsModel, device: torch.device, options: EngineOptions) -> Iterator[Runner]:
    subs = members(model)[0]
    if device.type == "cuda":
        yield Runner(subs, device, options.precision, depth=2)
        return
    threads = torch.get_num_threads()
    workers = max(1, min(threads, options.workers or min(threads, MAX_CPU_WORKERS)))
    if workers == 1:
        yield Runner(subs, device, options.precision, depth=1)
        return
    # The intra-op thread count is process-wide; it is restored as soon as this track is done.
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="segment") as pool:
            yield Runner(subs, device, options.precision, depth=workers, pool=pool, threads=threads)
    finally:
        torch.set_num_threads(threads)


def batches(stream: Iterator[Segment], size: int) -> Iterator[list[Segment]]:
    """Consecutive segments sharing sub-model and input length, at most `size` at a time."""
    batch: list[Segment] = []
    for segment in stream:
        if batch and (
            len(batch) == size
            or segment.pass_.member != batch[0].pass_.member
            or segment.input_length != batch[0].input_length
        ):
            yield batch
            batch = []
        batch.append(segment)
    if batch:
        yield batch


def auto_batch_size(model: DemucsModel, device: torch.device, precision: Precision, segment: float | None) -> int:
    """1 on CPU (batching was measured slower there); on CUDA, from one probe segment's peak memory."""
    if device.type != "cuda":
        return 1
    subs, _ = members(model)
    sub = max(subs, key=lambda s: float(options_segment(s, segment)))
    length = int(sub.samplerate * options_segment(sub, segment))
    length = _valid_length_fn(sub, segment)(length)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = torch.zeros(1, sub.audio_channels, length, device=device)
    with torch.inference_mode(), autocast(device, precision):
        sub(probe)
    per_segment = max(1, torch.cuda.max_memory_allocated(device) - base)
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_AUTO_BATCH, free * GPU_MEMORY_SHARE // per_segment)))


def options_segment(sub: SubModel, segment: float | None) -> float:
    return segment if segment is not None else float(sub.segment)


def separate_files(
    model: DemucsModel,
    tracks: list[TrackFiles],
    options: EngineOptions,
    device: str,
    *,
    progress: ProgressFn | None = None,
    seed: int | None = None,
) -> None:
    """Separate every track's mixture `.npy` into its stem `.npy` files (shape (2, frames) float32)."""
    torch_device = torch.device(device)
    sources = list(model.sources)
    states = [_open(files, sources, options.two_stems) for files in tracks]
    try:
        passes = plan_passes(model, states, options, random.Random(seed) if seed is not None else random)
        size = options.batch_size or auto_batch_size(model, torch_device, options.precision, options.segment)
        with fused_attention(model), open_runner(model, torch_device, options) as active:
            _run(active, passes, size, sources, options.two_stems, progress)
    except RuntimeError as exc:
        retryable = "out of memory" in str(exc).lower()
        source = tracks[0].source if len(tracks) == 1 else ""
        raise SeparationError(f"model failed: {exc}", source=source, retryable=retryable) from None
    finally:
        for state in states:
            state.mixture.close()
            for output in state.outputs.values():
                output.close()


def _open(files: TrackFiles, sources: list[str], two_stems: str | None) -> TrackState:
    mixture = NpyAudio(files.mixture)
    names = output_names(sources, two_stems)
    outputs = {name: NpyOutput(files.stems[name], mixture.channels, mixture.frames) for name in names}
    mean, std = mixture_stats(mixture)
    return TrackState(files=files, mixture=mixture, outputs=outputs, mean=mean, std=std)


def _run(
    runner: Runner,
    passes: list[Pass],
    size: int,
    sources: list[str],
    two_stems: str | None,
    progress: ProgressFn | None,
) -> None:
    totals: dict[int, int] = {}
    for p in passes:
        totals[id(p.track)] = totals.get(id(p.track), 0) + len(p.offsets())
    done: dict[int, int] = dict.fromkeys(totals, 0)
    inflight: deque[Launched] = deque()
    planned = list(batches(segments(passes), size))  # segments are offsets, not audio: cheap even for hours
    tail = len(planned) % runner.depth if runner.pool is not None else 0
    # Results are taken oldest first, so each pass's overlap-add still sees its segments in order.
    for index, batch in enumerate(planned):
        if tail and index == len(planned) - tail:
            while inflight:
                _finish(runner, inflight.popleft(), sources, two_stems, progress, totals, done)
            runner.widen()
        if len(inflight) >= runner.depth:
            _finish(runner, inflight.popleft(), sources, two_stems, progress, totals, done)
        inflight.append(runner.launch(batch))
    while inflight:
        _finish(runner, inflight.popleft(), sources, two_stems, progress, totals, done)


def _finish(
    runner: Runner,
    launched: Launched,
    sources: list[str],
    two_stems: str | None,
    progress: ProgressFn | None,
    totals: dict[int, int],
    done: dict[int, int],
) -> None:
    for segment, output in zip(launched.segments, runner.collect(launched), strict=True):
        add_segment(segment, output, sources, two_stems)
        track = segment.pass_.track
        done[id(track)] += 1
        if progress is not None:
            progress(track.files.source, done[id(track)] / totals[id(track)])
