"""Where a shape's place is lost: linear probes from the encoder features to the LLM's input.

Position questions ("where is the yellow square?") stay at chance (25%) on the learning bar.
This asks each representation on the way to the LLM whether it still holds the answer: a
linear probe (logistic regression) is trained on the training world's videos and scored on the
held-out world's, for the quadrant, the colour and the shape of each clip's first shape (the
colour is the control: the model answers colour questions well above chance; the shape says
whether the frozen encoder's features hold what shape questions ask).

Representations, in the order the model computes them:
- the frozen encoder's patches at the first shape's middle frame, pooled to the residual's grid
  (tiny: 2 x 2) as the model pools them (what the pathway could know at best, told where to look);
- the same cells sorted by their norm, so their place in the grid is lost (does the content
  alone carry the place? CLIP adds position embeddings before its layers);
- every frame's pooled cells (everything the pathway reads, not told where to look);
- inside the pathway, for an untrained pathway and after each stage of a learning-bar run: the
  visual temporal module's cells at the first shape's frame, the Fuseformer's fusion tokens, and
  the bridge's query states (the soft prompt before the LLM projection).

A run still training is probed at the stages it has finished, through the bar's S3 server if it
is up (it serves one data dir at a time).

It reads the learning bar's cache (`benchmarks/learning_bar.py` must have run): its embedded
S3, the two worlds' features and records, and one run's checkpoints.

    .venv/bin/python benchmarks/position_probe.py --run bar-f30d4915-seed0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

QUADRANTS = ("in the top left.", "in the top right.", "in the bottom left.", "in the bottom right.")
WHERE = re.compile(r"where is the (\w+) (\w+)\?")
WHEN = re.compile(r"when does the (\w+) (\w+) appear\?")
PROBED = ("quadrant", "colour", "shape")
TENSOR_COLUMNS = ("visual_features", "audio_features", "frame_times", "segment_bounds")


def first_shapes(records: list[dict]) -> dict[str, dict]:
    """video_uri -> the first shape to appear: its colour, shape, quadrant and span."""
    places: dict[tuple[str, str, str], str] = {}
    spans: dict[str, list[tuple[float, float, str, str]]] = {}
    for record in records:
        if record["task"] == "qa" and (match := WHERE.fullmatch(record["query"] or "")):
            places[(record["video_uri"], *match.groups())] = record["answer"]
        if record["task"] == "grounding" and (match := WHEN.fullmatch(record["query"] or "")):
            start, end = record["spans"][0]
            spans.setdefault(record["video_uri"], []).append((start, end, *match.groups()))
    first = {}
    for video, events in spans.items():
        start, end, colour, shape = min(events)
        place = places.get((video, colour, shape))
        if place in QUADRANTS:
            first[video] = {
                "colour": colour,
                "shape": shape,
                "quadrant": place,
                "span": (start, end),
            }
    return first


def read_features(
    storage, features_uri: str, feature_hash: str, videos: set[str], shapes: dict
) -> dict:
    """video_uri -> its current feature row, its tensor columns in `shapes`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from damo.data.training import select_feature_rows

    selection = select_feature_rows(features_uri, storage, feature_hash, videos)
    rows = {}
    for path in sorted({path for path, _ in selection.chosen.values()}):
        table = pq.read_table(path, filesystem=selection.filesystem)
        keys = [key for p, key in selection.chosen.values() if p == path]
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys)))
        for row in table.to_pylist():
            for name, shape in shapes.items():
                row[name] = np.asarray(row[name], dtype=np.float32).reshape(shape)  # were flat
            rows[row["video_uri"]] = row
    return rows


def shape_frame(row: dict, target: dict) -> int:
    """The frame nearest the middle of the first shape's span."""
    start, end = target["span"]
    return int(np.argmin(np.abs(row["frame_times"] - (start + end) / 2)))


def pooled_cells(visual: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(T, 1+P, Dv) encoder output -> (T, rows x cols, Dv): the patches normalised and
    average-pooled in 2-D as the model's residual pools them (before its learned layers)."""
    import torch
    import torch.nn.functional as F

    from damo.model.video import patch_grid

    patches = torch.as_tensor(visual[:, 1:]).float()  # (T, P, Dv)
    frames, count, dim = patches.shape
    patches = F.layer_norm(patches, (dim,)).transpose(1, 2)  # (T, Dv, P)
    cells = F.adaptive_avg_pool2d(patches.reshape(frames, dim, *patch_grid(count)), grid)
    return cells.flatten(2).transpose(1, 2).numpy()  # (T, rows x cols, Dv)


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 400) -> float:
    """Held-out accuracy of a logistic regression (standardised inputs, weight decay)."""
    import torch

    torch.manual_seed(0)
    train_x, test_x = torch.as_tensor(train_x).float(), torch.as_tensor(test_x).float()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    linear = torch.nn.Linear(train_x.shape[1], int(max(train_y.max(), test_y.max())) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean()) * 100


