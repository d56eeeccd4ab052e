"""The learning bar: does the tiny preset learn the synthetic world, and does each part matter?

Everything goes through the platform's own pipeline (`damo.pipeline.run_pipeline`, as
`make demo` and `jobs/pipeline.py` run it), only bigger:
  embedded S3 server -> tiny backbones -> synthetic world (--clips) -> Ray Data extraction
  -> the 4-stage Ray Train run; a second pipeline makes and extracts the held-out world; then
  Ray Data batch evaluation on it.
Then the ablations, each evaluated the same way:
  - audio swapped at inference: each test video hears the audio of the test video nearest in
    duration (does the model use the sound of *this* clip?);
  - audio masked at inference (the model was trained with `model.drop_audio_prob` of its
    videos silent, so this is a case it knows);
  - stage 3 skipped (stage 4 trained from the stage-2 checkpoint; the paper's Table 5);
  - stage 4 skipped (the 4-stage run's stage-3 checkpoint);
  - stage-1 text->video retrieval (the stage-1 checkpoint, every test video of the training
    world a candidate).
Every number sits beside its chance baselines (whole-clip span, random span, majority answer,
random ranking). With --seeds the training runs once per seed (same world, same backbones) and
every number is the mean and standard deviation over seeds.

The test set is a held-out world (--test-clips clips of another world seed, never trained on,
not even its text in the tiny LLM's pre-training). At 200 clips the whole-set numbers move by
less than 3 points between test sets (362 grounding queries: one standard error ~2.6 points;
1,418 QA questions: ~1.3); a per-modality or per-type number on ~120 queries moves by ~4.5
(benchmarks/grounding_prior.py measures one: 29.5 on these clips, 35.6 on 5,000). The split
sizes are printed and stored.

The training budget is the tiny preset's recipe plus BUDGET below and --clips / --lm-steps.
Re-running with the same arguments resumes: clips, features, backbones and finished stages are
kept in --cache. Results go to benchmarks/results_learning_bar.json and, as Markdown, to stdout.

Seeds run apart (on two machines, or a cut-off run's seeds re-run later) are combined with
--combine A.json B.json: the files must share the budget and the code version (--mixed-code
accepts commits whose damo/ differs in nothing that moves a number), and each seed may appear
once; the bars are recomputed over all their seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

# The training budget (epochs over the train split of a 600-clip world: 480 captions, ~4,000
# QA, ~4,900 stage-3 rows, ~9,400 stage-4 rows). The recipe itself (what each stage trains, at
# which learning rate) is the tiny preset's (damo/config/named/tiny.yaml).
BUDGET = [
    "train.stages.stage1.epochs=20",
    "train.stages.stage2.epochs=1",
    "train.stages.stage3.epochs=5",
    "train.stages.stage4.epochs=1",
    "train.scaling.num_workers=1",
    "ray.num_cpus=2",
]
BARS = {  # metric path in the 4-stage metrics, threshold (higher is better)
    "grounding mIoU": (("grounding", "model", "mIoU"), 50.0),
    "grounding R1@0.5": (("grounding", "model", "R1@0.5"), 50.0),
    "audio-only R1@0.5": (("grounding", "model/audio_only", "R1@0.5"), 40.0),
    "QA accuracy": (("qa", "model", "accuracy"), 80.0),
}
# variant -> (checkpoint key, audio ablation at inference)
VARIANTS = {
    "4 stages": ("full", "as_is"),
    "4 stages, audio swapped": ("full", "swap"),
    "4 stages, audio masked": ("full", "mask"),
    "stage 3 skipped (1, 2, 4)": ("skip3", "as_is"),
    "stage 4 skipped (1, 2, 3)": ("stage3", "as_is"),
}
COLUMNS = [
    ("grounding mIoU", ("grounding", "{v}", "mIoU")),
    ("grounding R1@0.5", ("grounding", "{v}", "R1@0.5")),
    ("audio-only R1@0.5", ("grounding", "{v}/audio_only", "R1@0.5")),
    ("visual-only R1@0.5", ("grounding", "{v}/visual_only", "R1@0.5")),
    ("QA acc.", ("qa", "{v}", "accuracy")),
    ("temporal QA event", ("temporal_qa", "{v}", "event_accuracy")),
    ("temporal QA span mIoU", ("temporal_qa", "{v}", "span_mIoU")),
]


def dig(metrics: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def fmt(value) -> str:
    if isinstance(value, dict):  # mean and std over seeds
        if value.get("mean") is None:
            return "-"
        return f"{value['mean']:.1f} ± {value['std']:.1f}" if value["n"] > 1 else fmt(value["mean"])
    return "-" if value is None else f"{value:.1f}"


def over_seeds(values: list) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present)), "n": len(present)}


def seed_stat(per_seed: list[dict], path: tuple[str, ...]) -> dict:
    return over_seeds([dig(metrics, path) for metrics in per_seed])


def markdown(results: dict) -> str:
    """The README tables: one row per variant, baselines in their own rows, mean ± std."""
    lines = [
        "| variant | " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    seeds = results["seeds"]
    for name in VARIANTS:
        per_seed = [results["per_seed"][str(seed)]["variants"][name]["metrics"] for seed in seeds]
        cells = [
            fmt(seed_stat(per_seed, tuple(p.format(v="model") for p in path)))
            for _, path in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = results["per_seed"][str(seeds[0])]["variants"]["4 stages"]["metrics"]
    for baseline, key in (
        ("chance: whole-clip span", "baseline_whole_clip"),
        ("chance: random span", "baseline_random_span"),
        ("chance: majority answer", "baseline_majority_answer"),
        ("chance: majority event, whole clip", "baseline_majority_event_whole_clip"),
    ):
        cells = [fmt(dig(first, tuple(p.format(v=key) for p in path))) for _, path in COLUMNS]
        lines.append(f"| {baseline} | " + " | ".join(cells) + " |")
    per_type = sorted(k for k in first["qa"]["model"] if k.startswith("accuracy/"))
    per_seed = [results["per_seed"][str(s)]["variants"]["4 stages"]["metrics"] for s in seeds]
    lines += ["", "| QA question type | 4 stages | majority answer |", "|---|---|---|"]
    for key in per_type:
        model = seed_stat(per_seed, ("qa", "model", key))
        base = dig(first, ("qa", "baseline_majority_answer", key))
        lines.append(f"| {key.split('/', 1)[1]} | {fmt(model)} | {fmt(base)} |")
    retrieval = [results["per_seed"][str(s)]["stage1_retrieval"] for s in seeds]
    candidates = retrieval[0]["model"]["candidates"]
    lines += [
        "",
        f"Stage-1 text->video retrieval among {candidates} test videos: "
        f"R@1 {fmt(over_seeds([r['model']['R@1'] for r in retrieval]))}, "
        f"R@5 {fmt(over_seeds([r['model']['R@5'] for r in retrieval]))}, "
        f"median rank {fmt(over_seeds([r['model']['median_rank'] for r in retrieval]))} "
        f"(random ranking: R@1 {retrieval[0]['baseline_random']['R@1']:.1f}).",
        "",
        f"Test set: {results['test_set']}.",
    ]
    return "\n".join(lines)


def stage_summary(manifest: dict) -> dict[str, dict]:
    """Stage -> its training metrics and wall seconds, from a run's manifest."""
    return {k: v["metrics"] | {"wall_s": v["wall_s"]} for k, v in manifest["stages"].items()}


