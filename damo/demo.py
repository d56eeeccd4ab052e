"""`make demo`: the whole platform end to end on one machine, with nothing set up beforehand.

An embedded S3 server, then the pipeline (`damo.pipeline`): tiny backbones -> synthetic AV
world -> Ray Data feature extraction -> the four training stages (Ray Train) -> batch
evaluation (Ray Data); then the metrics table, the report copied to a local folder, and the
server stops.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from damo.config import DamoConfig
from damo.config.loader import with_overrides
from damo.storage import Storage, join
from damo.storage.s3server import EmbeddedS3Server

BUCKET = "s3://damo-demo"
# the demo's sweep (tune_spaces/demo.yaml): two stage-4 learning rates, each trial from the
# run's stage-3 checkpoint, so that the best trial, which is deployed, has had all four stages
SPACE = "demo"


@dataclass
class DemoSize:
    """How big the demo is: `full` for `make demo`, `smoke` for the CI test of the same path."""

    clips: int
    lm_steps: int
    max_steps: int | None  # per stage; None: the preset's epochs
    questions: int = 4  # asked of the deployed service, about held-out (test split) clips

    @classmethod
    def named(cls, name: str) -> DemoSize:
        sizes = {
            # 585 s on 2 cores (fresh clone, README); six Ray Train runs (4 stages, 2 trials),
            # each with about half a minute of fixed cost, are half of it
            "full": cls(clips=40, lm_steps=200, max_steps=None),
            "smoke": cls(clips=20, lm_steps=30, max_steps=2, questions=2),
        }
        if name not in sizes:
            raise ValueError(f"unknown demo size {name!r} (known: {', '.join(sizes)})")
        return sizes[name]


def demo_config(cfg: DamoConfig, server_s3, size: DemoSize) -> DamoConfig:
    """The given config pointed at the demo bucket, sized for 2 CPUs (a sweep trial and its
    Train worker leave Ray Data a CPU), and shortened for the smoke size."""
    videos = join(BUCKET, "world", "videos")
    demo = with_overrides(
        cfg,
        [
            f"storage.root={BUCKET}",
            # the service answers about the demo's own clips, and nothing else
            f"storage.allowed_prefixes=[{videos}]",
            f"train.runs_root={join(BUCKET, 'runs')}",
            f"train.data.features={join(BUCKET, 'features')}",
            f"train.data.records={join(BUCKET, 'world', 'records')}",
            "train.scaling.cpus_per_worker=0.5",
            f"tune.sweeps_root={join(BUCKET, 'sweeps')}",
            f"tune.registry={join(BUCKET, 'registry')}",
            "tune.trial_cpus=0.5",
            "tune.last_stage=4",
            "serve.port=0",
            *(
                f"train.stages.stage{stage}.max_steps={size.max_steps}"
                for stage in (1, 2, 3, 4)
                if size.max_steps is not None
            ),
        ],
    )
    update = {
        "storage": demo.storage.model_copy(update={"s3": server_s3}),
        "model": demo.model.with_backbones_at(join(BUCKET, "backbones", "tiny")),
    }
    return DamoConfig.model_validate(demo.model_copy(update=update).model_dump())


def ask_service(url: str, storage: Storage, records_uri: str, count: int) -> list[dict]:
    """POST /v1/ground for the first `count` grounding records of a split; each question with
    the service's answer and the ground truth."""
    from damo.data.records import read_records

    records = [
        r for r in read_records(records_uri, storage).to_pylist() if r["task"] == "grounding"
    ]
    asked = []
    for record in records[:count]:
        body = json.dumps({"video": record["video_uri"], "query": record["query"]}).encode()
        request = urllib.request.Request(
            url + "v1/ground", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        asked.append({"record": record, "answer": answer})
    return asked


def answers_table(asked: list[dict]) -> Table:
    table = Table(title="the deployed service, asked about held-out clips")
    for column in ("clip", "query", "answer", "predicted", "ground truth"):
        table.add_column(column)
    for item in asked:
        record, answer = item["record"], item["answer"]
        predicted = f"{answer['start']:.1f}-{answer['end']:.1f} s" if answer["found"] else "-"
        truth = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in record["spans"])
        clip = record["video_uri"].rsplit("/", 1)[-1]
        table.add_row(clip, record["query"], answer["answer"], predicted, truth)
    return table


