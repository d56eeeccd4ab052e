"""What every command shares: the consoles, the --config/--set options and the one-line errors."""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from damo.config import ConfigError
from damo.storage import StorageError
from damo.storage.s3server import EmbeddedS3Error

console = Console()


err_console = Console(stderr=True)


ConfigName = Annotated[
    str | None, typer.Option("--config", "-c", help="Named config or path to a YAML file.")
]


Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, e.g. --set storage.s3.region=eu-west-1."),
]


# Expected errors of modules that load lazily (torch, transformers): an error can only be of one
# of these types once its module is loaded, so the check never imports them.
LAZY_ERRORS = (
    ("damo.model.backbones", "MissingBackboneError"),
    ("damo.model.llava", "LlavaConversionError"),
    ("damo.train.registry", "RegistryError"),
    ("damo.tune.trial", "SweepError"),
    ("damo.tune.space", "SpaceError"),
    ("damo.pipeline", "PipelineError"),
    ("damo.cluster", "ClusterError"),
    ("damo.data.records", "RecordFormatError"),
    ("damo.data.dataset_import", "DatasetImportError"),
)


def expected_errors() -> tuple[type[Exception], ...]:
    lazy = tuple(
        getattr(sys.modules[module], name) for module, name in LAZY_ERRORS if module in sys.modules
    )
    return (ConfigError, StorageError, EmbeddedS3Error, *lazy)


def friendly_errors(func):
    """Turn the project's expected errors into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            if not isinstance(err, expected_errors()):
                raise
            err_console.print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper


def require_allowed_options(cfg, **uris: str | None) -> None:
    """Every URI given on the command line must lie under `storage.allowed_prefixes` (when
    that list is set); the error names the option. Config values are the operator's own."""
    from damo.storage import require_allowed

    for option, uri in uris.items():
        if uri is not None:
            require_allowed(uri, cfg.storage, f"--{option.replace('_', '-')}")
