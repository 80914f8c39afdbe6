"""Fan-out: a library run started from a deployment splits its tracks into shards, runs each shard as a flow
run of a deployment in the same work pool (whichever worker polls takes it), waits, and aggregates.

- Each shard run is `separate-library` with the parameter `shard` set: it separates its tracks in its own
  process, as an unsharded run does, and records them under a catalog run of its own whose `parent_run_id`
  is the parent's run (its own pid and work folder, so a dead shard is told from a live one).
- Dispatch is `run_deployment(..., timeout=0)` with the idempotency key `<parent flow run>:shard-<i>:attempt-<n>`:
  a retried parent finds its shard runs instead of doubling them.
- A shard run that ends Crashed, Failed (other than `TracksFailed`) or Cancelled, or that stays Running or
  Pending without a flow-run heartbeat (`prefect.flow-run.heartbeat` events) for `FanOut.stall_s`, is marked
  Crashed (its catalog run too, its claims released) and its tracks without a recorded outcome are dispatched
  again as the next attempt; tracks it finished are not sent again, and a track it published but did not
  record is skipped by its job key (and its stems recorded then). After `FanOut.max_attempts` the tracks left
  fail, recorded by the parent.
- The parent's summary holds one outcome per track: the shard runs' catalog rows, read back by flow run id.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger, runtime
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Crashed

from catalog import Catalog
from flows.pipeline.runs import TRACKS_FAILED_STATE, StartedRun, TrackResult
from flows.pipeline.track import now
from tasks.core.records import RecordedTrack, TrackOutcome
from tasks.core.settings import FanOut, ShardAssignment
from tasks.core.sharding import plan_shards
from tasks.io.claims import read_claims, remove_claim_file
from tasks.io.locations import has_scheme, has_secret, redact
from tasks.io.storage import filesystem

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# How often the parent asks the server about its shard runs (`STEMWORKS_FANOUT_POLL_S` overrides it).
DEFAULT_POLL_S = 5.0
# Outcomes of one source recorded more than once (a shard declared lost that was in fact still going) are
# resolved to one: a separation beats a skip, a skip beats a failure; the latest wins among equals.
_RANK = {"succeeded": 0, "skipped": 1, "failed": 2}


def poll_seconds() -> float:
    try:
        return max(0.2, float(os.environ.get("STEMWORKS_FANOUT_POLL_S", DEFAULT_POLL_S)))
    except ValueError:
        return DEFAULT_POLL_S


@dataclass(frozen=True)
class FanOutPlan:
    deployment: str  # 'flow/deployment' or a deployment id
    shards: list[list[str]]


def _size(source: str) -> float | None:
    """The source's size in bytes where a cheap look-up tells it (local files, object stores), else None."""
    try:
        if not has_scheme(source):
            return float(os.stat(source).st_size)
        if source.split("://", 1)[0].lower() in ("http", "https"):
            return None  # a URL (or a page) says its size only when fetched
        fs, path = filesystem(source)
        return float(fs.size(path))
    except Exception:  # noqa: BLE001 - an unknown size counts as the typical one
        return None


def source_sizes(tracks: list[str]) -> list[float | None]:
    with ThreadPoolExecutor(8, thread_name_prefix="size") as pool:
        return list(pool.map(_size, tracks))


def plan_fan_out(tracks: list[str], fanout: FanOut, shard: ShardAssignment | None) -> FanOutPlan | None:
    """The shards to dispatch, or None when this run separates its tracks itself: it is a shard, fan-out is off,
    the tracks fit one shard, the run was not started from a deployment (CLI, Python), or a source carries
    credentials (which shard parameters would store)."""
    if shard is not None or not fanout.enabled or len(tracks) <= fanout.shard_tracks:
        return None
    own = runtime.deployment.id
    if not own:
        return None
    if any(has_secret(track) for track in tracks):
        get_run_logger().warning("sources carry credentials: not fanned out (shard parameters would store them)")
        return None
    members = plan_shards(source_sizes(tracks), fanout.shard_tracks)
    return FanOutPlan(fanout.deployment or str(own), [[tracks[i] for i in shard_members] for shard_members in members])


@dataclass
class Shard:
    """One shard: its tracks, and the flow runs that worked on it (one per attempt)."""

    index: int
    sources: list[str]
    pending: list[str]  # sources the next attempt is sent
    attempt: int = 0
    flow_run_id: str | None = None  # the current attempt's
    flow_runs: list[str] = field(default_factory=list)
    dispatched_at: float = 0.0
    waiting_warned: bool = False


