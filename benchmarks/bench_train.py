"""Training throughput: cached features vs decoding on the fly; 1 vs 2 Ray Train workers.

Part 1 (one process, stage 3, same batches): a training step on cached features (the
platform's path) against the same step preceded by decoding the clips and running the frozen
encoders (what a pipeline without a feature cache does every epoch).
Part 2 (Ray Train, stage 3, `--steps` optimiser steps): samples/s reported by the training loop
with 1 worker (1 CPU) and with 2 workers (0.5 CPU each) on this machine.
Reuses the world, backbones and features that `bench_extract.py` leaves in $DAMO_BENCH_CACHE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench_extract import CACHE, prepare, tiny_config


def step_loop(cfg, table, steps: int, batch_size: int, on_the_fly: bool) -> float:
    """Samples/s of `steps` stage-3 training steps (after 2 warm-up steps)."""
    import numpy as np
    import torch

    from damo.data.extract import EncodeFeatures, decode_videos, feature_config_hash
    from damo.data.training import StageCollator
    from damo.model.damo import DamoModel

    torch.manual_seed(0)
    model = DamoModel.from_config(cfg.model)
    params = model.set_stage(3)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    collate = StageCollator("lm", model.conversation_inputs, model.tokenize_text)
    encode = EncodeFeatures(cfg, feature_config_hash(cfg), cfg.storage.s3) if on_the_fly else None
    conversation = json.dumps(
        [
            {"role": "user", "content": "when is the high tone heard?"},
            {"role": "assistant", "content": "from 1.0 to 3.5 seconds."},
        ]
    )
    rows = len(table["video_uri"])
    elapsed = 0.0
    for step in range(steps + 2):
        index = np.arange(step * batch_size, (step + 1) * batch_size) % rows
        started = time.perf_counter()
        if on_the_fly:
            uris = table["video_uri"][index]
            batch = encode(decode_videos({"key": uris, "video_uri": uris}, cfg))
        else:
            batch = {k: v[index] for k, v in table.items()}
        batch["conversation"] = np.array([conversation] * batch_size)
        losses = model(collate(batch), 3)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            elapsed += time.perf_counter() - started
    return steps * batch_size / elapsed


def ray_train_rate(cfg, world: Path, features: Path, workers: int, steps: int) -> float:
    from damo.storage import Storage
    from damo.train.pipeline import read_stage_metrics, run_uri, train_pipeline

    run_id = f"bench-{workers}w-{int(time.time())}"
    cfg = tiny_config(
        Path(cfg.model.vision.path).parent,
        [
            f"train.runs_root={CACHE / 'runs'}",
            f"train.data.features={features}",
            f"train.data.records={world / 'records'}",
            f"train.scaling.num_workers={workers}",
            f"train.scaling.cpus_per_worker={1.0 / workers}",
            f"train.stages.stage3.max_steps={steps}",
            "train.stages.stage3.log_every=5",
            "train.stages.stage3.batch_size=8",
        ],
    )
    train_pipeline(cfg, run_id, stages=(3,), storage=Storage(), log=lambda *_: None)
    rows = read_stage_metrics(Storage(), run_uri(cfg, run_id), 3)
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # skip warm-up
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray-steps", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results_train.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from damo.data.extract import connect_ray, extract_features, feature_config_hash
    from damo.data.training import read_feature_table, table_to_numpy
    from damo.storage import Storage

    backbones, uris = prepare(args.clips)
    cfg = tiny_config(backbones, ["ray.num_cpus=2", "ray.object_store_memory_mb=512"])
    features = CACHE / f"features-{args.clips}"
    connect_ray(cfg)
    extract_features(uris, str(features), cfg)  # skips what is already there
    table = table_to_numpy(read_feature_table(str(features), Storage(), feature_config_hash(cfg)))
    cached = step_loop(cfg, table, args.steps, args.batch_size, on_the_fly=False)
    fly = step_loop(cfg, table, args.steps, args.batch_size, on_the_fly=True)
    world = CACHE / f"world-{args.clips}"
    one = ray_train_rate(cfg, world, features, 1, args.ray_steps)
    two = ray_train_rate(cfg, world, features, 2, args.ray_steps)
    results = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "cached_samples_per_s": cached,
        "on_the_fly_samples_per_s": fly,
        "cached_over_on_the_fly": cached / fly,
        "ray_1_worker_samples_per_s": one,
        "ray_2_workers_samples_per_s": two,
        "two_over_one_worker": two / one,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