def bars(results: dict) -> dict[str, dict]:
    """Each bar of the issue, on the mean over seeds: the value, the threshold, whether met."""
    seeds = results["seeds"]

    def variant(name: str) -> list[dict]:
        return [results["per_seed"][str(s)]["variants"][name]["metrics"] for s in seeds]

    out = {
        name: {
            "value": seed_stat(variant("4 stages"), path),
            "threshold": threshold,
            "lower_is_better": False,
        }
        for name, (path, threshold) in BARS.items()
    }
    audio = out["audio-only R1@0.5"]["value"]["mean"]
    for ablation in ("swapped", "masked"):
        value = seed_stat(
            variant(f"4 stages, audio {ablation}"), ("grounding", "model/audio_only", "R1@0.5")
        )
        out[f"audio-only R1@0.5 with audio {ablation} <= half"] = {
            "value": value,
            "threshold": None if audio is None else audio / 2,
            "lower_is_better": True,
        }
    for key in sorted(k for k in variant("4 stages")[0]["qa"]["model"] if "/" in k):
        out[f"QA {key.split('/', 1)[1]}"] = {
            "value": seed_stat(variant("4 stages"), ("qa", "model", key)),
            "threshold": 80.0,
            "lower_is_better": False,
        }
    retrieval = [results["per_seed"][str(s)]["stage1_retrieval"]["model"] for s in seeds]
    out["stage-1 retrieval R@1 (>= 50 candidates)"] = {
        "value": over_seeds([r["R@1"] if r["candidates"] >= 50 else None for r in retrieval]),
        "threshold": 50.0,
        "lower_is_better": False,
    }
    for bar in out.values():
        value, threshold = bar["value"]["mean"], bar["threshold"]
        bar["met"] = (
            value is not None
            and threshold is not None
            and (value <= threshold if bar["lower_is_better"] else value >= threshold)
        )
    return out


