"""The whole pipeline as one resumable run: backbones -> world -> extract -> train -> sweep ->
evaluate -> deploy.

`jobs/pipeline.py`, `damo pipeline`, `make demo` and `benchmarks/learning_bar.py` all run it.
Each step's outcome goes to `<train.runs_root>/<run id>/pipeline.json`; a re-run with the same
run id skips every step that finished and whose output is still there, and the steps that do
run resume inside themselves (extraction keeps written shards, training keeps finished stages
and checkpoints, a sweep keeps finished trials).

Steps, in order (those without their option are left out):
  backbones  the tiny backbones, built when `PipelinePlan.tiny_backbones` and not yet there
  world      a synthetic world at `PipelinePlan.world`, its records where train.data.records says
  extract    features for every object under `PipelinePlan.videos` (default: the world's videos)
  train      `PipelinePlan.stages` (from `init_checkpoint`), the run's manifest beside this file
  tune       a sweep over `PipelinePlan.space` named after the run; trials start from the run's
             checkpoint of the stage before the first one they train
  evaluate   `PipelinePlan.evaluate_split` with the sweep's best checkpoint, or else the last
             trained stage's
  deploy     the Serve app with that checkpoint on the connected cluster (left running)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from damo.config import DamoConfig
from damo.config.loader import with_overrides
from damo.storage import Storage, join

STEPS = ("backbones", "world", "extract", "train", "tune", "evaluate", "deploy")
STATE_FILE = "pipeline.json"
BACKBONES = ("vision", "audio", "text_encoder", "llm")


class PipelineError(RuntimeError):
    """A plan that cannot run as given, or a step that failed (named in the message)."""


@dataclass
class PipelinePlan:
    """What one run does: the config's `pipeline:` section and the run id."""

    run_id: str
    tiny_backbones: bool = False
    lm_steps: int = 300  # the tiny LLM's pre-training steps (tiny_backbones only)
    world: str | None = None  # make a synthetic world here (its records: <world>/records)
    clips: int | None = None  # the world's size (default data.synthetic.num_clips)
    videos: str | None = None  # extract every object under this prefix (default <world>/videos)
    stages: tuple[int, ...] = (1, 2, 3, 4)
    init_checkpoint: str | None = None
    space: str | None = None  # a search space YAML: sweep after training
    evaluate_split: str | None = "test"
    deploy: bool = False
    steps: tuple[str, ...] = field(init=False, default=())

    @classmethod
    def from_config(cls, cfg: DamoConfig, run_id: str) -> PipelinePlan:
        p = cfg.pipeline
        return cls(
            run_id=run_id,
            tiny_backbones=p.tiny_backbones,
            lm_steps=p.lm_steps,
            world=p.synthetic_world,
            clips=p.clips,
            videos=p.videos,
            stages=tuple(p.stages),
            init_checkpoint=p.init_checkpoint,
            space=p.space,
            evaluate_split=p.evaluate_split,
            deploy=p.deploy,
        )

    def __post_init__(self) -> None:
        wanted = {
            "backbones": self.tiny_backbones,
            "world": self.world is not None,
            "extract": self.videos is not None or self.world is not None,
            "train": bool(self.stages),
            "tune": self.space is not None,
            "evaluate": self.evaluate_split is not None,
            "deploy": self.deploy,
        }
        self.steps = tuple(step for step in STEPS if wanted[step])


def run_uri(cfg: DamoConfig, run_id: str) -> str:
    from damo.train.pipeline import run_uri as training_run_uri

    return training_run_uri(cfg, run_id)


