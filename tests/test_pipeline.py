"""The pipeline's plan and bookkeeping without a cluster: which steps a plan runs, plans that
cannot work are refused before anything runs, finished steps are skipped on a re-run (unless
their output went away), and a failed step is recorded and resumed.

The steps themselves run for real in tests/test_demo.py (the local demo) and tests/test_jobs.py
(`ray job submit` against a Ray head)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config
from damo.pipeline import Pipeline, PipelineError, PipelinePlan, check_plan, read_state
from damo.storage import Storage


@pytest.fixture
def cfg(tmp_path):
    world = tmp_path / "world"
    return load_config(
        "tiny",
        [
            f"train.runs_root={tmp_path / 'runs'}",
            f"train.data.records={world / 'records'}",
            f"train.data.features={tmp_path / 'features'}",
        ],
    )


class FakeSteps(Pipeline):
    """Every step writes its output file and says so; `fail` names a step that raises."""

    def __init__(self, *args, fail: str | None = None, **kwargs):
        super().__init__(*args, log=self.lines.append, **kwargs)
        self.fail = fail

    lines: list[str] = []
    ran: list[str] = []

    def fake(self, step: str, **extra) -> dict:
        if step == self.fail:
            raise RuntimeError(f"{step} broke")
        self.ran.append(step)
        output = f"{self.run_dir}/fake/{step}.done"
        self.storage.write_bytes(output, b"done")
        return {"summary": f"{step} done", "output": output, **extra}

    def step_backbones(self):
        return self.fake("backbones")

    def step_world(self):
        return self.fake("world")

    def step_extract(self):
        return self.fake("extract")

    def step_train(self):
        return self.fake("train", checkpoints={3: "ck/3", 4: "ck/4"})

    def step_evaluate(self):
        return self.fake("evaluate", checkpoint=self.best_checkpoint())


def run(cfg, plan, **kwargs) -> tuple[dict, list[str]]:
    FakeSteps.ran = []
    state = FakeSteps(cfg, plan, Storage(), **kwargs).run()
    return state, list(FakeSteps.ran)


def test_a_plan_runs_only_the_steps_it_asks_for(cfg, tmp_path):
    assert PipelinePlan("r").steps == ("train", "evaluate")
    full = PipelinePlan("r", tiny_backbones=True, world=str(tmp_path / "world"), deploy=True)
    assert full.steps == ("backbones", "world", "extract", "train", "evaluate", "deploy")
    assert PipelinePlan("r", videos="s3://b/v", stages=(), evaluate_split=None).steps == (
        "extract",
    )


def test_plans_that_cannot_work_are_refused_before_anything_runs(cfg, tmp_path):
    with pytest.raises(PipelineError, match="train.data.records"):
        check_plan(cfg, PipelinePlan("r", world=str(tmp_path / "elsewhere")))
    with pytest.raises(PipelineError, match="--init-checkpoint"):
        check_plan(cfg, PipelinePlan("r", stages=(3, 4)))
    split = load_config("tiny", ["model.llm.path=/a/llm", "model.vision.path=/b/vision"])
    with pytest.raises(PipelineError, match="one folder"):
        check_plan(split, PipelinePlan("r", tiny_backbones=True))
    check_plan(cfg, PipelinePlan("r", stages=(3, 4), init_checkpoint="ck/2"))  # fine


def test_a_rerun_skips_finished_steps_and_redoes_one_whose_output_went_away(cfg, tmp_path):
    plan = PipelinePlan("r1", tiny_backbones=True, world=str(tmp_path / "world"))
    state, ran = run(cfg, plan)
    assert ran == ["backbones", "world", "extract", "train", "evaluate"]
    assert all(state["steps"][s]["status"] == "finished" for s in ran)
    assert state["steps"]["evaluate"]["checkpoint"] == "ck/4"  # the last trained stage's

    _, ran = run(cfg, plan)
    assert ran == []
    (tmp_path / "runs" / "r1" / "fake" / "extract.done").unlink()
    _, ran = run(cfg, plan)
    assert ran == ["extract"]
    saved = read_state(cfg, "r1", Storage())
    assert saved["plan"]["world"] == str(tmp_path / "world") and saved["run_id"] == "r1"


def test_a_failed_step_is_recorded_and_the_next_run_resumes_there(cfg, tmp_path):
    plan = PipelinePlan("r2", world=str(tmp_path / "world"))
    with pytest.raises(PipelineError, match="step train failed: train broke"):
        run(cfg, plan, fail="train")
    state = json.loads((tmp_path / "runs" / "r2" / "pipeline.json").read_text())
    assert state["steps"]["train"]["status"] == "failed"
    assert state["steps"]["train"]["error"] == "RuntimeError: train broke"
    assert state["steps"]["extract"]["status"] == "finished"
    _, ran = run(cfg, plan)
    assert ran == ["train", "evaluate"]


def test_a_run_id_keeps_its_plan(cfg, tmp_path):
    run(cfg, PipelinePlan("r3", world=str(tmp_path / "world")))
    with pytest.raises(PipelineError, match=r"another plan \(clips, stages differ\)"):
        run(cfg, PipelinePlan("r3", world=str(tmp_path / "world"), clips=5, stages=(1, 2)))


def test_the_pipeline_command_refuses_a_bad_plan_in_one_line(cfg, tmp_path):
    result = CliRunner().invoke(
        app, ["pipeline", "--run-id", "x", "--stages", "3,4", "--config", "tiny"]
    )
    assert result.exit_code == 2
    assert "--init-checkpoint" in result.output and "Traceback" not in result.output


def test_deploy_refuses_without_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["deploy", "--checkpoint", "ck/4", "--config", "tiny"])
    assert result.exit_code == 2 and "damo serve" in result.output


@pytest.mark.parametrize("job", ["pipeline", "evaluate", "deploy", "extract", "train", "tune"])
def test_every_job_has_help(job):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert f"jobs/{job}.py" in out.stdout and "--config" in out.stdout


@pytest.mark.parametrize("name", ["qvhighlights", "charades_sta", "activitynet", "paper"])
def test_each_dataset_config_says_a_pipeline_that_can_run(name):
    from conftest import REPO_ROOT

    cfg = load_config(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    plan = PipelinePlan.from_config(cfg, "job")
    check_plan(cfg, plan)
    assert plan.steps == ("extract", "train", "evaluate")
    assert plan.videos == f"s3://damo-data/{name}/videos"
    if name != "paper":  # grounding-only data: fine-tune from the paper's stage 2
        assert plan.stages == (3, 4) and plan.init_checkpoint.endswith("checkpoints/stage2")


RAY_CHATTER = """
import logging, sys
from pathlib import Path
from ray._private import worker
import ray.serve
from damo.pipeline import ray_logs_to_file