def test_set_summary(metrics: dict, clips: int, seed: int) -> str:
    return (
        f"{clips} clips of world seed {seed} (never trained on): "
        f"{dig(metrics, ('grounding', 'model', 'count'))} grounding queries "
        f"({dig(metrics, ('grounding', 'model/audio_only', 'count'))} audio-only, "
        f"{dig(metrics, ('grounding', 'model/visual_only', 'count'))} visual-only, "
        f"{dig(metrics, ('grounding', 'model/audio_visual', 'count'))} audio-visual), "
        f"{dig(metrics, ('qa', 'model', 'count'))} QA questions, "
        f"{dig(metrics, ('temporal_qa', 'model', 'count'))} temporal QA"
    )


def backbones_tag(model, lm_steps: int) -> str:
    """Backbones depend on their configs and on the LM's pre-training: key a cache on both, so
    that a recipe override (trainable sets, the pathway's sizes) reuses them and an arch
    override builds new ones (a cached directory's saved config would win silently)."""
    from damo.config.loader import config_hash
    from damo.config.model import BACKBONES

    configs = {name: getattr(model, name).model_dump(mode="json") for name in BACKBONES}
    return config_hash({"backbones": configs, "lm": lm_steps})[:8]


def code_diff(versions: list[str]) -> str:
    """`git diff --stat` of the model's code (damo/) between the first and each other version."""
    import subprocess

    stats = []
    for version in versions[1:]:
        diff = subprocess.run(
            ["git", "diff", "--stat", versions[0], version, "--", "damo"],
            capture_output=True,
            text=True,
        )
        stats.append(f"{versions[0]}..{version}: {(diff.stdout or diff.stderr).strip() or 'none'}")
    return "\n".join(stats)


