"""Rows of the `evaluations` table (one per run, item and stem), built like `catalog.rows` builds the others,
and the query a report compares configurations with."""

from __future__ import annotations

from typing import Any

import pandas as pd

from catalog.rows import _frame, json_text, utc
from tasks.core.evaluation import EvaluationContext, ItemEvaluation


def evaluation_frame(context: EvaluationContext, evaluation: ItemEvaluation) -> pd.DataFrame | None:
    """The validated `evaluations` rows of one scored item, or None when it has no scores."""
    if not evaluation.scores:
        return None
    parameters = json_text(context.model_dump(mode="json")["parameters"], "evaluations.parameters")
    evaluated_at = utc(context.evaluated_at, "evaluations.evaluated_at")
    rows: list[dict[str, Any]] = [
        {
            "run_id": context.run_id,
            "item": evaluation.item,
            "dataset": evaluation.dataset,
            "content_sha256": evaluation.content_sha256,
            "job_key": evaluation.job_key,
            "stem": score.stem,
            "model_name": context.model_name,
            "model_signature": context.model_signature,
            "config": context.config,
            "parameters": parameters,
            "sdr": score.sdr,
            "sir": score.sir,
            "isr": score.isr,
            "sar": score.sar,
            "nsdr": score.nsdr,
            "nsdr_chunk_median": score.nsdr_chunk_median,
            "bsseval_stable": score.bsseval_stable,
            "sample_rate": evaluation.sample_rate,
            "seconds": evaluation.seconds,
            "evaluator_version": context.evaluator_version,
            "evaluated_at": evaluated_at,
        }
        for score in evaluation.scores
    ]
    return _frame("evaluations", rows)


# Every evaluation of the given mixtures (by content), with when its run started: what a report compares.
COMPARABLE = """
SELECT e.run_id, r.started_at, e.config, e.model_name, e.item, e.content_sha256, e.stem,
       e.sdr, e.sir, e.isr, e.sar, e.nsdr, e.nsdr_chunk_median
FROM evaluations e
JOIN runs r ON r.run_id = e.run_id
WHERE list_contains(?, e.content_sha256)
ORDER BY r.started_at, e.run_id, e.item, e.stem
"""
