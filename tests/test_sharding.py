"""Fan-out without a server: how tracks are split into shards, when a run separates in its own process
instead, and the catalog reads a fanned-out parent aggregates from. The real thing: tests/test_fanout.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from catalog import Catalog
from flows.pipeline.fanout import plan_fan_out, shared_parameters, source_sizes
from tasks.core.settings import FanOut, Limits, OutputSettings, SeparationSettings, ShardAssignment
from tasks.core.sharding import plan_shards, shard_count
from tests.helpers.records import make_failed, make_run, make_skipped, make_succeeded


def test_shards_split_by_count_and_balance_by_weight() -> None:
    weights = [100.0, 1, 1, 1, 1, 1, 1, 1, 50, 1, 1, 1]
    shards = plan_shards(weights, target=4)
    assert len(shards) == shard_count(12, 4) == 3
    assert sorted(i for shard in shards for i in shard) == list(range(12))  # every track, once
    assert all(shard == sorted(shard) for shard in shards)
    assert {len(shard) for shard in shards} == {4}
    loads = sorted(sum(weights[i] for i in shard) for shard in shards)
    assert loads[-1] == 103  # the 100 s mix shares its shard with three short tracks only ...
    assert 0 in shards[0] and 8 not in shards[0]  # ... and the 50 s one goes elsewhere


@pytest.mark.parametrize(("tracks", "target", "shards"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (24, 4, 6)])
def test_shard_count_is_ceil(tracks: int, target: int, shards: int) -> None:
    plan = plan_shards([None] * tracks, target)
    assert len(plan) == shards and sum(map(len, plan)) == tracks
    assert all(len(shard) <= target for shard in plan)


def test_unknown_sizes_count_as_the_median(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"x" * 1000)
    sizes = source_sizes([str(tmp_path / "a.wav"), str(tmp_path / "gone.wav"), "https://example.invalid/x.mp3"])
    assert sizes == [1000.0, None, None]
    assert sorted(map(len, plan_shards(sizes, 2))) == [1, 2]


def test_runs_outside_a_deployment_or_small_or_shards_separate_in_process() -> None:
    tracks = [f"/music/{i}.wav" for i in range(40)]
    assert plan_fan_out(tracks, FanOut(shard_tracks=4), None) is None  # not started from a deployment
    assert plan_fan_out(tracks[:4], FanOut(shard_tracks=4), None) is None
    assert plan_fan_out(tracks, FanOut(enabled=False), None) is None
    assignment = ShardAssignment(parent_run_id="p", index=0)
    assert plan_fan_out(tracks, FanOut(shard_tracks=4), assignment) is None  # a shard never fans out again


def test_shards_get_the_parents_settings_and_leave_unset_ones_to_their_deployment() -> None:
    shared = shared_parameters(
        SeparationSettings(model="tiny"), OutputSettings(out="s3://b/o"), Limits(), FanOut(), None, None, "/lake"
    )
    assert shared["separation"]["model"] == "tiny" and shared["output"]["out"] == "s3://b/o"
    assert shared["catalog_data_path"] == "/lake" and "catalog" not in shared and "work_root" not in shared


def test_the_catalog_gives_back_a_parents_shard_tracks(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.start_run(make_run("parent", flow_run_id="fr-parent"))
    for shard, flow_run in enumerate(("fr-0", "fr-1")):
        catalog.start_run(make_run(f"shard-{shard}", flow_run_id=flow_run, parent_run_id="parent", shard=shard))
    catalog.record_track("shard-0", make_succeeded("a").model_copy(update={"shard": 0, "worker": "w0"}))
    catalog.record_track("shard-0", make_failed("b").model_copy(update={"shard": 0}))
    catalog.record_track("shard-1", make_skipped("c").model_copy(update={"shard": 1, "hostname": "h"}))
    assert catalog.runs_of_flow_run("fr-1") == ["shard-1"]
    assert catalog.runs_of_flow_run("fr-1", running_only=True) == ["shard-1"]
    assert catalog.runs_of_flow_run("nope") == []
    found = catalog.tracks_of_flow_runs(["fr-0", "fr-1"])
    assert Counter(t.status for t in found) == Counter(succeeded=1, failed=1, skipped=1)
    by_status = {t.status: t for t in found}
    assert by_status["succeeded"].stems == ["bass", "drums", "other", "vocals"]
    assert (by_status["succeeded"].shard, by_status["succeeded"].worker, by_status["succeeded"].run_id) == (
        0,
        "w0",
        "shard-0",
    )
    assert by_status["skipped"].flow_run_id == "fr-1" and by_status["skipped"].stems == []
    assert catalog.tracks_of_flow_runs(["fr-parent"]) == [] and catalog.tracks_of_flow_runs([]) == []
    assert catalog.query("SELECT parent_run_id, shard FROM runs WHERE run_id = 'shard-1'")[1] == [("parent", 1)]