@dataclass
class ShardDispatcher:
    """Dispatches shards, watches their runs, dispatches lost ones again; `run()` returns every track's result."""

    started: StartedRun
    plan: FanOutPlan
    fanout: FanOut
    parameters: dict[str, Any]  # the parent's parameters the shards share (not sources, shard)
    on_tracks_done: Callable[[int], None] = lambda count: None
    given_up: list[TrackOutcome] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return self.started.pipeline.catalog

    @property
    def run_id(self) -> str:
        return self.started.pipeline.context.run_id

    def run(self) -> list[TrackResult]:
        logger = get_run_logger()
        shards = [Shard(i, list(sources), list(sources)) for i, sources in enumerate(self.plan.shards)]
        logger.info(
            "run %s: %d tracks in %d shards (at most %d at once) on deployment %s",
            self.run_id,
            sum(len(s.sources) for s in shards),
            len(shards),
            self.fanout.shards_at_once,
            self.plan.deployment,
        )
        waiting: deque[Shard] = deque(shards)
        active: list[Shard] = []
        last_heartbeat_check = 0.0
        with get_client(sync_client=True) as client:
            while waiting or active:
                while waiting and len(active) < self.fanout.shards_at_once:
                    shard = waiting.popleft()
                    self._dispatch(shard)
                    active.append(shard)
                time.sleep(poll_seconds())
                runs = self._read_runs(client, active)
                check_heartbeats = time.monotonic() - last_heartbeat_check >= min(30.0, self.fanout.stall_s / 4)
                silent = self._silent(client, active, runs) if check_heartbeats else set()
                if check_heartbeats:
                    last_heartbeat_check = time.monotonic()
                for shard in list(active):
                    flow_run = runs.get(str(shard.flow_run_id))
                    verdict = self._verdict(shard, flow_run, silent)
                    if verdict is None:
                        continue
                    active.remove(shard)
                    if verdict != "finished":
                        self._lost(client, shard, flow_run, verdict)
                    if self._next_attempt(shard, verdict):
                        waiting.appendleft(shard)
        return self._results(shards)

    # -- dispatching and watching ----------------------------------------------------------------------

    def _dispatch(self, shard: Shard) -> None:
        shard.attempt += 1
        assignment = ShardAssignment(parent_run_id=self.run_id, index=shard.index, attempt=shard.attempt)
        parent = runtime.flow_run.id or self.run_id
        flow_run = cast(
            FlowRun,
            run_deployment(
                self.plan.deployment,
                parameters={**self.parameters, "sources": shard.pending, "shard": assignment.model_dump(mode="json")},
                idempotency_key=f"{parent}:shard-{shard.index}:attempt-{shard.attempt}",
                flow_run_name=f"{runtime.flow_run.name or 'library'}-shard-{shard.index}-{shard.attempt}",
                timeout=0,
            ),
        )  # sync call: the flow run itself (the type also admits the async variant's coroutine)
        shard.flow_run_id = str(flow_run.id)
        shard.flow_runs.append(shard.flow_run_id)
        shard.dispatched_at = time.monotonic()
        get_run_logger().info(
            "shard %d (attempt %d, %d tracks): flow run %s", shard.index, shard.attempt, len(shard.pending), flow_run.id
        )

    def _read_runs(self, client: SyncPrefectClient, active: list[Shard]) -> dict[str, FlowRun]:
        ids = [UUID(s.flow_run_id) for s in active if s.flow_run_id]
        if not ids:
            return {}
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
        return {str(run.id): run for run in found}

    def _silent(self, client: SyncPrefectClient, active: list[Shard], runs: dict[str, FlowRun]) -> set[str]:
        """Shard runs that are started (Pending or Running) for over `stall_s` without a heartbeat in that time."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.fanout.stall_s)
        candidates = []
        for shard in active:
            run = runs.get(str(shard.flow_run_id))
            if run is None or run.state is None or not (run.state.is_running() or run.state.is_pending()):
                continue
            since = run.start_time or run.state.timestamp
            if since is not None and since < horizon:
                candidates.append(str(run.id))
        if not candidates:
            return set()
        page = client.read_events(
            filter=EventFilter(
                occurred=EventOccurredFilter.model_validate(
                    {"since": horizon, "until": datetime.now(UTC) + timedelta(minutes=5)}
                ),
                event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{c}" for c in candidates], distinct=True),
            ),
            limit=max(len(candidates), 1),
        )
        beating = {event.resource.id.removeprefix("prefect.flow-run.") for event in page.events}
        return set(candidates) - beating

    def _verdict(self, shard: Shard, flow_run: FlowRun | None, silent: set[str]) -> str | None:
        """None while the shard run goes on; 'finished' once it ended (its tracks recorded); else why it is lost."""
        if flow_run is None or flow_run.state is None:
            return None
        state = flow_run.state
        # A shard run that ended `TracksFailed` finished its tracks (some failed): it is not lost.
        if state.is_completed() or (state.is_failed() and state.name == TRACKS_FAILED_STATE):
            return "finished"
        if state.is_final():
            return f"its flow run ended {state.name}: {state.message or 'no message'}"
        if str(flow_run.id) in silent:
            return f"no heartbeat for {self.fanout.stall_s:g} s (its worker died?)"
        if state.is_scheduled() and not shard.waiting_warned:
            waited = time.monotonic() - shard.dispatched_at
            if waited > self.fanout.stall_s:
                shard.waiting_warned = True
                get_run_logger().warning(
                    "shard %d has waited %.0f s for a worker: are the pool's workers busy or gone? (a worker "
                    "running this run needs --limit 2 or more to take shards too)",
                    shard.index,
                    waited,
                )
        return None

    def _lost(self, client: SyncPrefectClient, shard: Shard, flow_run: FlowRun | None, reason: str) -> None:
        """Mark a lost shard run Crashed (server and catalog) and free its job claims for the next attempt."""
        get_run_logger().warning("shard %d attempt %d lost: %s", shard.index, shard.attempt, reason)
        if flow_run is not None and flow_run.state is not None and not flow_run.state.is_final():
            client.set_flow_run_state(flow_run.id, Crashed(message=f"stemworks: {reason}"), force=True)
        if shard.flow_run_id is None:
            return
        dead = set(self.catalog.runs_of_flow_run(shard.flow_run_id, running_only=True))
        for run_id in dead:
            self.catalog.close_unfinished_run(run_id, now(), "crashed")
        if dead:
            out = self.started.pipeline.context.output.out
            for path, holder in read_claims(out):
                if holder is not None and holder.run_id in dead:
                    remove_claim_file(out, path)

    def _next_attempt(self, shard: Shard, verdict: str) -> bool:
        """Whether the shard goes out again: its tracks without an outcome, if attempts are left."""
        recorded = {t.source for t in self.catalog.tracks_of_flow_runs(shard.flow_runs)}
        missing = [s for s in shard.sources if redact(s) not in recorded]
        self.on_tracks_done(sum(1 for s in shard.pending if redact(s) in recorded))
        if not missing:
            return False
        if verdict != "finished" and shard.attempt < self.fanout.max_attempts:
            shard.pending = missing
            return True
        why = (
            f"shard {shard.index} lost {shard.attempt} time(s) ({verdict})"
            if verdict != "finished"
            else f"shard {shard.index} finished without recording this track (see its flow run's log)"
        )
        for source in missing:
            outcome = TrackOutcome(
                source=redact(source),
                status="failed",
                error=why,
                error_step="unknown",
                started_at=now(),
                finished_at=now(),
                shard=shard.index,
            )
            try:
                outcome = self.started.pipeline.record(outcome)
            except Exception as exc:  # noqa: BLE001 - still reported in the summary
                get_run_logger().error("%s could not be recorded: %s", outcome.source, exc)
            self.given_up.append(outcome)
        self.on_tracks_done(len(missing))
        return False

    # -- aggregating -------------------------------------------------------------------------------------

    def _results(self, shards: list[Shard]) -> list[TrackResult]:
        """One result per track, in the library's order: the best outcome any of its shard runs recorded."""
        rows = self.catalog.tracks_of_flow_runs([run for s in shards for run in s.flow_runs])
        best: dict[str, RecordedTrack] = {}
        for row in rows:
            held = best.get(row.source)
            if held is None or (_RANK[row.status], -row.finished_at.timestamp()) < (
                _RANK[held.status],
                -held.finished_at.timestamp(),
            ):
                best[row.source] = row
        given_up = {o.source: o for o in self.given_up}
        results: list[TrackResult] = []
        for shard in shards:
            for source in shard.sources:
                shown = redact(source)
                if shown in best:
                    results.append(TrackResult.recorded(best[shown]))
                elif shown in given_up:
                    results.append(TrackResult.of(given_up[shown]))
        return results


def shared_parameters(
    separation: Any,
    output: Any,
    limits: Any,
    fanout: FanOut,
    catalog: str | None,
    work_root: str | None,
    catalog_data_path: str | None,
) -> dict[str, Any]:
    """The parent's parameters as its shard runs get them; unset ones are left to the shard deployment."""
    shared: dict[str, Any] = {
        "separation": separation.model_dump(mode="json"),
        "output": output.model_dump(mode="json"),
        "limits": limits.model_dump(mode="json"),
        "fanout": fanout.model_dump(mode="json"),
    }
    optional = {"catalog": catalog, "work_root": work_root, "catalog_data_path": catalog_data_path}
    shared.update({name: value for name, value in optional.items() if value is not None})
    return shared
