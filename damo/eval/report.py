"""The evaluation report: a Markdown page with the metrics beside their chance baselines and
timeline plots (ground-truth span vs predicted span on the clip's time axis) for a sample."""

from __future__ import annotations

import io
import json

from damo.storage import Storage, join

PERCENT_KEYS = (
    "R1@0.3",
    "R1@0.5",
    "R1@0.7",
    "mIoU",
    "accuracy",
    "event_accuracy",
    "span_mIoU",
    "span_R1@0.5",
    "joint_accuracy",
    "R@1",
    "R@5",
    "R@10",
)


def timeline_png(row: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = float(row["duration"])
    truth = json.loads(row["spans"])[0]
    fig, ax = plt.subplots(figsize=(7, 1.6))
    ax.broken_barh([(truth[0], truth[1] - truth[0])], (1.1, 0.8), color="tab:green")
    if row.get("pred_span"):
        start, end = row["pred_span"]
        ax.broken_barh([(start, max(end - start, duration / 200))], (0.1, 0.8), color="tab:blue")
    else:
        ax.text(duration / 2, 0.5, "unparsable answer", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, duration)
    ax.set_ylim(0, 2)
    ax.set_yticks([0.5, 1.5], ["predicted", "ground truth"])
    ax.set_xlabel("seconds")
    ax.set_title(f"{row['query']}  (IoU {row.get('iou', 0.0):.2f})", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return ""
    percent = key in PERCENT_KEYS or key.startswith("accuracy/")
    return f"{value:.1f}" if percent else f"{value:g}"


def metrics_table(metrics: dict) -> str:
    """One Markdown table per task: rows are the model and its baselines; QA accuracy per
    question type gets its own columns."""
    parts = []
    for task, variants in metrics.items():
        per_type = sorted({k for v in variants.values() for k in v if k.startswith("accuracy/")})
        keys = [
            k
            for k in (*PERCENT_KEYS, *per_type, "median_rank", "unparsable", "count")
            if any(k in v for v in variants.values())
        ]
        parts.append(f"### {task}\n\n| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, values in variants.items():
            parts.append(f"| {name} | " + " | ".join(_cell(values, k) for k in keys) + " |")
        parts.append("")
    return "\n".join(parts)


def write_report(result: dict, rows: list[dict], out_uri: str, storage: Storage, plots: int) -> str:
    grounding = [r for r in rows if r["task"] == "grounding"]
    sample = grounding[:: max(1, len(grounding) // plots)][:plots] if plots else []
    images = []
    for index, row in enumerate(sample):
        name = f"plots/timeline_{index:02d}.png"
        storage.write_bytes(join(out_uri, name), timeline_png(row))
        images.append(f"![{row['query']}]({name})")
    run = result["run"]
    text = "\n".join(
        [
            "# DaMO evaluation report",
            "",
            "Percentages; every metric sits beside its chance baselines. Unparsable answers count",
            "as IoU 0 and are reported in `unparsable`.",
            "",
            metrics_table(result["metrics"]),
            "## Run",
            "",
            *(f"- **{k}**: `{v}`" for k, v in run.items()),
            "",
            "## Grounding timelines (green: ground truth, blue: prediction)",
            "",
            *images,
            "",
        ]
    )
    uri = join(out_uri, "report.md")
    storage.write_bytes(uri, text.encode())
    return uri
