"""A finished sweep's results, written next to it, and its `best` registry entry.

results.csv / results.md   one row per trial: status, parameters, epochs, metric
heatmap.png                the best metric over Fuseformer depth x compression
curves.png                 the metric against epochs (Tune iterations), one line per trial
best.json                  the best trial (also registered: damo.train.registry)
"""

from __future__ import annotations

import csv
import io
import json
import math
import time

from damo.config import DamoConfig
from damo.storage import Storage, join
from damo.train.pipeline import one_line, storage_uri
from damo.train.registry import write_entry
from damo.tune.progress import format_value, short_name, trial_status
from damo.tune.scheduler import STAGE1_KEY
from damo.tune.space import SearchSpace
from damo.tune.trial import CHECKPOINT_KEY, has_stage1_rung, trial_stages
from damo.version import code_version

HEATMAP_X = "model.fuseformer.depth"


def trial_id_of(result) -> str:
    """A trial's id from its result (a trial that failed before reporting has only its path,
    `run_trial_<id>_<index>_...`)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    name = str(result.path).rstrip("/").rsplit("/", 1)[-1]
    return name.split("_")[2] if name.count("_") >= 2 else name


def trial_rows(cfg: DamoConfig, space: SearchSpace, grid, run_root: str) -> list[dict]:
    """One dict per trial; `history` holds (epoch, metric) of every reported epoch, and
    `stage1_val_loss` the stage-1 rung's report when the sweep has that rung."""
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "max" else -1)
    max_epochs = cfg.train.stages.get(cfg.tune.last_stage).epochs
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        records = [] if frame is None else frame.to_dict("records")
        # a table of all reports: a column a row lacks reads NaN there
        reports = [r for r in records if present(r.get(metric))]
        stage1 = [float(r[STAGE1_KEY]) for r in records if present(r.get(STAGE1_KEY))]
        iterations = max((int(r["epoch"]) for r in reports), default=0)
        best = max(reports, key=lambda r: sign * r[metric], default=None)
        status = "failed" if result.error else trial_status("TERMINATED", iterations, max_epochs)
        rows.append(
            {
                "trial_id": trial_id_of(result),
                "status": status,
                **{p.path: result.config.get(p.path) for p in space.parameters},
                "epochs": iterations,
                f"best_{metric}": None if best is None else float(best[metric]),
                "best_epoch": None if best is None else int(best["epoch"]),
                f"last_{metric}": float(reports[-1][metric]) if reports else None,
                # the grounding mIoU at that epoch, whatever the sweep optimises
                "miou_at_best": float(best["val_grounding_miou"])
                if best is not None and present(best.get("val_grounding_miou"))
                else None,
                STAGE1_KEY: stage1[-1] if stage1 else None,
                "checkpoint": storage_uri(run_root, best[CHECKPOINT_KEY])
                if best is not None and best.get(CHECKPOINT_KEY)
                else None,
                "error": one_line(result.error) if result.error else "",
                "history": [(int(r["epoch"]), float(r[metric])) for r in reports],
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def mark_stopped_runs(cfg: DamoConfig, rows: list[dict], storage: Storage) -> None:
    """A trial that the scheduler stopped was ended inside its last stage: its run's manifest
    says "stopped" there, not "running" forever or "failed"."""
    from damo.train.pipeline import read_manifest, run_uri, write_manifest

    stage = str(cfg.tune.last_stage)
    for row in rows:
        if row["status"] != "stopped early":
            continue
        run = run_uri(cfg, row["trial_id"])
        manifest = read_manifest(storage, run)
        entry = (manifest or {"stages": {}})["stages"].get(stage)
        if manifest and entry is None and row.get(STAGE1_KEY) is not None:
            # stopped at the stage-1 rung, before the later stages started
            manifest["stopped"] = (
                f"stopped by the ASHA scheduler at its stage-1 rung (stage-1 val_loss "
                f"{row[STAGE1_KEY]:.4f}); stages after 1 were not trained"
            )
            write_manifest(storage, run, manifest)
            continue
        # "running": the trial's teardown left the stage as it was; "failed": the teardown's
        # error was recorded before the trial knew it was being stopped (a fallback)
        if entry and entry.get("status") in ("running", "failed"):
            teardown = entry.pop("error", None)
            entry.update(
                status="stopped",
                note=f"stopped early by the {cfg.tune.scheduler.upper()} scheduler after "
                f"{row['epochs']} epoch(s); best checkpoint {row['checkpoint']}"
                + (f" (the stop's teardown: {teardown})" if teardown else ""),
            )
            write_manifest(storage, run, manifest)


def best_row(cfg: DamoConfig, rows: list[dict]) -> dict | None:
    key, sign = f"best_{cfg.tune.metric}", (1 if cfg.tune.mode == "max" else -1)
    scored = [r for r in rows if r[key] is not None and r["checkpoint"]]
    return max(scored, key=lambda r: (sign * r[key], -r["epochs"]), default=None)


# ---- files ---------------------------------------------------------------------------------
def table_columns(cfg: DamoConfig, space: SearchSpace) -> list[str]:
    """The results table's columns; `stage1_val_loss` only where the trials had that rung."""
    metric = cfg.tune.metric
    paths = [p.path for p in space.parameters]
    return [
        "trial_id",
        "status",
        *(p.path for p in space.parameters),
        "epochs",
        f"best_{metric}",
        "best_epoch",
        f"last_{metric}",
        "miou_at_best",
        *([STAGE1_KEY] if has_stage1_rung(cfg, trial_stages(paths, cfg)) else []),
        "checkpoint",
        "error",
    ]


def results_csv(columns: list[str], rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def results_markdown(name: str, cfg: DamoConfig, columns: list[str], rows, best) -> bytes:
    shown = [c for c in columns if c != "checkpoint"]
    header = [short_name(c) if "." in c else c for c in shown]
    lines = [
        f"# Sweep {name}",
        "",
        f"Metric: {cfg.tune.metric} ({cfg.tune.mode}), scheduler {cfg.tune.scheduler}, searcher "
        f"{cfg.tune.searcher}; {len(rows)} trials.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = ["" if row.get(c) is None else format_value(row[c]) for c in shown]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    if best:
        lines += [
            "",
            f"Best: trial {best['trial_id']}, {cfg.tune.metric} "
            f"{best[f'best_{cfg.tune.metric}']:.3f} at epoch {best['best_epoch']}, "
            f"checkpoint `{best['checkpoint']}`.",
        ]
    lines += ["", "![heat map](heatmap.png)", "", "![curves](curves.png)", ""]
    return "\n".join(lines).encode()


def heatmap_axes(space: SearchSpace) -> tuple[str, str] | None:
    """Fuseformer depth against the space's first compression parameter, when it has both."""
    varied = [p.path for p in space.parameters if p.candidates() is None or len(p.candidates()) > 1]
    compression = [p for p in varied if "compression" in p] + [
        p for p in varied if p.endswith("visual_grid")
    ]
    return (HEATMAP_X, compression[0]) if HEATMAP_X in varied and compression else None


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def heatmap_png(cfg: DamoConfig, axes: tuple[str, str], rows: list[dict]) -> bytes:
    """Each cell: the best metric of the trials at that (depth, compression); blank: none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric, sign = f"best_{cfg.tune.metric}", (1 if cfg.tune.mode == "max" else -1)
    x_path, y_path = axes
    xs = sorted({str(r[x_path]) for r in rows}, key=_numeric_first)
    ys = sorted({str(r[y_path]) for r in rows}, key=_numeric_first)
    cells = np.full((len(ys), len(xs)), np.nan)
    for row in rows:
        if row[metric] is None:
            continue
        i, j = ys.index(str(row[y_path])), xs.index(str(row[x_path]))
        if np.isnan(cells[i, j]) or sign * row[metric] > sign * cells[i, j]:
            cells[i, j] = row[metric]
    fig, ax = plt.subplots(figsize=(1.4 * len(xs) + 2.5, 0.9 * len(ys) + 2))
    image = ax.imshow(cells, cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(cells[i, j]):
                ax.text(j, i, f"{cells[i, j]:.1f}", ha="center", va="center", color="white")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(short_name(x_path))
    ax.set_ylabel(short_name(y_path))
    ax.set_title(f"{metric} (blank: no trial finished an epoch there)", fontsize=9)
    fig.colorbar(image, ax=ax)
    return png(fig)


def _numeric_first(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def curves_png(cfg: DamoConfig, rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["history"]:
            epochs, values = zip(*row["history"], strict=True)
            ax.plot(epochs, values, "o-", label=f"{row['trial_id']} ({row['status']})")
    ax.set_xlabel(f"epoch of stage {cfg.tune.last_stage} (Tune iteration)")
    ax.set_ylabel(cfg.tune.metric)
    ax.legend(fontsize=7, loc="best")
    return png(fig)


def write_results(
    cfg: DamoConfig, space: SearchSpace, name: str, uri: str, grid, storage: Storage
) -> tuple[list[dict], dict | None, dict[str, str]]:
    """Write the tables, plots and best.json next to the sweep; register the best trial."""
    from damo.tune.trial import trial_config

    rows = trial_rows(cfg, space, grid, uri)
    mark_stopped_runs(trial_config(cfg, {}, uri), rows, storage)
    columns = table_columns(cfg, space)
    best = best_row(cfg, rows)
    files = {"csv": join(uri, "results.csv"), "markdown": join(uri, "results.md")}
    storage.write_bytes(files["csv"], results_csv(columns, rows))
    storage.write_bytes(files["markdown"], results_markdown(name, cfg, columns, rows, best))
    axes = heatmap_axes(space)
    if axes:
        files["heatmap"] = join(uri, "heatmap.png")
        storage.write_bytes(files["heatmap"], heatmap_png(cfg, axes, rows))
    files["curves"] = join(uri, "curves.png")
    storage.write_bytes(files["curves"], curves_png(cfg, rows))
    entry = None
    if best is not None:
        params = {p.path: best[p.path] for p in space.parameters}
        entry = {
            "sweep": name,
            "trial_id": best["trial_id"],
            "checkpoint": best["checkpoint"],
            "metric": cfg.tune.metric,
            "mode": cfg.tune.mode,
            "value": best[f"best_{cfg.tune.metric}"],
            "epoch": best["best_epoch"],
            "params": params,
            "config": trial_config(cfg, params, uri).model_dump(mode="json"),
            "code_version": code_version(),
            "registered": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        files["best"] = join(uri, "best.json")
        storage.write_bytes(files["best"], json.dumps(entry, indent=2).encode())
        files["registry"], files["registry_latest"] = write_entry(cfg, entry, storage)
    return rows, entry, files
