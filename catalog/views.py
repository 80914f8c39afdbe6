"""Views analysts query: lineage, latest outcome per content hash, failures, throughput, evaluations.

They read only the tables, so they are always as current as the last committed write. Changing one
means bumping `SCHEMA_VERSION` (with an empty migration if no table changes): views are (re)created
whenever a file is upgraded, never on a plain open, so opening a current file needs no write lock.
"""

from __future__ import annotations

from tasks.core.vocabulary import STEPS

# Each published stem file back to where it came from and what made it.
LINEAGE = """
SELECT
    s.uri              AS stem_uri,
    s.stem,
    s.format,
    s.sha256           AS stem_sha256,
    s.bytes,
    s.seconds,
    t.source,
    t.origin,
    t.content_sha256,
    t.job_key,
    t.manifest_uri,
    r.model_name,
    r.model_signature,
    r.device,
    r.parameters,
    r.code_version,
    s.run_id,
    r.flow_run_id,
    t.flow_run_id      AS track_flow_run_id,
    r.flow_name,
    r.hostname,
    t.track_id,
    t.finished_at      AS published_at,
    r.rebuilt_from
FROM stems s
JOIN tracks t ON t.track_id = s.track_id
JOIN runs r ON r.run_id = s.run_id
"""

# The most recent outcome for each distinct input (by content), with how often it was seen.
# Tracks that failed before their bytes were read have no content hash and appear only in `failures`.
TRACK_LATEST = """
SELECT
    t.content_sha256,
    t.status,
    t.source,
    t.error,
    t.error_step,
    t.manifest_uri,
    t.job_key,
    t.finished_at,
    r.model_name,
    r.model_signature,
    t.run_id,
    t.track_id,
    count(*) OVER by_content                                                   AS outcomes,
    sum(CASE WHEN t.status = 'succeeded' THEN 1 ELSE 0 END) OVER by_content    AS times_succeeded,
    -- stems exist for this content (with some model and settings, not removed since): `published` says where
    bool_or(t.status IN ('succeeded', 'skipped') AND t.manifest_uri IS NOT NULL
            AND (x.removed_at IS NULL OR x.removed_at < t.finished_at)) OVER by_content AS published
FROM tracks t
JOIN runs r ON r.run_id = t.run_id
LEFT JOIN (SELECT manifest_uri, max(removed_at) AS removed_at FROM removals GROUP BY ALL) x
       ON x.manifest_uri = t.manifest_uri
WHERE t.content_sha256 IS NOT NULL
WINDOW by_content AS (PARTITION BY t.content_sha256)
QUALIFY row_number() OVER (PARTITION BY t.content_sha256
                           ORDER BY t.finished_at DESC, t.started_at DESC, t.track_id DESC) = 1
"""

# Where each piece of work (content x model x output-shaping settings = job key) is published: the answer to
# "does this file have stems, where, made by which model?" whatever happened in later runs (reruns record
# `skipped` rows that point at the same manifest). Outputs removed by `stemworks clean` since are left out.
PUBLISHED = """
SELECT * EXCLUDE (removed_at) FROM (
SELECT
    t.content_sha256,
    t.job_key,
    t.manifest_uri,
    t.track_uri,
    r.model_name,
    r.model_signature,
    r.parameters,
    t.source                                                                     AS last_source,
    min(CASE WHEN t.status = 'succeeded' THEN t.finished_at END) OVER by_key    AS published_at,
    t.finished_at                                                                AS last_seen_at,
    count(*) OVER by_key                                                         AS times_seen,
    t.run_id                                                                     AS last_run_id,
    (SELECT max(x.removed_at) FROM removals x WHERE x.manifest_uri = t.manifest_uri) AS removed_at
FROM tracks t
JOIN runs r ON r.run_id = t.run_id
WHERE t.status IN ('succeeded', 'skipped') AND t.manifest_uri IS NOT NULL AND t.job_key IS NOT NULL
WINDOW by_key AS (PARTITION BY t.job_key)
QUALIFY row_number() OVER (PARTITION BY t.job_key
                           ORDER BY t.finished_at DESC, t.started_at DESC, t.track_id DESC) = 1
) WHERE removed_at IS NULL OR removed_at < last_seen_at
"""

# Failed tracks; `reason` is the error with the track's own source replaced, so the same problem on
# different files groups together, and `reason_count` counts the failed tracks sharing step and reason.
FAILURES = """
SELECT
    t.error_step                                       AS step,
    replace(t.error, t.source, '<source>')             AS reason,
    count(*) OVER (PARTITION BY t.error_step, replace(t.error, t.source, '<source>')) AS reason_count,
    t.source,
    t.error,
    t.content_sha256,
    t.finished_at                                      AS failed_at,
    r.model_name,
    r.hostname,
    t.run_id,
    r.flow_run_id,
    t.flow_run_id                                      AS track_flow_run_id,
    t.track_id
FROM tracks t
JOIN runs r ON r.run_id = t.run_id
WHERE t.status = 'failed'
"""