def run_demo(
    cfg: DamoConfig,
    console: Console,
    size: str = "full",
    keep: Path = Path(".damo/demo"),
    wait: bool = True,
) -> bool:
    """Run the pipeline, ask the deployed service about held-out clips, and (on a terminal,
    with `wait`) keep it up until Enter; True when every step finished. The report is copied
    under `keep`."""
    import ray

    from damo.pipeline import PipelinePlan, run_pipeline
    from damo.train.pipeline import read_manifest, run_uri

    demo_size = DemoSize.named(size)
    keep.mkdir(parents=True, exist_ok=True)
    server = EmbeddedS3Server(cfg.storage.embedded, data_dir=str(keep / "storage"))
    started = time.monotonic()
    with server as state:
        console.print(
            f"embedded S3 server at [bold]{state.endpoint_url}[/] (data in {server.data_dir})"
        )
        cfg = demo_config(cfg, state.s3_config(), demo_size)
        storage = Storage(cfg.storage.s3)
        storage.ensure_bucket(BUCKET)
        run_id = time.strftime("demo-%Y%m%d-%H%M%S")
        plan = PipelinePlan(
            run_id,
            tiny_backbones=True,
            lm_steps=demo_size.lm_steps,
            world=join(BUCKET, "world"),
            clips=demo_size.clips,
            space=SPACE,
            deploy=True,
        )
        try:
            pipeline = run_pipeline(
                cfg, plan, storage, log=lambda line: console.print(escape(line), highlight=False)
            )
            run = run_uri(cfg, run_id)
            manifest = read_manifest(storage, run)
            eval_uri = join(run, "eval", plan.evaluate_split)
            result = json.loads(storage.read_bytes(join(eval_uri, "metrics.json")))
            local_report = keep / "report" / run_id
            for uri in storage.list(eval_uri + "/"):
                storage.download_file(uri, local_report / uri[len(eval_uri) + 1 :])
            storage.download_file(join(run, "loss_curves.png"), local_report / "loss_curves.png")
            url = pipeline["steps"]["deploy"]["url"]
            test_records = join(cfg.train.data.records, f"{plan.evaluate_split}.parquet")
            asked = ask_service(url, storage, test_records, demo_size.questions)
            print_results(console, manifest, result, pipeline, local_report, asked)
            console.print(
                f"web page: [bold]{url}[/]  (API docs: {url}docs); ask about "
                f"{escape(join(BUCKET, 'world', 'videos'))}/<clip>.mp4"
            )
            if wait and sys.stdin.isatty():
                console.input("the service stays up: press Enter to stop it ")
        finally:
            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()
    console.print(f"total {time.monotonic() - started:.0f}s")
    finished = all(e["status"] == "finished" for e in manifest["stages"].values()) and all(
        item["answer"]["answer"] for item in asked
    )
    console.print("[bold green]demo finished[/]" if finished else "[bold red]demo FAILED[/]")
    return finished


def print_results(console, manifest, result, pipeline, local_report, asked) -> None:
    from damo.eval.report import metrics_table

    table = Table(title="training")
    for column in ("stage", "val loss (start -> best)", "steps", "wall s"):
        table.add_column(column)
    for stage, entry in sorted(manifest["stages"].items()):
        m = entry["metrics"]
        table.add_row(
            f"{stage} {entry['name']}",
            f"{m['first_val_loss']:.3f} -> {m['best_val_loss']:.3f}",
            str(m["steps"]),
            str(entry["wall_s"]),
        )
    console.print(table)
    console.print(f"sweep: {escape(pipeline['steps']['tune']['summary'])}", highlight=False)
    console.print(metrics_table(result["metrics"]), markup=False, highlight=False)
    console.print(f"report, plots and loss curves: [bold]{local_report}[/] (report.md)")
    console.print(answers_table(asked))
    timings = {name: step.get("wall_s", 0.0) for name, step in pipeline["steps"].items()}
    console.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
