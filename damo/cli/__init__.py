"""The `damo` command. Each subcommand parses options and calls into the package; one
module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

import damo
from damo.cli import (
    cluster,
    config,
    data,
    evaluate,
    model,
    pipeline,
    serve,
    storage,
    train,
    tune,
)
from damo.cli.common import console

app = typer.Typer(
    help="DaMO platform: train, tune, evaluate and serve an audio-visual Video LLM on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"damo {damo.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """DaMO platform command line."""


app.add_typer(config.config_app, name="config")
app.add_typer(storage.storage_app, name="storage")
app.add_typer(model.model_app, name="model")
app.add_typer(model.backbones_app, name="backbones")
app.add_typer(data.data_app, name="data")
app.add_typer(train.train_app, name="train")
app.add_typer(tune.tune_app, name="tune")
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(cluster.cluster_app, name="cluster")
app.command("pipeline")(pipeline.pipeline_command)
app.command("demo")(pipeline.demo_command)
app.command("extract")(data.extract_command)
app.command("serve")(serve.serve_command)
app.command("deploy")(serve.deploy_command)