def run_arguments(description: str, out: str, more=None) -> argparse.Namespace:
    """The options of a script that reads one learning-bar run from the bar's cache; `more`
    adds a script's own to the parser."""
    parser = argparse.ArgumentParser(description=description)
    if more is not None:
        more(parser)
    parser.add_argument("--run", required=True, help="a learning-bar run id (its checkpoints)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench")) / "learning-bar",
    )
    parser.add_argument("--test-world", default="heldout-1-200", help="the held-out world's name")
    parser.add_argument("--out", type=Path, default=Path(out))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args


@contextlib.contextmanager
def bar_run(cache: Path, run: str):
    """(storage, manifest, finished stages, config) of a learning-bar run, through the bar's
    S3 server: the running one if a bar run uses it (left up), else one started for this."""
    from damo.config import DamoConfig, load_config
    from damo.demo import BUCKET
    from damo.storage import Storage, join
    from damo.storage.s3server import EmbeddedS3Server
    from damo.train.pipeline import read_manifest

    embedded = load_config("tiny").storage.embedded
    with EmbeddedS3Server(embedded, data_dir=str(cache / "storage")).shared() as state:
        storage = Storage(state.s3_config())
        manifest = read_manifest(storage, join(BUCKET, "runs", run))
        finished = sorted(
            s for s, e in (manifest or {}).get("stages", {}).items() if "checkpoint" in e
        )
        if not finished:
            raise SystemExit(f"{run}: no run of that name with a finished stage in {cache}")
        cfg = DamoConfig.model_validate(manifest["config"])
        # the manifest's copy of the config has its secret redacted: the server's own
        cfg = cfg.model_copy(
            update={"storage": cfg.storage.model_copy(update={"s3": state.s3_config()})}
        )
        yield storage, manifest, finished, cfg


def feature_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The stored (flat) feature columns' shapes for this config."""
    from damo.model.backbones import vision_geometry

    visual_dim, _ = vision_geometry(cfg.model.vision)
    return {
        "visual_features": (cfg.model.frames, -1, visual_dim),
        "audio_features": (cfg.model.audio_segments, -1, cfg.model.audio.arch["d_model"]),
        "frame_times": (cfg.model.frames,),
        "segment_bounds": (cfg.model.audio_segments, 2),
    }