_STEP_MEANS = ",\n    ".join(f"avg(t.{step}_s) AS mean_{step}_s" for step in STEPS)

# Speed of separated (not skipped, not rebuilt) tracks per UTC day, model and device. Wall time is each
# track's own start to finish, so tracks run side by side by several processes each count in full.
THROUGHPUT = f"""
SELECT
    CAST(timezone('UTC', t.started_at) AS DATE)                         AS day,
    r.model_name,
    r.model_signature,
    r.device,
    count(*)                                                            AS tracks,
    sum(t.audio_seconds)                                                AS audio_seconds,
    sum(epoch(t.finished_at) - epoch(t.started_at))                     AS wall_seconds,
    sum(t.audio_seconds) / nullif(sum(epoch(t.finished_at) - epoch(t.started_at)), 0)
                                                                        AS audio_s_per_wall_s,
    {_STEP_MEANS}
FROM tracks t
JOIN runs r ON r.run_id = t.run_id
WHERE t.status = 'succeeded' AND t.separate_s IS NOT NULL
GROUP BY ALL
"""

# Evaluated configurations side by side: per model, settings (`config`) and stem, how many items and the
# median, mean and spread of each score. BSSEval medians ignore nulls (a silent reference leaves them null).
EVALUATION_CONFIGS = """
SELECT
    e.model_name,
    e.model_signature,
    e.config,
    e.stem,
    count(DISTINCT e.content_sha256)    AS items,
    count(*)                            AS evaluations,
    count(DISTINCT e.run_id)            AS runs,
    median(e.sdr)                       AS median_sdr,
    avg(e.sdr)                          AS mean_sdr,
    count(e.sdr)                        AS count_sdr,
    median(e.sir)                       AS median_sir,
    median(e.isr)                       AS median_isr,
    median(e.sar)                       AS median_sar,
    median(e.nsdr)                      AS median_nsdr,
    avg(e.nsdr)                         AS mean_nsdr,
    median(e.nsdr_chunk_median)         AS median_nsdr_chunk,
    min(e.evaluated_at)                 AS first_evaluated_at,
    max(e.evaluated_at)                 AS last_evaluated_at,
    any_value(e.evaluator_version)      AS evaluator_version
FROM evaluations e
GROUP BY ALL
"""

# Two evaluation runs on the same items (same mixture content, same stem): run_b is the later one, and each
# delta is b - a (positive: b separates better). One row per (pair of runs, stem).
EVALUATION_PAIRS = """
SELECT
    a.run_id                            AS run_a,
    b.run_id                            AS run_b,
    a.config                            AS config_a,
    b.config                            AS config_b,
    a.stem,
    count(*)                            AS items,
    median(a.sdr)                       AS median_sdr_a,
    median(b.sdr)                       AS median_sdr_b,
    median(b.sdr - a.sdr)               AS median_sdr_delta,
    avg(b.sdr - a.sdr)                  AS mean_sdr_delta,
    median(a.nsdr)                      AS median_nsdr_a,
    median(b.nsdr)                      AS median_nsdr_b,
    median(b.nsdr - a.nsdr)             AS median_nsdr_delta,
    avg(b.nsdr - a.nsdr)                AS mean_nsdr_delta,
    ra.started_at                       AS started_a,
    rb.started_at                       AS started_b
FROM evaluations a
JOIN evaluations b ON b.content_sha256 = a.content_sha256 AND b.stem = a.stem AND b.run_id <> a.run_id
JOIN runs ra ON ra.run_id = a.run_id
JOIN runs rb ON rb.run_id = b.run_id
WHERE ra.started_at < rb.started_at OR (ra.started_at = rb.started_at AND a.run_id < b.run_id)
GROUP BY ALL
"""

VIEWS: dict[str, str] = {
    "lineage": LINEAGE,
    "track_latest": TRACK_LATEST,
    "published": PUBLISHED,
    "failures": FAILURES,
    "throughput": THROUGHPUT,
    "evaluation_configs": EVALUATION_CONFIGS,
    "evaluation_pairs": EVALUATION_PAIRS,
}


def create_view_statements() -> list[str]:
    return [f'CREATE OR REPLACE VIEW "{name}" AS {sql.strip()}' for name, sql in VIEWS.items()]