def read_state(cfg: DamoConfig, run_id: str, storage: Storage) -> dict | None:
    uri = join(run_uri(cfg, run_id), STATE_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def check_plan(cfg: DamoConfig, plan: PipelinePlan) -> None:
    """Refuse, before anything runs, a plan whose pieces would not meet."""
    if plan.world is not None and join(plan.world, "records") != cfg.train.data.records:
        raise PipelineError(
            f"the world's records go to {join(plan.world, 'records')}, but training reads "
            f"train.data.records={cfg.train.data.records}: point one at the other"
        )
    if plan.tiny_backbones:
        roots = {getattr(cfg.model, name).path.rstrip("/").rsplit("/", 1)[0] for name in BACKBONES}
        if len(roots) != 1:
            raise PipelineError(
                "tiny backbones are built in one folder (vision/, audio/, text_encoder/, llm/), "
                f"but model.*.path point at {sorted(roots)}"
            )
    if plan.deploy and plan.evaluate_split is None and not (plan.stages or plan.space):
        raise PipelineError("deploy needs a checkpoint: train stages or run a sweep first")
    if plan.stages and min(plan.stages) > 1 and plan.init_checkpoint is None:
        raise PipelineError(
            f"stages {','.join(map(str, plan.stages))} start after stage 1: give the "
            "checkpoint they start from (--init-checkpoint)"
        )


class Pipeline:
    """One run of a plan; `run()` returns the state written to pipeline.json."""

    def __init__(
        self,
        cfg: DamoConfig,
        plan: PipelinePlan,
        storage: Storage | None = None,
        log: Callable[[str], None] = print,
    ):
        check_plan(cfg, plan)
        self.cfg, self.plan, self.log = cfg, plan, log
        self.ray_connected = False
        self.storage = storage or Storage(cfg.storage.s3)
        self.run_dir = run_uri(cfg, plan.run_id)
        self.storage.ensure_bucket(self.run_dir)
        self.state = read_state(cfg, plan.run_id, self.storage) or {
            "run_id": plan.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "steps": {},
        }
        planned = json.loads(json.dumps({k: v for k, v in asdict(plan).items() if k != "steps"}))
        before = self.state.get("plan")
        if before is not None and before != planned:
            changed = sorted(k for k in planned if planned[k] != before.get(k))
            raise PipelineError(
                f"run '{plan.run_id}' was started with another plan ({', '.join(changed)} "
                "differ); use a new run id for this one"
            )
        self.state["plan"] = planned

    # ---- bookkeeping ---------------------------------------------------------------------
    def ensure_ray(self) -> None:
        """Join (or start) the cluster at the first step that needs it; the console keeps one
        line a step."""
        if self.ray_connected:
            return
        where = join_ray_quietly(self.cfg, serve="deploy" in self.plan.steps)
        self.ray_connected = True
        self.log(f"Ray joined; its logs: {where}")

    def save(self) -> None:
        self.storage.ensure_bucket(self.run_dir)
        self.storage.write_bytes(
            join(self.run_dir, STATE_FILE), json.dumps(self.state, indent=2).encode()
        )

    def done(self, step: str) -> dict | None:
        """The step's recorded outcome, when it finished and its output is still there."""
        entry = self.state["steps"].get(step, {})
        if entry.get("status") != "finished":
            return None
        output = entry.get("output")
        if output and not self.storage.exists(output):
            return None
        return entry

    def run(self) -> dict:
        total = len(self.plan.steps)
        for number, step in enumerate(self.plan.steps, 1):
            prefix = f"[{number}/{total}] {step}"
            entry = self.done(step) if step != "deploy" else None
            if entry is not None:
                self.log(f"{prefix}: done before ({entry['summary']}), skipped")
                continue
            self.log(f"{prefix}: running")
            self.state["steps"][step] = {"status": "running", "started": now()}
            self.save()
            started = time.monotonic()
            try:
                outcome = getattr(self, f"step_{step}")()
            except BaseException as err:
                self.state["steps"][step].update(
                    status="failed", error=f"{type(err).__name__}: {err}"[:2000], finished=now()
                )
                self.save()
                if isinstance(err, Exception):
                    raise PipelineError(f"step {step} failed: {err}") from err
                raise
            self.state["steps"][step] = {
                "status": "finished",
                "finished": now(),
                "wall_s": round(time.monotonic() - started, 1),
                **outcome,
            }
            self.save()
            self.log(f"{prefix}: {outcome['summary']} ({time.monotonic() - started:.0f}s)")
        return self.state

    # ---- the steps -------------------------------------------------------------------------
    def step_backbones(self) -> dict:
        from damo.data.backbones import make_tiny_backbones

        root = self.cfg.model.llm.path.rstrip("/").rsplit("/", 1)[0]
        marker = join(self.cfg.model.llm.path, "config.json")
        if not self.storage.exists(marker):
            from transformers.utils import logging as transformers_logging

            clips = self.plan.clips or self.cfg.data.synthetic.num_clips
            # one-shard "Writing model shards" bars would break the one line a step
            transformers_logging.disable_progress_bar()
            try:
                make_tiny_backbones(root, self.cfg.model, self.storage, self.plan.lm_steps, clips)
            finally:
                transformers_logging.enable_progress_bar()
        return {"summary": f"tiny backbones at {root}", "output": marker}

    def step_world(self) -> dict:
        from damo.data.synthetic import generate_world

        settings = self.cfg.data.synthetic
        if self.plan.clips is not None:
            settings = settings.model_copy(update={"num_clips": self.plan.clips})
        world = generate_world(self.plan.world, self.storage, settings, progress=False)
        return {
            "summary": f"{world.num_clips} clips, records {world.records}",
            "output": join(self.plan.world, "world.json"),
        }

    def step_extract(self) -> dict:
        from damo.data.extract import extract_features, video_uris

        self.ensure_ray()
        videos = self.plan.videos or join(self.plan.world, "videos")
        uris = video_uris(self.storage, videos)
        if not uris:
            raise PipelineError(f"no objects under {videos}")
        out = self.cfg.train.data.features
        summary = extract_features(uris, out, self.cfg, storage=self.storage)
        errors = sum(summary.errors.values())
        return {
            "summary": f"{summary.ok} clips with features, {summary.skipped} done before, "
            f"{errors} errors -> {out}",
            "output": join(out, "summary.json"),
            "errors": summary.errors,
        }

    def step_train(self) -> dict:
        from damo.train.pipeline import MANIFEST, train_pipeline

        self.ensure_ray()
        manifest = train_pipeline(
            self.cfg,
            self.plan.run_id,
            self.plan.stages,
            self.plan.init_checkpoint,
            storage=self.storage,
            log=lambda line: self.log(f"  {line}"),
        )
        checkpoints = {
            int(stage): entry["checkpoint"] for stage, entry in manifest["stages"].items()
        }
        last = max(self.plan.stages)
        return {
            "summary": f"stages {','.join(map(str, self.plan.stages))}; "
            f"stage {last} checkpoint {checkpoints[last]}",
            "output": join(self.run_dir, MANIFEST),
            "checkpoints": checkpoints,
        }

    def checkpoints(self) -> dict[int, str]:
        entry = self.state["steps"].get("train", {})
        return {int(k): v for k, v in entry.get("checkpoints", {}).items()}

    def step_tune(self) -> dict:
        from damo.tune.space import load_space
        from damo.tune.sweep import run_sweep
        from damo.tune.trial import first_stage

        self.ensure_ray()
        space = load_space(self.plan.space, self.cfg)
        cfg = self.cfg
        first = min(first_stage(p.path, cfg) for p in space.parameters)
        start = self.checkpoints().get(first - 1)
        if first > 1 and cfg.tune.init_checkpoint is None:
            if start is None:
                raise PipelineError(
                    f"the sweep's trials start at stage {first}: train stage {first - 1} in "
                    "this run first, or set tune.init_checkpoint"
                )
            cfg = with_overrides(cfg, [f"tune.init_checkpoint={start}"])
        result = run_sweep(cfg, space, self.sweep_name(), storage=self.storage)
        if result.best is None:
            raise PipelineError(f"sweep {self.sweep_name()}: no trial reported a metric")
        best = result.best
        return {
            "summary": f"sweep {self.sweep_name()}: best {best['metric']} "
            f"{best['value']:.3f} with {best['params']}",
            "output": result.files["best"],
            "checkpoint": best["checkpoint"],
            "sweep": self.sweep_name(),
        }

    def sweep_name(self) -> str:
        return f"{self.plan.run_id}-sweep"

    def best_checkpoint(self) -> str:
        """The sweep's best, or the last trained stage's checkpoint."""
        tuned = self.state["steps"].get("tune", {})
        if tuned.get("status") == "finished":
            return tuned["checkpoint"]
        checkpoints = self.checkpoints()
        if not checkpoints:
            raise PipelineError("no checkpoint: this run trained no stage and ran no sweep")
        return checkpoints[max(checkpoints)]

    def step_evaluate(self) -> dict:
        from damo.eval.batch import EvalSettings, evaluate_checkpoint

        self.ensure_ray()
        split = self.plan.evaluate_split
        checkpoint = self.best_checkpoint()
        out = join(self.run_dir, "eval", split)
        metrics = evaluate_checkpoint(
            self.cfg,
            checkpoint,
            self.cfg.train.data.features,
            join(self.cfg.train.data.records, f"{split}.parquet"),
            out,
            EvalSettings(plots=4),
            self.storage,
        )
        model = metrics["metrics"].get("grounding", {}).get("model", {})
        headline = {key: round(model[key], 2) for key in ("mIoU", "R1@0.5") if key in model}
        shown = ", ".join(f"{key} {value:.1f}" for key, value in headline.items())
        return {
            "summary": f"{split} grounding: {shown or 'no grounding records'} -> {out}",
            "output": join(out, "metrics.json"),
            "checkpoint": checkpoint,
            "grounding": headline,
        }

    def step_deploy(self) -> dict:
        from damo.serve.local import start

        self.ensure_ray()
        checkpoint = self.best_checkpoint()
        url = start(self.cfg, checkpoint)
        return {"summary": f"served at {url} with {checkpoint}", "url": url}


def join_ray_quietly(cfg: DamoConfig, serve: bool = False) -> str:
    """Join (or start) the cluster of `cfg.ray` for a command that draws its own progress:
    workers' output, Ray Data's per-operator bars and Ray's driver-side messages stay off the
    console. Returns where they went, to tell the user. `serve`: the command will use Serve."""
    from damo.data.extract import connect_ray
    from damo.train.pipeline import ray_log_dir

    connect_ray(cfg, log_to_driver=False)
    import ray.data

    if serve:
        # Serve gives its logger a console handler when it is imported: import it now, so
        # that the redirection below covers it
        import ray.serve  # noqa: F401

    ray.data.DataContext.get_current().enable_progress_bars = False
    # connect_ray quietened the "ray" logger for ray.init's banner only; in a job too
    logging.getLogger("ray").setLevel(logging.INFO)
    where = ray_log_dir()
    if where is None:
        return "on the cluster (ray job logs, dashboard)"
    driver_log = Path(where) / "damo-driver.log"
    ray_logs_to_file(driver_log)
    return f"{where} (this driver's Ray messages: {driver_log.name})"


def ray_logs_to_file(path: Path) -> None:
    """Ray's own driver-side messages (its loggers, its deprecation warnings and the raylet's
    warnings relayed to the driver) go to `path` instead of the console, which keeps one line a
    step."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name, logger in list(logging.root.manager.loggerDict.items()):
        ours = name == "ray" or name.startswith("ray.")
        if ours and isinstance(logger, logging.Logger):
            consoles = [h for h in logger.handlers if is_console_handler(h)]
            logger.handlers = [h for h in logger.handlers if h not in consoles]
            if consoles and not logger.propagate:  # e.g. ray.serve: keep its lines, in the file
                logger.addHandler(handler)
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    ray_logger.propagate = False
    logging.captureWarnings(True)  # RayDeprecationWarning and friends, into the same file
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = [handler]
    warnings_logger.propagate = False
    raylet_messages_to(logging.getLogger("ray.raylet_messages"))


def is_console_handler(handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def raylet_messages_to(logger) -> None:
    """The raylet's warnings (worker start-up counts, retried tasks) reach the driver through
    Ray's error channel, which prints them with `print_to_stdstream` whatever `log_to_driver`
    says; Ray has no option for it, so its printer is wrapped. Lines from workers still go to
    the console as Ray prints them (log_to_driver decides those)."""
    from ray._private import worker

    printer = worker.print_to_stdstream
    if getattr(printer, "damo_wrapped", False):
        return

    def print_or_log(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                logger.warning("(raylet) %s", line)
            return None
        return printer(data, *args, **kwargs)

    print_or_log.damo_wrapped = True
    worker.print_to_stdstream = print_or_log


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_pipeline(
    cfg: DamoConfig,
    plan: PipelinePlan,
    storage: Storage | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run `plan`; the run's state. Ray is joined (or started, per the `ray` section) at the
    first step that needs it."""
    return Pipeline(cfg, plan, storage, log).run()
