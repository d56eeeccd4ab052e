"""Tiny preset: forward + backward time of one batch of 2 per stage, on CPU (budget: 2 s).

Random video features shaped as the tiny encoders make them; real tiny backbones (built once
into $DAMO_BENCH_CACHE); median of `--repeats` after one warm-up, with 1 and with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_extract import prepare

BUDGET_S = 2.0


def fwd_bwd_seconds(model, batch, stage: int, repeats: int) -> float:
    model.set_stage(stage)
    model.train()
    model(batch, stage)["loss"].backward()  # warm-up
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        model(batch, stage)["loss"].backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import torch

    from damo.config import load_config
    from damo.model.damo import DamoModel, random_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results_model.json")
    args = parser.parse_args()
    backbones, _ = prepare(12)
    cfg = load_config("tiny").model.with_backbones_at(str(backbones))
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg)
    batch = random_video(cfg, 2).as_batch()
    turns = [
        [
            {"role": "user", "content": "when is the high tone heard?"},
            {"role": "assistant", "content": "from 3.5 to 5.5 seconds."},
        ]
    ] * 2
    batch.update(model.conversation_inputs(turns))
    batch.update(model.tokenize_text(["a high tone is heard from 3.5 to 5.5 seconds."] * 2))
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for stage in (1, 2, 3, 4):
            seconds = fwd_bwd_seconds(model, batch, stage, args.repeats)
            results[f"stage{stage}_threads{threads}_s"] = seconds
            print(
                f"stage {stage}, {threads} thread(s): {seconds * 1000:.0f} ms "
                f"({BUDGET_S / seconds:.0f}x under the {BUDGET_S:.0f} s budget)"
            )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