log = Path(sys.argv[1])
ray_logs_to_file(log)
logging.getLogger("ray").setLevel(logging.INFO)
worker.print_to_stdstream(
    {"lines": ["WARNING: 8 PYTHON worker processes"], "pid": "raylet", "is_err": False}, False
)
worker.print_to_stdstream(
    {"lines": ["a worker's own line"], "pid": 123, "ip": "127.0.0.1", "is_err": False,
     "actor_name": "", "task_name": "t"}, False
)
logging.getLogger("ray.serve").info("Started Serve in namespace")
logging.getLogger("ray.data").warning("a Ray Data warning")
"""


def test_ray_messages_go_to_the_log_file_and_worker_lines_still_print(tmp_path):
    """The pipeline's console keeps one line a step: the raylet's relayed warnings and Ray's
    loggers (Serve's own console handler included) go to the driver's log file."""
    import subprocess
    import sys

    log = tmp_path / "damo-driver.log"
    out = subprocess.run(
        [sys.executable, "-c", RAY_CHATTER, str(log)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    console = out.stdout + out.stderr
    for line in ("8 PYTHON worker processes", "Started Serve", "a Ray Data warning"):
        assert line not in console
        assert line in log.read_text()
    assert "a worker's own line" in out.stdout  # log_to_driver decides those, not this
