"""How well a span can be guessed without hearing the clip: the synthetic world's duration prior.

The learning bar asks audio-only grounding to fall by at least half when a clip's audio is
swapped for another clip's or masked out. A model that cannot hear the event can still use what
every clip of the world has in common: how long events last and where they fall in a clip of a
given length. This script measures that floor. For each query modality (audio, visual, both) and
each clip duration, it picks the one span that scores best on a large sample of the training
world's distribution (no video, no audio, no text beyond the modality), then scores those spans
on the learning bar's held-out test world, with the metrics `damo eval` uses.

    .venv/bin/python benchmarks/grounding_prior.py            # tiny preset, ~15 s on 2 cores

Clip specs are pure functions of (seed, index), so nothing is rendered and no server is needed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from damo.config import load_config
from damo.data.synthetic import annotations, sample_clip
from damo.eval.metrics import grounding_metrics, temporal_iou_cross

MODALITIES = ("audio", "visual", "both")


def grounding_queries(seed: int, clips: int, settings) -> list[tuple[str, float, tuple]]:
    """(modality, duration, span) of every grounding record of world `seed`'s first clips."""
    out = []
    for index in range(clips):
        spec = sample_clip(
            seed,
            index,
            min_duration=settings.min_duration_s,
            max_duration=settings.max_duration_s,
            max_events=settings.max_events,
        )
        for record in annotations(spec):
            if record["task"] == "grounding":
                out.append((record["extra"]["modality"], spec.duration, tuple(record["spans"][0])))
    return out


def candidate_spans(duration: float) -> np.ndarray:
    """Every span on the world's half-second grid inside the clip: (K, 2)."""
    grid = np.arange(0.0, duration + 0.25, 0.5)
    start, end = np.meshgrid(grid, grid, indexing="ij")
    keep = end > start
    return np.stack([start[keep], end[keep]], axis=1)


def fit_prior(queries) -> dict[tuple[str, float], tuple[float, float]]:
    """The span with the most IoU >= 0.5 hits (ties: the higher mean IoU), per modality and
    duration, over the fitting sample."""
    by_key = defaultdict(list)
    for modality, duration, span in queries:
        by_key[(modality, duration)].append(span)
    prior = {}
    for (modality, duration), spans in by_key.items():
        candidates = candidate_spans(duration)
        overlap = temporal_iou_cross(candidates, np.asarray(spans))  # (K, Q)
        score = (overlap >= 0.5).mean(axis=1) + 1e-6 * overlap.mean(axis=1)
        prior[(modality, duration)] = tuple(float(x) for x in candidates[int(score.argmax())])
    return prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="the preset whose world is measured")
    parser.add_argument(
        "--fit-clips", type=int, default=20000, help="clips of the training world to fit on"
    )
    parser.add_argument(
        "--test-clips", type=int, default=200, help="the held-out world's size (the bar's test set)"
    )
    parser.add_argument(
        "--population-clips",
        type=int,
        default=5000,
        help="a larger sample of the held-out world: what the test set's numbers estimate",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_grounding_prior.json"))
    args = parser.parse_args()

    settings = load_config(args.config).data.synthetic
    prior = fit_prior(grounding_queries(settings.seed, args.fit_clips, settings))
    # the learning bar's test set is the first clips of the next seed's world, never trained on
    test_sets = {
        "test": grounding_queries(settings.seed + 1, args.test_clips, settings),
        "population": grounding_queries(settings.seed + 1, args.population_clips, settings),
    }
    results = {
        "config": args.config,
        "fit": {"world_seed": settings.seed, "clips": args.fit_clips},
        "test": {"world_seed": settings.seed + 1, "clips": args.test_clips},
        "population": {"world_seed": settings.seed + 1, "clips": args.population_clips},
        "duration_s": [settings.min_duration_s, settings.max_duration_s],
        "metrics": {},
    }
    for set_name, queries in test_sets.items():
        for name, keep in [("all", MODALITIES), *[(m, (m,)) for m in MODALITIES]]:
            chosen = [(m, d, s) for m, d, s in queries if m in keep]
            predicted = [prior[(m, d)] for m, d, _ in chosen]
            metrics = grounding_metrics(predicted, [s for _, _, s in chosen])
            results["metrics"].setdefault(set_name, {})[name] = {
                "count": len(chosen),
                "mIoU": round(metrics["mIoU"], 1),
                "R1@0.5": round(metrics["R1@0.5"], 1),
            }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| clips | queries | count | mIoU | R1@0.5 |\n|---|---|---|---|---|")
    for set_name, rows in results["metrics"].items():
        clips = results[set_name]["clips"]
        for name, row in rows.items():
            print(f"| {clips} | {name} | {row['count']} | {row['mIoU']} | {row['R1@0.5']} |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
