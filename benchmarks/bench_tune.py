"""Ray Tune on 2 CPUs: ASHA against the full grid, and 1 vs 2 concurrent trials.

Every sweep runs `damo tune` (the real command, its own local Ray cluster) over
`tune_spaces/fuseformer_grid.yaml` (Fuseformer depth x visual compression, 8 trials, each
training stages 1-3 on a short schedule and reporting the validation grounding mIoU per stage-3
epoch):
  grid      FIFO: every trial trains all its epochs (the full grid)
  asha      ASHA on stage-3 epochs only (grace 1 epoch, reduction factor --reduction-factor,
            `tune.asha.stage1_rung=false`), 1 trial at a time
  asha-s1   ASHA as `damo tune` runs it by default: with the stage-1 rung, where trials also
            stop at the end of stage 1, on its validation loss, before stages 2 and 3
  asha-c2   ASHA on epochs only with 2 concurrent trials (each with half the CPUs)
Compute is counted in trial-iterations (stage-3 epochs trained, over all trials) and in wall
time; the machine's 1-minute load average is sampled during each sweep, since wall times on a
shared machine measure the neighbours too. The world, backbones and features are made once
under --root.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

DAMO = str(Path(sys.executable).parent / "damo")
SPACE = Path(__file__).resolve().parents[1] / "tune_spaces" / "fuseformer_grid.yaml"


def run(command: list[str], log: Path, env: dict, cwd: Path) -> float:
    started = time.monotonic()
    with log.open("ab") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return time.monotonic() - started


class LoadSampler:
    """The machine's 1-minute load average every `every` seconds while a sweep runs."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {
            "median": round(statistics.median(self.samples), 1),
            "max": round(max(self.samples), 1),
        }


def prepare(root: Path, clips: int, env: dict) -> None:
    log = root / "prepare.log"
    if not (root / "backbones" / "llm" / "config.json").exists():
        run([DAMO, "backbones", "make-tiny", "--out", str(root / "backbones")], log, env, root)
    if not (root / "world" / "records" / "val.parquet").exists():
        command = [DAMO, "data", "synth", "--out", str(root / "world"), "--clips", str(clips)]
        run([*command, "--seed", "5"], log, env, root)
    if not (root / "features" / "summary.json").exists():
        run(
            [DAMO, "extract", "--config", "bench.yaml", "--videos", str(root / "world" / "videos")]
            + ["--out", str(root / "features")],
            log,
            env,
            root,
        )


def write_config(root: Path, args) -> None:
    config = {
        "base": "tiny",
        "model": {
            name: {"path": str(root / "backbones" / name)}
            for name in ("vision", "audio", "text_encoder", "llm")
        },
        "ray": {"num_cpus": 2, "object_store_memory_mb": 512},
        "train": {
            "runs_root": str(root / "runs"),
            "data": {"features": str(root / "features"), "records": str(root / "world/records")},
            "scaling": {"cpus_per_worker": 0.5},
            "stages": {
                "stage1": {"max_steps": args.stage1_steps, "batch_size": 16},
                "stage2": {"max_steps": args.stage2_steps},
                "stage3": {"epochs": args.epochs, "log_every": 1000},
            },
        },
        "tune": {
            "sweeps_root": str(root / "sweeps"),
            "registry": str(root / "registry"),
            "trial_cpus": 0.5,
            "max_failures": 0,
            # on a world this small the validation split has a handful of grounding records,
            # whose mIoU ties between trials early on; the validation loss orders them (the
            # mIoU at each trial's best epoch is reported beside it)
            "metric": "val_loss",
            "mode": "min",
        },
    }
    (root / "bench.yaml").write_text(yaml.safe_dump(config))


def sweep(root: Path, name: str, overrides: list[str], env: dict) -> dict:
    command = [DAMO, "tune", "--config", "bench.yaml", "--space", str(SPACE), "--name", name]
    for override in overrides:
        command += ["--set", override]
    with LoadSampler() as load:
        wall = run(command, root / f"{name}.log", env, root)
    rows = list(csv.DictReader((root / "sweeps" / name / "results.csv").open()))
    best = json.loads((root / "sweeps" / name / "best.json").read_text())
    metric = f"best_{best['metric']}"
    return {
        "wall_s": round(wall, 1),
        "load_average_1min": load.summary(),
        "trials": len(rows),
        "trial_iterations": sum(int(r["epochs"]) for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "stopped_after_stage1": sum(
            r["status"] == "stopped early" and r["epochs"] == "0" for r in rows
        ),
        "failed": sum(r["status"] == "failed" for r in rows),
        "best_params": best["params"],
        "best_metric": best["value"],
        "per_trial": [
            {
                "depth": r["model.fuseformer.depth"],
                "compression": r["model.residual.visual_compression"],
                "status": r["status"],
                "epochs": int(r["epochs"]),
                "best": float(r[metric]) if r[metric] else None,
                "miou_at_best": float(r["miou_at_best"]) if r["miou_at_best"] else None,
                **(
                    {"stage1_val_loss": float(r["stage1_val_loss"])}
                    if r.get("stage1_val_loss")
                    else {}
                ),
            }
            for r in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/damo-bench-tune"))
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=9, help="Stage-3 epochs (ASHA's max_t).")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's eta.")
    parser.add_argument("--stage1-steps", type=int, default=10)
    parser.add_argument("--stage2-steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=["grid", "asha", "asha-s1", "asha-c2"])
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--out", default="benchmarks/results_tune.json")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "COLUMNS": "160",
    }
    write_config(args.root, args)
    prepare(args.root, args.clips, env)
    if args.prepare_only:
        return
    stamp = time.strftime("%H%M%S")
    asha = [f"tune.asha.reduction_factor={args.reduction_factor}", "tune.asha.stage1_rung=false"]
    settings = {
        "grid": ["tune.scheduler=fifo"],
        "asha": asha,
        "asha-s1": [f"tune.asha.reduction_factor={args.reduction_factor}"],  # the default rung
        "asha-c2": [
            *asha,
            "tune.max_concurrent_trials=2",
            "tune.trial_cpus=0.25",
            "train.scaling.cpus_per_worker=0.25",
        ],
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["setup"] = {
        "clips": args.clips,
        "stage3_epochs": args.epochs,
        "asha_reduction_factor": args.reduction_factor,
        "stage1_steps": args.stage1_steps,
        "stage2_steps": args.stage2_steps,
        "machine": f"{os.cpu_count()} CPUs",
    }
    for name in args.only:
        results[name] = sweep(args.root, f"{name}-{stamp}", settings[name], env)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps(results[name]), flush=True)
    for name in ("asha", "asha-s1"):
        if "grid" in results and name in results:
            grid, asha = results["grid"], results[name]
            results[f"{name}_vs_grid".replace("-", "_")] = {
                "iterations_share": round(asha["trial_iterations"] / grid["trial_iterations"], 3),
                "wall_share": round(asha["wall_s"] / grid["wall_s"], 3),
                "same_best_config": asha["best_params"] == grid["best_params"],
                "best_metric_gap": round(asha["best_metric"] - grid["best_metric"], 4),
            }
    if "asha" in results and "asha-c2" in results:
        results["c2_vs_c1_wall"] = round(
            results["asha-c2"]["wall_s"] / results["asha"]["wall_s"], 3
        )
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if "vs" in k}, indent=2))


if __name__ == "__main__":
    main()
