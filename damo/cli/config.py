"""`damo config`: inspect pipeline configs."""

from __future__ import annotations

from typing import Annotated

import typer

from damo.cli.common import (
    Overrides,
    console,
    friendly_errors,
)
from damo.config import available_configs, config_to_yaml, load_config

config_app = typer.Typer(help="Inspect pipeline configs.", no_args_is_help=True)


@config_app.command("show")
@friendly_errors
def config_show(
    name: Annotated[str, typer.Argument(help="Named config or path to a YAML file.")] = "default",
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config (bases merged, overrides applied, defaults filled)."""
    typer.echo(config_to_yaml(load_config(name, overrides or [])), nl=False)


@config_app.command("list")
def config_list() -> None:
    """List the named configs shipped with the package."""
    for name in available_configs():
        console.print(name)
