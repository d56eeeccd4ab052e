"""`damo serve`: the grounding and QA service."""

from __future__ import annotations

from typing import Annotated

import typer

from damo.cli.common import (
    ConfigName,
    Overrides,
    console,
    err_console,
    friendly_errors,
)
from damo.config import load_config

ServedCheckpoint = Annotated[
    str, typer.Option(help="Checkpoint URI to serve ('best': the tuning registry's best).")
]
Port = Annotated[
    int | None, typer.Option(min=0, max=65535, help="Port (default serve.port; 0: free).")
]


@friendly_errors
def serve_command(
    checkpoint: ServedCheckpoint,
    config: ConfigName = None,
    overrides: Overrides = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host).")] = None,
    port: Port = None,
) -> None:
    """Run the grounding and QA service locally (Ray Serve) and print its URL; Ctrl-C stops it.

    The bearer token, when wanted, comes from the environment variable named by
    serve.auth_token_env (DAMO_SERVE_TOKEN); media URIs must lie in storage.allowed_prefixes.
    """
    import time

    from damo.data.extract import connect_ray
    from damo.serve.local import start
    from damo.train.registry import is_registry_name, resolve_checkpoint

    cfg = load_config(config, overrides or [])
    if is_registry_name(checkpoint):
        named, checkpoint = checkpoint, resolve_checkpoint(checkpoint, cfg)
        console.print(f"{named}: {checkpoint}", highlight=False)
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=update)})
    connect_ray(cfg)
    from ray import serve

    try:
        url = start(cfg, checkpoint)
        console.print(f"DaMO is served at {url}  (API docs: {url}docs)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        serve.shutdown()


@friendly_errors
def deploy_command(
    checkpoint: ServedCheckpoint,
    config: ConfigName = None,
    overrides: Overrides = None,
    port: Port = None,
) -> None:
    """Deploy the grounding and QA service on a running Ray cluster, print its URL and return;
    the app stays up (`serve status`, `serve shutdown`). For a service on this machine alone,
    use `damo serve`."""
    import os

    from damo.data.extract import connect_ray
    from damo.serve.local import start
    from damo.train.registry import is_registry_name, resolve_checkpoint

    cfg = load_config(config, overrides or [])
    if cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
        err_console.print(
            "[bold red]error:[/] deploy needs a running Ray cluster (RAY_ADDRESS, ray.address, "
            "or run it with ray job submit): a local one would end with this command. "
            "Use `damo serve` to serve from this machine."
        )
        raise typer.Exit(code=2)
    if is_registry_name(checkpoint):
        named, checkpoint = checkpoint, resolve_checkpoint(checkpoint, cfg)
        console.print(f"{named}: {checkpoint}", highlight=False)
    if port is not None:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": port})})
    connect_ray(cfg)
    url = start(cfg, checkpoint)
    console.print(f"DaMO is deployed at {url}  (API docs: {url}docs)", highlight=False)
