"""Tune: which stages a trial trains, its config, the `best` registry and the results files.

The sweep itself (ASHA, a failing trial, a killed driver, `best`) is tests/test_tune_sweep.py.
"""

from __future__ import annotations

import json

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
    assert type(searcher).__name__ == "OptunaSearch"
    assert searcher.set_search_properties("val_grounding_miou", "max", space.param_space())
    drawn = searcher.suggest("trial-1")
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

    slow = {"training_iteration": 1, "val_loss": 0.65}
    new = SimpleNamespace(trial_id="new")
    assert scheduler.on_trial_result(None, new, slow) == TrialScheduler.STOP
    fresh = SimpleNamespace(trial_id="fresh")
    scheduler.on_trial_add(None, fresh)
    better = {"training_iteration": 1, "val_loss": 0.30}
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
