"""Tune: which stages a trial trains, its config, the `best` registry and the results files.

The sweep itself (ASHA, a failing trial, a killed driver, `best`) is tests/test_tune_sweep.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from damo.cli import app
from damo.config import ConfigError, load_config
from damo.storage import Storage
from damo.train.registry import RegistryError, read_entry, resolve_checkpoint, write_entry
from damo.train.stages import stage_spec
from damo.tune.results import heatmap_axes, mark_stopped_runs
from damo.tune.space import load_space
from damo.tune.trial import SweepError, first_stage, trial_config, trial_stages


@pytest.fixture
def cfg(tmp_path):
    return load_config("tiny", [f"tune.registry={tmp_path / 'registry'}"])


def test_a_fuseformer_change_trains_from_stage_1(cfg):
    assert first_stage("model.fuseformer.depth", cfg) == 1
    assert first_stage("model.residual.visual_compression", cfg) == 1
    assert trial_stages(["model.fuseformer.depth", "train.stages.stage3.optimizer.lr"], cfg) == (
        1,
        2,
        3,
    )


def test_a_stage_3_learning_rate_starts_at_stage_3_from_a_given_checkpoint(cfg):
    assert first_stage("train.stages.stage3.optimizer.lr", cfg) == 3
    with pytest.raises(SweepError, match="tune.init_checkpoint to a stage-2 checkpoint"):
        trial_stages(["train.stages.stage3.optimizer.lr"], cfg)
    given = load_config("tiny", ["tune.init_checkpoint=s3://damo/runs/r/ckpt"])
    assert trial_stages(["train.stages.stage3.optimizer.lr"], given) == (3,)


def test_lora_settings_start_where_the_adapter_first_trains(cfg):
    # the tiny recipe first trains LoRA in stage 3; a recipe that trains it in 2 starts there
    assert first_stage("model.llm.lora.r", cfg) == 3
    earlier = load_config("tiny", ["model.stages.stage2.trainable=[bridge, lora]"])
    assert first_stage("model.llm.lora.r", earlier) == 2
    assert first_stage("model.stages.stage4.trainable", cfg) == 4


def test_a_last_stage_without_answers_has_no_grounding_metric(cfg):
    alignment_only = load_config("tiny", ["tune.last_stage=1"])
    with pytest.raises(SweepError, match="no grounding mIoU"):
        trial_stages(["model.fuseformer.depth"], alignment_only)


def test_the_trial_config_scores_grounding_and_keeps_its_best_epoch(cfg):
    trial = trial_config(cfg, {"model.fuseformer.depth": 3}, "s3://damo/sweeps/s1")
    assert trial.model.fuseformer.depth == 3
    assert trial.train.runs_root == "s3://damo/sweeps/s1/trials"
    spec = stage_spec(trial, 3)
    assert spec.val_grounding and spec.checkpoint_metric == "val_grounding_miou"


def test_grounding_validation_needs_an_lm_stage_and_metric_needs_its_mode():
    with pytest.raises(ValueError, match="needs an LM stage"):
        stage_spec(load_config("tiny", ["train.stages.stage1.val_grounding=true"]), 1)
    with pytest.raises(ConfigError, match="needs val_grounding"):
        load_config("tiny", ["train.stages.stage3.checkpoint_metric=val_grounding_miou"])
    with pytest.raises(ConfigError, match="mode must be 'min'"):
        load_config("tiny", ["tune.metric=val_loss"])
    assert load_config("tiny", ["tune.metric=val_loss", "tune.mode=min"]).tune.mode == "min"


def test_best_resolves_to_the_latest_sweep_and_best_name_to_that_sweep(cfg, tmp_path):
    storage = Storage()
    with pytest.raises(RegistryError, match="no registry entry for any sweep"):
        resolve_checkpoint("best", cfg, storage)
    for sweep in ("first", "second"):
        entry = {"sweep": sweep, "checkpoint": str(tmp_path / sweep / "ckpt"), "metric": "m"}
        write_entry(cfg, entry, storage)
    assert resolve_checkpoint("best", cfg, storage) == str(tmp_path / "second" / "ckpt")
    assert resolve_checkpoint("best:first", cfg, storage) == str(tmp_path / "first" / "ckpt")
    assert resolve_checkpoint("s3://b/ckpt", cfg, storage) == "s3://b/ckpt"
    with pytest.raises(RegistryError, match="sweep 'nope'"):
        resolve_checkpoint("best:nope", cfg, storage)
    assert read_entry(cfg, "first", storage)["sweep"] == "first"


def test_tune_best_prints_the_entry_and_eval_refuses_a_missing_one(cfg, tmp_path):
    registry = f"tune.registry={tmp_path / 'registry'}"
    runner = CliRunner()
    missing = runner.invoke(app, ["tune", "best", "s1", "--config", "tiny", "--set", registry])
    assert missing.exit_code == 2 and "no registry entry for sweep 's1'" in missing.output
    evaluated = runner.invoke(
        app,
        ["eval", "run", "--checkpoint", "best", "--out", str(tmp_path / "e"), "-c", "tiny"]
        + ["--set", registry],
    )
    assert evaluated.exit_code == 2 and "no registry entry" in evaluated.output
    write_entry(
        cfg,
        {
            "sweep": "s1",
            "checkpoint": "/x/ckpt",
            "metric": "val_grounding_miou",
            "value": 12.5,
            "config": {"big": "config"},
        },
        Storage(),
    )
    shown = runner.invoke(app, ["tune", "best", "s1", "--config", "tiny", "--set", registry])
    assert shown.exit_code == 0, shown.output
    assert "/x/ckpt" in shown.output and "12.5" in shown.output and "big" not in shown.output


def test_tune_needs_a_space_and_a_name():
    result = CliRunner().invoke(app, ["tune", "--config", "tiny"])
    assert result.exit_code == 2 and "--space and --name are required" in result.output


def test_a_bad_sweep_name_is_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(
        app,
        ["tune", "--space", "tune_spaces/fuseformer.yaml", "--name", "a/b", "--config", "tiny"],
    )
    assert result.exit_code == 2 and "bad sweep name" in result.output


def test_the_heat_map_is_depth_against_compression():
    grid = load_space("tune_spaces/fuseformer_grid.yaml")
    assert heatmap_axes(grid) == ("model.fuseformer.depth", "model.residual.visual_compression")
    assert json.loads(json.dumps(grid.grid_size())) == 8


def test_only_a_stopped_trials_unfinished_last_stage_is_marked_stopped(cfg, tmp_path):
    from damo.train.pipeline import read_manifest, run_uri, write_manifest

    trial_cfg = trial_config(cfg, {}, str(tmp_path / "sweep"))
    storage = Storage()
    stages = {
        "slow": {"status": "running"},
        "torn": {"status": "failed", "error": "ActorDiedError: placement group was removed"},
        "done": {"status": "finished"},
        "bad": {"status": "failed", "error": "ValueError: empty parameter list"},
    }
    for trial, stage in stages.items():
        write_manifest(storage, run_uri(trial_cfg, trial), {"stages": {"3": dict(stage)}})
    rows = [
        {"trial_id": "slow", "status": "stopped early", "epochs": 1, "checkpoint": "ck/1"},
        {"trial_id": "torn", "status": "stopped early", "epochs": 3, "checkpoint": "ck/3"},
        {"trial_id": "done", "status": "finished", "epochs": 2, "checkpoint": "ck/2"},
        {"trial_id": "bad", "status": "failed", "epochs": 0, "checkpoint": None},
    ]
    mark_stopped_runs(trial_cfg, rows, storage)
    stage3 = {t: read_manifest(storage, run_uri(trial_cfg, t))["stages"]["3"] for t in stages}
    assert stage3["slow"]["status"] == "stopped" and "error" not in stage3["slow"]
    assert "ASHA scheduler after 1 epoch(s); best checkpoint ck/1" in stage3["slow"]["note"]
    assert stage3["torn"]["status"] == "stopped" and "error" not in stage3["torn"]
    assert "teardown: ActorDiedError" in stage3["torn"]["note"]
    assert stage3["done"] == stages["done"] and stage3["bad"] == stages["bad"]


def test_concurrent_trials_must_leave_a_cpu_for_ray_data():
    from damo.tune.sweep import check_room_for_data

    # the tiny preset's one worker at 1 CPU plus the trial's actor: 2 CPUs would hang ingest
    with pytest.raises(SweepError, match="leave 0 of the cluster's 2 CPUs for Ray Data"):
        check_room_for_data(load_config("tiny"), 2.0)
    fits = load_config("tiny", ["tune.trial_cpus=0.5", "train.scaling.cpus_per_worker=0.5"])
    check_room_for_data(fits, 2.0)
    two = load_config(
        "tiny",
        [
            "tune.trial_cpus=0.25",
            "train.scaling.cpus_per_worker=0.25",
            "tune.max_concurrent_trials=2",
        ],
    )
    check_room_for_data(two, 2.0)
    with pytest.raises(SweepError, match="lower tune.max_concurrent_trials"):
        check_room_for_data(
            two.model_copy(
                update={"tune": two.tune.model_copy(update={"max_concurrent_trials": 3})}
            ),
            2.0,
        )


def test_optuna_draws_trials_from_the_space_and_refuses_a_grid():
    from damo.tune.sweep import make_searcher

    space = load_space("tune_spaces/fuseformer.yaml")
    optuna = load_config("tiny", ["tune.searcher=optuna", "tune.seed=3"])
    searcher = make_searcher(optuna, space)
    assert type(searcher).__name__ == "MetricRowsOnlyOptuna"
    assert searcher.set_search_properties("val_grounding_miou", "max", space.param_space())
    drawn = searcher.suggest("trial-1")
    # the stage-1 rung's report has no metric: skipped; an epoch's report reaches Optuna
    searcher.on_trial_result("trial-1", {"stage1_val_loss": 12.5, "training_iteration": 1})
    searcher.on_trial_result("trial-1", {"val_grounding_miou": 31.0, "training_iteration": 2})
    assert searcher._ot_trials["trial-1"].storage.get_trial(  # noqa: SLF001
        searcher._ot_trials["trial-1"]._trial_id  # noqa: SLF001
    ).intermediate_values == {2: 31.0}
    assert drawn["model.fuseformer.depth"] in (1, 2, 3, 4)
    assert 3.0e-4 <= drawn["train.stages.stage3.optimizer.lr"] <= 3.0e-3
    assert isinstance(drawn["model.fuseformer.visual_queries"], int)
    with pytest.raises(SweepError, match="is a grid"):
        make_searcher(optuna, load_space("tune_spaces/fuseformer_grid.yaml"))


def write_epochs(root, trial_id: str, losses: list[float]) -> None:
    metrics = root / "trials" / trial_id / "metrics"
    metrics.mkdir(parents=True)
    rows = [{"stage": 3, "epoch": 0, "step": 0, "val_loss": 0.9}]  # before training: no rung
    rows += [{"stage": 3, "epoch": e, "val_loss": v} for e, v in enumerate(losses, 1)]
    (metrics / "stage3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_resumed_asha_refills_its_rungs_from_the_trials_epoch_records(tmp_path):
    """`Tuner.restore` brings back the scheduler pickled at the sweep's start, rungs empty;
    the trials Tune adds back refill them, so a slow trial is still compared with them."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from damo.tune.sweep import make_scheduler

    overrides = ["train.stages.stage3.epochs=6", "tune.metric=val_loss", "tune.mode=min"]
    cfg = load_config("tiny", overrides)  # ASHA's defaults: grace 1, reduction factor 3
    write_epochs(tmp_path, "good", [0.50, 0.45, 0.40, 0.38, 0.37, 0.36])  # finished
    write_epochs(tmp_path, "cut", [0.70])  # stopped at the first rung
    pickled = pickle.dumps(make_scheduler(cfg, str(tmp_path)))
    assert b"secret" not in pickled  # it travels in object storage: no credentials in it
    scheduler = pickle.loads(pickled)
    scheduler.set_search_properties("val_loss", "min")
    for trial_id in ("good", "cut", "new"):  # `new` has no record yet: nothing to refill
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
    assert scheduler.rung_results() == {1: {"good": 0.50, "cut": 0.70}, 3: {"good": 0.40}}

    slow = {"epoch": 1, "val_loss": 0.65}
    new = SimpleNamespace(trial_id="new")
    assert scheduler.on_trial_result(None, new, slow) == TrialScheduler.STOP
    fresh = SimpleNamespace(trial_id="fresh")
    scheduler.on_trial_add(None, fresh)
    better = {"epoch": 1, "val_loss": 0.30}
    assert scheduler.on_trial_result(None, fresh, better) == TrialScheduler.CONTINUE


