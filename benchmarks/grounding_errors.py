"""Where a run's grounding fails: the event's time, or which event the query names?

Reads the 4-stage predictions that `benchmarks/learning_bar.py` wrote for each run (held-out
test set, greedy decoding) and splits the grounding queries:
- right: IoU >= 0.5 with the query's own event (R1@0.5);
- another event: IoU < 0.5 with its own event but >= 0.5 with another event of the same clip
  (the model found an event and its time, but not the one the query names);
- overlaps: 0 < IoU < 0.5 with its own event, and no other event matched;
- no overlap: IoU 0 and no other event matched.
It also compares clips with one grounding query (one event to find) against clips with several,
counts the clips whose queries all got the same answer, and gives the R1@0.5 of the best
strategy that answers every query of a clip with one span (the clip's own span that matches the
most of its queries): a model that cannot tell which event is asked about scores at most that.
IoU is the eval's own (`damo.eval.metrics.temporal_iou_paired`), on the spans the eval parsed.

It reads the learning bar's cache through its S3 server, which it shares if a bar run is using it.

    .venv/bin/python benchmarks/grounding_errors.py --runs bar-fecd6468-seed0 bar-fecd6468-seed1
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

KINDS = ("right", "another event", "overlaps", "no overlap", "unparsed")


def classify(rows: list[dict]) -> dict:
    """The split above for one run's grounding prediction rows."""
    from damo.eval.metrics import temporal_iou_paired

    def iou(a, b) -> float:
        return float(temporal_iou_paired(np.array([a]), np.array([b]))[0])

    by_clip: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_clip[row["video_uri"]].append(row)
    kinds: dict[str, int] = dict.fromkeys(KINDS, 0)
    right_by_queries: dict[str, list[bool]] = {"one": [], "several": []}
    same_answer = several = 0
    one_span_right = []
    for clip_rows in by_clip.values():
        spans = [json.loads(row["spans"])[0] for row in clip_rows]
        for index, row in enumerate(clip_rows):
            own = spans[index]
            if row["pred_span"] is None:
                kinds["unparsed"] += 1
                right_by_queries["one" if len(spans) == 1 else "several"].append(False)
                continue
            own_iou = iou(row["pred_span"], own)
            other_iou = max(
                (iou(row["pred_span"], s) for i, s in enumerate(spans) if i != index), default=0
            )
            if own_iou >= 0.5:
                kinds["right"] += 1
            elif other_iou >= 0.5:
                kinds["another event"] += 1
            elif own_iou > 0:
                kinds["overlaps"] += 1
            else:
                kinds["no overlap"] += 1
            right_by_queries["one" if len(spans) == 1 else "several"].append(own_iou >= 0.5)
        if len(clip_rows) > 1:
            several += 1
            same_answer += len({row["prediction"] for row in clip_rows}) == 1
        best = max(spans, key=lambda s: sum(iou(s, t) >= 0.5 for t in spans))
        one_span_right += [iou(best, t) >= 0.5 for t in spans]
    count = sum(kinds.values())
    return {
        "queries": count,
        "share_%": {kind: round(100 * n / count, 1) for kind, n in kinds.items()},
        "R1@0.5, clips with one query": round(100 * np.mean(right_by_queries["one"]), 1),
        "queries in clips with one query": len(right_by_queries["one"]),
        "R1@0.5, clips with several queries": round(100 * np.mean(right_by_queries["several"]), 1),
        "queries in clips with several queries": len(right_by_queries["several"]),
        "clips with several queries, all given the same answer": f"{same_answer}/{several}",
        "best one-span-per-clip R1@0.5": round(100 * np.mean(one_span_right), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="learning-bar run ids")
    parser.add_argument("--variant", default="4-stages", help="eval folder of each run")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench")) / "learning-bar",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results_grounding_errors.json")
    )
    args = parser.parse_args()

    from damo.config import load_config
    from damo.demo import BUCKET
    from damo.storage import Storage, join
    from damo.storage.s3server import EmbeddedS3Server

    results = {}
    embedded = load_config("tiny").storage.embedded
    with EmbeddedS3Server(embedded, data_dir=str(args.cache / "storage")).shared() as state:
        storage = Storage(state.s3_config())
        for run in args.runs:
            uri = join(BUCKET, "eval", run, args.variant, "predictions.jsonl")
            if not storage.exists(uri):
                raise SystemExit(f"{run}: no {args.variant} predictions at {uri}")
            rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]
            results[run] = classify([r for r in rows if r["task"] == "grounding"])
    args.out.write_text(json.dumps({"variant": args.variant, "runs": results}, indent=2) + "\n")
    print("| run | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for kind in KINDS:
        print(
            f"| {kind} (%) | "
            + " | ".join(str(r["share_%"][kind]) for r in results.values())
            + " |"
        )
    for key in next(iter(results.values())):
        if key != "share_%":
            print(f"| {key} | " + " | ".join(str(r[key]) for r in results.values()) + " |")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
