"""An evaluation report an analyst looks at: per-stem distributions (PNG) and a table comparing configurations.

Input is the catalog's evaluations of the items just evaluated (`Catalog.comparable_evaluations`): this run
and every earlier run over the same mixtures. Each configuration (`config`: model and output-shaping settings)
is represented by its most recent evaluation of each item, so reruns do not count twice.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

# The columns of the comparison table, in order: (column, heading).
TABLE_COLUMNS = (
    ("config", "configuration"),
    ("stem", "stem"),
    ("items", "items"),
    ("median_sdr", "SDR median"),
    ("mean_sdr", "SDR mean"),
    ("median_sir", "SIR median"),
    ("median_isr", "ISR median"),
    ("median_sar", "SAR median"),
    ("median_nsdr", "nSDR median"),
    ("mean_nsdr", "nSDR mean"),
    ("median_nsdr_chunk", "cSDR median"),
)
PLOT_METRICS = (("sdr", "BSSEval v4 SDR (dB)"), ("nsdr", "simple SDR, whole track (dB)"))


def latest_per_config(frame: pd.DataFrame) -> pd.DataFrame:
    """Each configuration's most recent score of each (item, stem); configurations in order of first run."""
    if frame.empty:
        return frame
    ordered = frame.sort_values(["started_at", "run_id"], kind="stable")
    latest = ordered.drop_duplicates(["config", "content_sha256", "stem"], keep="last")
    order = list(dict.fromkeys(ordered["config"]))
    return latest.assign(_order=latest["config"].map(order.index)).sort_values(["_order", "stem", "item"])


def comparison_rows(frame: pd.DataFrame, stems: list[str]) -> list[dict[str, Any]]:
    """One row per (configuration, stem): items, and median/mean of each score (None where nothing is known)."""
    latest = latest_per_config(frame)
    rows: list[dict[str, Any]] = []
    if latest.empty:
        return rows
    for config in dict.fromkeys(latest["config"]):
        mine = latest[latest["config"] == config]
        for stem in [*stems, *sorted(set(mine["stem"]) - set(stems))]:
            part = mine[mine["stem"] == stem]
            if part.empty:
                continue
            rows.append(
                {
                    "config": config,
                    "stem": stem,
                    "items": len(part),
                    "median_sdr": _stat(part["sdr"], "median"),
                    "mean_sdr": _stat(part["sdr"], "mean"),
                    "median_sir": _stat(part["sir"], "median"),
                    "median_isr": _stat(part["isr"], "median"),
                    "median_sar": _stat(part["sar"], "median"),
                    "median_nsdr": _stat(part["nsdr"], "median"),
                    "mean_nsdr": _stat(part["nsdr"], "mean"),
                    "median_nsdr_chunk": _stat(part["nsdr_chunk_median"], "median"),
                }
            )
    return rows


def _stat(values: pd.Series, how: str) -> float | None:
    known = pd.to_numeric(values, errors="coerce").dropna()
    if known.empty:
        return None
    value = float(known.median() if how == "median" else known.mean())
    return round(value, 3) if math.isfinite(value) else None


def cell(value: object) -> str:
    if value is None:
        return "–"  # noqa: RUF001 - an en dash marks "no value" in the table
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if c in ("config", "stem") else "---:" for c, _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(cell(row[c]).replace("|", "\\|") for c, _ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def distribution_png(frame: pd.DataFrame, stems: list[str], title: str) -> bytes:
    """Per stem, the distribution over items of SDR and nSDR, one box (with its points) per configuration."""
    import matplotlib as mpl

    mpl.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

    latest = latest_per_config(frame)
    configs = list(dict.fromkeys(latest["config"])) if not latest.empty else []
    columns = max(1, len(stems))
    figure, axes = plt.subplots(
        len(PLOT_METRICS), columns, figsize=(3.2 * columns + 1, 3.4 * len(PLOT_METRICS)), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for row, (metric, label) in enumerate(PLOT_METRICS):
        for col, stem in enumerate(stems):
            ax = axes[row][col]
            data = [
                pd.to_numeric(latest[(latest["config"] == c) & (latest["stem"] == stem)][metric], errors="coerce")
                .dropna()
                .to_numpy()
                for c in configs
            ]
            positions = list(range(1, len(configs) + 1))
            drawn = [(p, d) for p, d in zip(positions, data, strict=True) if len(d)]
            if drawn:
                values, places = [d for _, d in drawn], [p for p, _ in drawn]
                boxes = ax.boxplot(values, positions=places, widths=0.6, patch_artist=True)
                for (p, d), box in zip(drawn, boxes["boxes"], strict=True):
                    box.set_facecolor(colours((p - 1) % 10))
                    box.set_alpha(0.45)
                    ax.scatter([p] * len(d), d, s=12, color=colours((p - 1) % 10), zorder=3)
            ax.set_xticks(positions, [str(p) for p in positions])
            ax.set_title(stem if row == 0 else "", fontsize=10)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    legend = "\n".join(f"{i}: {c}" for i, c in enumerate(configs, start=1)) or "no scores"
    figure.suptitle(title, fontsize=11)
    figure.text(0.01, 0.005, legend, fontsize=8, va="bottom", family="monospace")
    figure.tight_layout(rect=(0, 0.04 + 0.025 * len(configs), 1, 0.95))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