def test_a_stage_resumed_from_a_checkpoint_counts_each_epoch_once(tmp_path):
    from damo.tune.scheduler import EpochHistory, use_storage

    write_epochs(tmp_path, "t", [0.5, 0.4, 0.3])
    with (tmp_path / "trials/t/metrics/stage3.jsonl").open("a") as f:  # epoch 3 again
        f.write(json.dumps({"stage": 3, "epoch": 3, "step": 15, "val_loss": 0.31}) + "\n")
    use_storage(str(tmp_path), load_config("tiny").storage.s3)
    history = EpochHistory(str(tmp_path), 3, "val_loss")
    assert history("t") == [(1, 0.5), (2, 0.4), (3, 0.31)]
    assert history("absent") == []


def write_stage1(root, trial_id: str, loss: float | None) -> None:
    """A trial run's manifest with stage 1 finished at `loss` (None: stage 1 still running)."""
    finished = {"status": "finished", "metrics": {"best_val_loss": loss}}
    stage1 = finished if loss is not None else {"status": "running"}
    run = root / "trials" / trial_id
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(json.dumps({"stages": {"1": stage1}}))


def test_the_stage1_rung_stops_trials_behind_the_best_third_before_stage_2(tmp_path):
    """With `tune.asha.stage1_rung`, each trial's one stage-1 report meets its own rung (lower
    loss better, whatever the sweep's mode); the epochs of the last stage meet the usual
    rungs. A resumed sweep refills the stage-1 rung from the runs' manifests, and a trial
    that is there already (a restarted trial reports its finished stage 1 again) goes on."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from damo.tune.sweep import make_scheduler

    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    cfg = load_config("tiny", ["train.stages.stage3.epochs=3", "tune.asha.stage1_rung=true"])
    assert make_scheduler(cfg, str(tmp_path), (3,)).stage1_results() == {}  # no stage 1
    scheduler = make_scheduler(cfg, str(tmp_path), (1, 2, 3))
    scheduler.set_search_properties("val_grounding_miou", "max")
    trials = {name: SimpleNamespace(trial_id=name) for name in ("a", "b", "c", "d")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trials["a"], {"stage1_val_loss": 12.0}) == go
    assert scheduler.on_trial_result(None, trials["b"], {"stage1_val_loss": 13.0}) == stop
    assert scheduler.on_trial_result(None, trials["c"], {"stage1_val_loss": 11.0}) == go
    assert scheduler.stage1_results() == {"a": 12.0, "b": 13.0, "c": 11.0}
    # the epochs' rungs are apart from it: d's first epoch meets a's alone
    assert (
        scheduler.on_trial_result(None, trials["a"], {"epoch": 1, "val_grounding_miou": 20.0}) == go
    )
    assert (
        scheduler.on_trial_result(None, trials["d"], {"epoch": 1, "val_grounding_miou": 5.0})
        == stop
    )
    assert scheduler.rung_results()[1] == {"a": 20.0, "d": 5.0}

    # a resumed sweep: the pickled scheduler, refilled from the runs
    write_stage1(tmp_path, "a", 12.0)
    write_stage1(tmp_path, "c", 11.0)
    write_stage1(tmp_path, "e", None)  # still in stage 1 when the driver died
    resumed = pickle.loads(pickle.dumps(make_scheduler(cfg, str(tmp_path), (1, 2, 3))))
    resumed.set_search_properties("val_grounding_miou", "max")
    for name in ("a", "c", "e"):
        resumed.on_trial_add(None, SimpleNamespace(trial_id=name))
    assert resumed.stage1_results() == {"a": 12.0, "c": 11.0}
    assert (
        resumed.on_trial_result(None, SimpleNamespace(trial_id="a"), {"stage1_val_loss": 12.0})
        == go
    )
    assert (
        resumed.on_trial_result(None, SimpleNamespace(trial_id="e"), {"stage1_val_loss": 12.5})
        == stop
    )


def test_the_stage1_rung_needs_asha_and_trials_that_train_stage_1(cfg):
    from damo.tune.trial import has_stage1_rung

    assert has_stage1_rung(cfg, (1, 2, 3))  # on by default
    assert not has_stage1_rung(cfg, (3,))  # a stage-3 learning rate: no stage 1 to stop after
    off = load_config("tiny", ["tune.asha.stage1_rung=false"])
    assert not has_stage1_rung(off, (1, 2, 3))
    assert not has_stage1_rung(load_config("tiny", ["tune.scheduler=fifo"]), (1, 2, 3))


def test_results_count_epochs_apart_from_the_stage1_report(tmp_path):
    """Tune counts the stage-1 report as an iteration; the results count the last stage's
    epochs, and a trial stopped at the stage-1 rung has none, only its stage-1 loss."""
    from types import SimpleNamespace

    import pandas as pd

    from damo.tune.progress import epochs_done
    from damo.tune.results import best_row, table_columns, trial_rows

    cfg = load_config("tiny", ["train.stages.stage3.epochs=2", "tune.asha.stage1_rung=true"])
    space = load_space("tune_spaces/fuseformer_grid.yaml")
    params = {"model.fuseformer.depth": 2, "model.residual.visual_compression": 4}
    stage1 = {"stage1_val_loss": 12.5, "stage": 1, "training_iteration": 1}
    epochs = [
        {
            "epoch": e,
            "stage": 3,
            "val_grounding_miou": m,
            "val_loss": 0.5,
            "checkpoint_path": f"trials/t1/ray/ck{e}",
            "training_iteration": e + 1,
        }
        for e, m in ((1, 30.0), (2, 40.0))
    ]
    grid = [
        SimpleNamespace(
            metrics={"trial_id": "t1"},
            config=params,
            error=None,
            metrics_dataframe=pd.DataFrame([stage1, *epochs]),
        ),
        SimpleNamespace(
            metrics={"trial_id": "t2"},
            config=params,
            error=None,
            metrics_dataframe=pd.DataFrame([{**stage1, "stage1_val_loss": 13.5}]),
        ),
    ]
    full, cut = trial_rows(cfg, space, grid, str(tmp_path))
    assert full["status"] == "finished" and full["epochs"] == 2
    assert full["history"] == [(1, 30.0), (2, 40.0)] and full["best_epoch"] == 2
    assert full["stage1_val_loss"] == 12.5 and full["miou_at_best"] == 40.0
    assert cut["status"] == "stopped early" and cut["epochs"] == 0
    assert cut["stage1_val_loss"] == 13.5 and cut["best_val_grounding_miou"] is None
    assert best_row(cfg, [full, cut])["trial_id"] == "t1"
    # the column is there where the trials had the rung: a stage-3 space has none
    assert "stage1_val_loss" in table_columns(cfg, space)
    stage3 = load_space("tune_spaces/demo.yaml")
    on_stage4 = load_config("tiny", ["tune.last_stage=4", "tune.init_checkpoint=ck"])
    assert "stage1_val_loss" not in table_columns(on_stage4, stage3)
    assert epochs_done(stage1) == 0 and epochs_done(epochs[1]) == 2 and epochs_done(None) == 0


def test_a_trial_stopped_at_the_stage1_rung_says_so_in_its_run(cfg, tmp_path):
    from damo.train.pipeline import read_manifest, run_uri, write_manifest

    on = load_config("tiny", ["tune.asha.stage1_rung=true"])
    trial_cfg = trial_config(on, {}, str(tmp_path / "sweep"))
    storage = Storage()
    write_manifest(storage, run_uri(trial_cfg, "cut"), {"stages": {"1": {"status": "finished"}}})
    row = {
        "trial_id": "cut",
        "status": "stopped early",
        "epochs": 0,
        "checkpoint": None,
        "stage1_val_loss": 13.25,
    }
    mark_stopped_runs(trial_cfg, [row], storage)
    manifest = read_manifest(storage, run_uri(trial_cfg, "cut"))
    assert "stage-1 rung (stage-1 val_loss 13.2500)" in manifest["stopped"]
    assert set(manifest["stages"]) == {"1"}


def test_a_finished_stage_skipped_on_a_rerun_still_calls_its_after_stage_hook(tmp_path):
    """A restarted trial skips its finished stage 1 and must still send the stage-1 report
    (train_pipeline's `after_stage`), with the entry that the stage finished with."""
    from damo.train.pipeline import run_uri, train_pipeline, training_hash, write_manifest

    cfg = load_config("tiny", [f"train.runs_root={tmp_path / 'runs'}"])
    entry = {"status": "finished", "checkpoint": "ck/1", "metrics": {"best_val_loss": 12.0}}
    manifest = {"run_id": "r", "config_hash": training_hash(cfg), "stages": {"1": entry}}
    write_manifest(Storage(), run_uri(cfg, "r"), manifest)
    seen = []
    train_pipeline(cfg, "r", (1,), log=lambda *_: None, after_stage={1: seen.append})
    assert seen == [entry]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trial_stopped_by_tune_frees_its_train_workers_beside_another_ray_cluster(
    ray_cluster, tmp_path
):
    """Tune stops a trial (ASHA does the same) while its Ray Train run trains. The run's
    placement group must go, or the next trial's Ray Data waits for its CPU forever. With a
    second cluster on the machine (this session's), Ray Train's cleaner could not find its own
    cluster unless `connect_ray` told the workers the address."""
    assert ray_cluster.is_initialized()  # the other cluster
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "tune_stopped_trial.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    left = json.loads(done.stdout.strip().splitlines()[-1])
    assert left == {"placement_groups_held": 0, "cpus_free": 2.0}, done.stderr[-3000:]
