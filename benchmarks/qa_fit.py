"""QA on training clips against unseen ones: does the model underfit QA, or not generalise it?

One learning-bar run's final checkpoint answers clips it trained on and clips of the same world
it never saw.

QA stays far under the bar (about 58 against 80) while grounding meets it. If the model answers
its own training clips about as badly as new ones, it underfits: the stages' budget or the
model's capacity is the limit, and more data would not help. If it answers its training clips
far better, it memorises them, and the limit is how little the world's 600 clips teach.

Three record sets, each scored as the learning bar scores its test set
(`damo.eval.batch.evaluate_checkpoint`, audio as is):
- "train": `--clips` clips of the training world's train split (every stage trained on them);
- "same world, unseen": the training world's own test split (never trained on);
- "held-out world": the bar's test set.

With `--stage4-epochs N` it also trains stage 4 again, for N epochs from the run's final
checkpoint (the bar trains it for one), and answers the same sets with that: does QA keep
climbing with more training, and what does grounding do meanwhile? `--stage4-set` changes that
stage 4's recipe as well (dotted overrides, e.g. `train.stages.stage4.optimizer.lr=1e-3`).

It reads the learning bar's cache (`benchmarks/learning_bar.py` must have run).

    .venv/bin/python benchmarks/qa_fit.py --run bar-4f256eb0-seed1
"""

from __future__ import annotations

import json
import re
import time

from position_probe import bar_run, run_arguments


def qa_and_grounding(metrics: dict) -> dict:
    """The numbers this compares: QA accuracy (all and per type) and grounding."""
    qa = metrics["qa"]["model"]
    grounding = metrics["grounding"]["model"]
    return {
        "qa_count": qa["count"],
        "qa": {k.removeprefix("accuracy/"): v for k, v in qa.items() if "accuracy" in k},
        "grounding_miou": grounding["mIoU"],
        "grounding_r1@0.5": grounding["R1@0.5"],
        "grounding_count": grounding["count"],
    }


def options(parser) -> None:
    parser.add_argument(
        "--clips", type=int, default=200, help="training clips to answer (the first by name)"
    )
    parser.add_argument(
        "--stage4-epochs",
        type=int,
        default=0,
        help="also train stage 4 for this many epochs from the final checkpoint (0: no)",
    )
    parser.add_argument(
        "--stage4-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for that stage 4 (needs --stage4-epochs)",
    )


def main() -> None:
    args = run_arguments(
        __doc__.splitlines()[0],
        "benchmarks/results_qa_fit.json",
        more=options,
    )

    import pyarrow as pa
    import pyarrow.compute as pc

    from damo.config.loader import config_hash, with_overrides
    from damo.data.extract import connect_ray
    from damo.data.records import read_records, write_records
    from damo.demo import BUCKET
    from damo.eval.batch import EvalSettings, evaluate_checkpoint
    from damo.pipeline import PipelinePlan, run_pipeline
    from damo.storage import join
    from damo.train.pipeline import read_manifest, run_uri
    from damo.version import code_version

    if args.stage4_set and not args.stage4_epochs:
        raise SystemExit("--stage4-set changes the re-trained stage 4: give --stage4-epochs too")
    started = time.monotonic()
    with bar_run(args.cache, args.run) as (storage, manifest, finished, cfg):
        if "4" not in finished:
            raise SystemExit(f"{args.run}: stage 4 has not finished")
        checkpoint = manifest["stages"]["4"]["checkpoint"]
        seed = int(manifest["config"]["seed"])
        world = join(BUCKET, "world", "records")
        scratch = join(BUCKET, "qa-fit", args.run)
        train = read_records(join(world, "train.parquet"), storage)
        videos = sorted(set(train.column("video_uri").to_pylist()))[: args.clips]
        subset = train.filter(pc.is_in(train.column("video_uri"), value_set=pa.array(videos)))
        write_records(subset.to_pylist(), join(scratch, "train-records.parquet"), storage)
        features = cfg.train.data.features
        record_sets = {  # name -> (records, their features)
            f"train ({len(videos)} clips)": (join(scratch, "train-records.parquet"), features),
            "same world, unseen (its test split)": (join(world, "test.parquet"), features),
            "held-out world (the bar's test set)": (
                join(BUCKET, args.test_world, "records", "all.parquet"),
                join(BUCKET, "features-" + args.test_world),
            ),
        }
        connect_ray(cfg, log_to_driver=False)
        checkpoints = {"the run's final checkpoint": checkpoint}
        if args.stage4_epochs:
            overrides = [f"train.stages.stage4.epochs={args.stage4_epochs}", *args.stage4_set]
            longer = with_overrides(cfg, overrides)
            run_id = f"{args.run}-stage4x{args.stage4_epochs}"
            if args.stage4_set:  # a re-used run name would return the old result (RAY_NOTES)
                run_id += "-" + config_hash({"overrides": args.stage4_set})[:8]
            run_pipeline(
                longer,
                PipelinePlan(run_id, stages=(4,), init_checkpoint=checkpoint, evaluate_split=None),
                storage,
                log=print,
            )
            trained = read_manifest(storage, run_uri(longer, run_id))["stages"]["4"]
            again = f"stage 4 again, {args.stage4_epochs} epochs"
            if args.stage4_set:
                again += " (" + " ".join(args.stage4_set) + ")"
            checkpoints[again] = trained["checkpoint"]
        results: dict[str, dict] = {}
        for which, answering in checkpoints.items():
            results[which] = {}
            for name, (records, features) in record_sets.items():
                metrics = evaluate_checkpoint(
                    cfg,
                    answering,
                    features,
                    records,
                    join(scratch, re.sub(r"[^A-Za-z0-9.]+", "-", which), name.split(" ")[0]),
                    EvalSettings(plots=0, seed=seed, tasks=("grounding", "qa")),
                    storage,
                )["metrics"]
                results[which][name] = qa_and_grounding(metrics)
                print(f"{which}, {name}: {json.dumps(results[which][name])}", flush=True)
        summary = {
            "run": args.run,
            "checkpoint": checkpoint,
            "stage4_epochs": args.stage4_epochs,
            "stage4_set": args.stage4_set,
            "code_version": code_version(),
            "results": results,
            "total_s": round(time.monotonic() - started, 1),
        }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