def main() -> None:
    args = run_arguments(__doc__.splitlines()[0], "benchmarks/results_position_probe.json")

    import torch

    from damo.data.extract import feature_config_hash
    from damo.data.synthetic import load_world_records
    from damo.data.training import video_tensors
    from damo.demo import BUCKET
    from damo.eval.batch import load_model
    from damo.model.backbones import vision_geometry
    from damo.model.damo import DamoModel
    from damo.model.video import VideoFeatures, patch_grid
    from damo.storage import join
    from damo.version import code_version

    torch.set_num_threads(1)
    started = time.monotonic()
    with bar_run(args.cache, args.run) as (storage, manifest, finished, cfg):
        feature_hash = feature_config_hash(cfg)
        worlds = {
            "train": (join(BUCKET, "world"), join(BUCKET, "features")),
            "test": (
                join(BUCKET, args.test_world),
                join(BUCKET, "features-" + args.test_world),
            ),
        }
        visual_dim, patches = vision_geometry(cfg.model.vision)
        grid = cfg.model.residual.visual_pool_grid(*patch_grid(patches))
        cells = f"{grid[0]}x{grid[1]} cells"
        shapes = feature_shapes(cfg)
        data = {}
        for split, (world, features) in worlds.items():
            records = load_world_records(world, storage).to_pylist()
            targets = first_shapes(records)
            rows = read_features(storage, features, feature_hash, set(targets), shapes)
            videos = sorted(set(targets) & set(rows))
            data[split] = {"videos": videos, "targets": targets, "rows": rows}
            print(f"{split}: {len(videos)} videos with a placed first shape", flush=True)

        def labels(split: str, what: str) -> np.ndarray:
            d = data[split]
            if what == "quadrant":
                return np.array([QUADRANTS.index(d["targets"][v]["quadrant"]) for v in d["videos"]])
            values = sorted({t[what] for s in data.values() for t in s["targets"].values()})
            return np.array([values.index(d["targets"][v][what]) for v in d["videos"]])

        def encoder_cells(split: str, view: str) -> np.ndarray:
            d, out = data[split], []
            for video in d["videos"]:
                row = d["rows"][video]
                cells = pooled_cells(row["visual_features"], grid)  # (T, L', Dv)
                if view == "all frames":
                    out.append(cells.reshape(-1))
                    continue
                cells = cells[shape_frame(row, d["targets"][video])]  # (L', Dv)
                if view == "frame, cells sorted by norm":
                    cells = cells[np.argsort(-np.linalg.norm(cells, axis=1))]
                out.append(cells.reshape(-1))
            return np.stack(out)

        def pathway_states(split: str, model) -> dict[str, np.ndarray]:
            """The visual temporal module's cells at the first shape's frame, the fusion
            tokens and the query states, each flattened per video."""
            d = data[split]
            out: dict[str, list] = {"temporal": [], "fusion": [], "query": []}
            seen: dict[str, torch.Tensor] = {}
            hooks = [
                model.pathway.visual_temporal.register_forward_hook(
                    lambda _m, _i, o: seen.__setitem__("temporal", o[0])  # (B, T', L', D)
                ),
                model.pathway.fuseformer.register_forward_hook(
                    lambda _m, _i, o: seen.__setitem__("fusion", o)  # (B, F, D)
                ),
            ]
            try:
                for begin in range(0, len(d["videos"]), 32):
                    names = d["videos"][begin : begin + 32]
                    chunk = [d["rows"][v] for v in names]
                    batch = {k: [r[k] for r in chunk] for k in (*TENSOR_COLUMNS, "has_audio")}
                    video = VideoFeatures.from_batch(video_tensors(batch))
                    with torch.no_grad():
                        query = model.pathway.query_states(video)  # (B, K, D)
                    temporal = seen["temporal"]
                    frames = torch.tensor(
                        [shape_frame(r, d["targets"][v]) for v, r in zip(names, chunk, strict=True)]
                    )
                    # a strided temporal module keeps fewer steps than frames
                    steps = (frames * temporal.shape[1] // cfg.model.frames).clamp(
                        max=temporal.shape[1] - 1
                    )
                    at_frame = temporal[torch.arange(len(names)), steps]  # (B, L', D)
                    out["temporal"].append(at_frame.flatten(1).numpy())
                    out["fusion"].append(seen["fusion"].flatten(1).numpy())
                    out["query"].append(query.flatten(1).numpy())
            finally:
                for hook in hooks:
                    hook.remove()
            return {k: np.concatenate(v) for k, v in out.items()}

        representations = {
            f"encoder: first shape's frame, {cells} ({visual_dim} each)": lambda s: encoder_cells(
                s, "frame"
            ),
            "encoder: first shape's frame, cells sorted by norm (grid place lost)": lambda s: (
                encoder_cells(s, "frame, cells sorted by norm")
            ),
            f"encoder: all {cfg.model.frames} frames, {cells}": lambda s: encoder_cells(
                s, "all frames"
            ),
        }
        torch.manual_seed(cfg.seed)
        models = {
            "untrained pathway": DamoModel.from_config(
                cfg.model, pretrained=False, with_llm=False
            ).eval()
        }
        for stage in finished:
            checkpoint = manifest["stages"][stage]["checkpoint"]
            models[f"after stage {stage}"] = load_model(checkpoint, storage, with_llm=False)
        states: dict[tuple[str, str], dict[str, np.ndarray]] = {}

        def pathway(split: str, when: str, which: str) -> np.ndarray:
            if (split, when) not in states:
                states[split, when] = pathway_states(split, models[when])
            return states[split, when][which]

        for label, which in (
            ("temporal cells at the first shape's frame", "temporal"),
            ("fusion tokens", "fusion"),
            ("query states", "query"),
        ):
            for when in models:
                representations[f"{label}: {when}"] = lambda s, w=when, k=which: pathway(s, w, k)
        results = {}
        for name, represent in representations.items():
            train_x, test_x = represent("train"), represent("test")
            results[name] = {
                what: round(
                    probe_accuracy(train_x, labels("train", what), test_x, labels("test", what)), 1
                )
                for what in PROBED
            }
            results[name]["dims"] = int(train_x.shape[1])
            print(f"{name}: {results[name]}", flush=True)
        summary = {
            "run": args.run,
            "code_version": code_version(),
            "train_videos": len(data["train"]["videos"]),
            "test_videos": len(data["test"]["videos"]),
            "majority": {
                what: round(float(100 * np.bincount(counts).max() / len(counts)), 1)
                for what in PROBED
                for counts in [labels("test", what)]
            },
            "probes": results,
            "total_s": round(time.monotonic() - started, 1),
        }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"majority answer: {summary['majority']}; results in {args.out}")


if __name__ == "__main__":
    main()