def combine(files: list[Path], mixed_code: bool = False) -> dict:
    """One result of several runs' files: the same budget and code, disjoint seeds.

    Runs at different commits combine only with `mixed_code`, after the caller has read what
    differs in damo/ (printed in the error) and judged that it cannot move a number."""
    runs = [json.loads(path.read_text()) for path in files]
    same = ("clips", "test_clips", "lm_steps", "max_steps", "overrides", "test_set")
    for path, run in zip(files[1:], runs[1:], strict=True):
        differ = [key for key in same if run[key] != runs[0][key]]
        if differ:
            raise SystemExit(f"error: {path} differs from {files[0]} in {', '.join(differ)}")
    versions = {
        variant["run"]["code_version"]
        for run in runs
        for seed in run["per_seed"].values()
        for variant in seed["variants"].values()
    }
    if len(versions) != 1 and not mixed_code:
        raise SystemExit(
            f"error: the runs were evaluated by different code: {sorted(versions)}; what differs "
            f"in damo/:\n{code_diff(sorted(versions))}\n"
            "pass --mixed-code if none of it can change a result"
        )
    seeds = [seed for run in runs for seed in run["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: a seed appears in more than one file: {seeds}")
    timings: dict[str, float] = {}
    for run in runs:  # steps shared by all seeds (the world, backbones) keep the first run's time
        timings = run["timings_s"] | timings
    results = {key: runs[0][key] for key in (*same, "cpus")}
    results |= {
        "seeds": seeds,
        "per_seed": {str(s): run["per_seed"][str(s)] for run in runs for s in run["seeds"]},
        "timings_s": timings,
        "total_s": round(sum(run["total_s"] for run in runs), 1),
        "code_versions": sorted(versions),
        "combined_from": [
            {"file": str(path), "seeds": run["seeds"], "total_s": run["total_s"]}
            for path, run in zip(files, runs, strict=True)
        ],
    }
    results["bars"] = bars(results)
    return results


def report(results: dict, out: Path) -> None:
    console = Console()
    console.print(markdown(results), markup=False, highlight=False)
    for name, bar in results["bars"].items():
        console.print(
            f"{'MET ' if bar['met'] else 'MISS'} {name}: {fmt(bar['value'])} "
            f"(bar {fmt(bar['threshold'])})",
            markup=False,
        )
    console.print(f"total {results['total_s']:.0f}s; results in {out}")


def add_overrides_option(
    parser: argparse.ArgumentParser,
    help: str = "more dotted config overrides",
    metavar: str | None = None,
) -> None:
    """`--set A=1 B=2 --set C=3`: a repeated --set adds to the earlier ones (with
    `nargs="*"` alone the last one silently won)."""
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar=metavar,
        help=f"{help} (repeat --set or list several after one)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=600, help="training world size")
    parser.add_argument(
        "--test-clips", type=int, default=200, help="held-out world size (the test set)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--lm-steps", type=int, default=600, help="tiny LLM pre-training")
    parser.add_argument("--max-steps", type=int, default=None, help="cap per stage (smoke runs)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench")) / "learning-bar",
    )
    add_overrides_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_learning_bar.json"))
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="combine the result files of runs with different seeds into --out (trains nothing)",
    )
    parser.add_argument(
        "--mixed-code",
        action="store_true",
        help="let --combine join runs made at different commits (it lists what differs first)",
    )
    args = parser.parse_args()
    if args.combine:
        results = combine(args.combine, args.mixed_code)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        report(results, args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from damo.config import load_config
    from damo.config.loader import with_overrides
    from damo.data.extract import feature_config_hash
    from damo.data.records import write_records
    from damo.data.synthetic import load_world_records
    from damo.demo import BUCKET, DemoSize, demo_config
    from damo.eval.batch import EvalSettings, evaluate_checkpoint, retrieval
    from damo.pipeline import PipelinePlan, run_pipeline
    from damo.storage import Storage, join
    from damo.storage.s3server import EmbeddedS3Server
    from damo.train.pipeline import read_manifest, run_uri, training_hash
    from damo.version import code_version

    console = Console()
    started = time.monotonic()
    timings: dict[str, float] = {}

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    def pipeline(cfg, plan: PipelinePlan, name: str) -> dict:
        """`damo.pipeline` as `make demo` runs it; each step's seconds go into the timings."""
        console.rule(f"[bold]{name}")
        state = run_pipeline(cfg, plan, storage, log=log)
        for step, entry in state["steps"].items():
            timings[f"{name}: {step}"] = entry.get("wall_s", 0.0)
        return state

    overrides = [*BUDGET, *args.set]
    base = load_config("tiny", overrides)
    args.cache.mkdir(parents=True, exist_ok=True)
    server = EmbeddedS3Server(base.storage.embedded, data_dir=str(args.cache / "storage"))
    per_seed: dict[str, dict] = {}
    with server as state:
        size = DemoSize(args.clips, args.lm_steps, args.max_steps)
        cfg = demo_config(base, state.s3_config(), size)
        tag = backbones_tag(cfg.model, args.lm_steps)
        backbones = join(BUCKET, "backbones", f"tiny-{tag}")
        cfg = cfg.model_copy(update={"model": cfg.model.with_backbones_at(backbones)})
        storage = Storage(cfg.storage.s3)
        storage.ensure_bucket(BUCKET)
        world = join(BUCKET, "world")
        heldout_seed = cfg.data.synthetic.seed + 1
        heldout = join(BUCKET, f"heldout-{heldout_seed}-{args.test_clips}")
        # the held-out world is a pipeline of its own (world -> extract), with its own records
        # and features, so that nothing of it reaches training
        heldout_cfg = with_overrides(
            cfg,
            [
                f"data.synthetic.seed={heldout_seed}",
                f"train.data.records={join(heldout, 'records')}",
                f"train.data.features={join(BUCKET, 'features-' + heldout.rsplit('/', 1)[-1])}",
            ],
        )
        heldout_features = heldout_cfg.train.data.features
        test_records = join(heldout, "records", "all.parquet")

        def earlier_evaluation(out: str, checkpoint: str, audio: str) -> dict | None:
            """A cut-off run's evaluation of this checkpoint by this code, if it has one."""
            uri = join(out, "metrics.json")
            if not storage.exists(uri):
                return None
            earlier = json.loads(storage.read_bytes(uri))
            run = earlier["run"]
            same = (run["checkpoint"], run["audio"], run["code_version"])
            if same != (checkpoint, audio, code_version()):
                return None
            log(f"evaluation kept from the earlier run: {uri}")
            return earlier

        def write_results() -> dict:
            """The seeds done so far, written after each seed so that a cut-off run keeps them."""
            done = [seed for seed in args.seeds if str(seed) in per_seed]
            first = per_seed[str(done[0])]["variants"]["4 stages"]["metrics"]
            results = {
                "clips": args.clips,
                "test_clips": args.test_clips,
                "seeds": done,
                "lm_steps": args.lm_steps,
                "max_steps": args.max_steps,
                "overrides": overrides,
                "cpus": os.cpu_count(),
                "test_set": test_set_summary(first, args.test_clips, heldout_seed),
                "per_seed": per_seed,
                "timings_s": timings,
                "total_s": round(time.monotonic() - started, 1),
            }
            results["bars"] = bars(results)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
            return results

        try:
            for seed in args.seeds:
                seeded = with_overrides(cfg, [f"seed={seed}"])
                # the same budget and seed resume the same run (the hash leaves out the seed)
                run_id = f"bar-{training_hash(seeded)[:8]}-seed{seed}"
                pipeline(
                    seeded,
                    PipelinePlan(
                        run_id,
                        tiny_backbones=True,
                        lm_steps=args.lm_steps,
                        world=world,
                        clips=args.clips,
                        evaluate_split=None,
                    ),
                    f"seed {seed}: 4 stages",
                )
                full = read_manifest(storage, run_uri(seeded, run_id))
                # after the first training pipeline: it built the backbones that the held-out
                # features need (a later seed finds them done)
                pipeline(
                    heldout_cfg,
                    PipelinePlan(
                        f"heldout-{heldout_seed}-{args.test_clips}-{tag}",
                        world=heldout,
                        clips=args.test_clips,
                        stages=(),
                        evaluate_split=None,
                    ),
                    "held-out world",
                )
                if not storage.exists(test_records):
                    records = load_world_records(heldout, storage).to_pylist()
                    write_records(records, test_records, storage)
                checkpoint = {int(k): v["checkpoint"] for k, v in full["stages"].items()}
                pipeline(
                    seeded,
                    PipelinePlan(
                        f"{run_id}-skip3",
                        stages=(4,),
                        init_checkpoint=checkpoint[2],
                        evaluate_split=None,
                    ),
                    f"seed {seed}: stage 3 skipped",
                )
                skip3 = read_manifest(storage, run_uri(seeded, f"{run_id}-skip3"))
                checkpoints = {
                    "full": checkpoint[4],
                    "stage3": checkpoint[3],
                    "skip3": skip3["stages"]["4"]["checkpoint"],
                }
                evaluated = {}
                for name, (key, audio) in VARIANTS.items():
                    console.rule(f"[bold]seed {seed}: evaluate {name}")
                    out = join(BUCKET, "eval", run_id, name.split(" (")[0].replace(" ", "-"))
                    begun = time.monotonic()
                    result = earlier_evaluation(out, checkpoints[key], audio)
                    if result is None:
                        result = evaluate_checkpoint(
                            seeded,
                            checkpoints[key],
                            heldout_features,
                            test_records,
                            out,
                            EvalSettings(audio=audio, plots=2, seed=seed),
                            storage,
                        )
                    timings[f"seed {seed}: evaluate {name}"] = time.monotonic() - begun
                    evaluated[name] = {"checkpoint": checkpoints[key], "audio": audio, **result}
                per_seed[str(seed)] = {
                    "run_id": run_id,
                    "training": {
                        "4 stages": stage_summary(full),
                        "stage 3 skipped": stage_summary(skip3),
                    },
                    "variants": evaluated,
                    # among the training world's own test videos (a stage-1 check, not QA)
                    "stage1_retrieval": retrieval(
                        checkpoint[1],
                        cfg.train.data.features,
                        join(cfg.train.data.records, "test.parquet"),
                        storage,
                        feature_config_hash(cfg),
                    ),
                }
                write_results()
        finally:
            if ray.is_initialized():
                ray.shutdown()

    report(write_results(), args.out)


if __name__ == "__main__":
    main()
