"""`damo model` and `damo backbones`: presets and backbone checkpoints."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from damo.cli.common import (
    ConfigName,
    Overrides,
    console,
    err_console,
    friendly_errors,
    require_allowed_options,
)
from damo.config import load_config

model_app = typer.Typer(help="Inspect DaMO model presets (no weights).", no_args_is_help=True)


backbones_app = typer.Typer(help="Backbone checkpoints for DaMO.", no_args_is_help=True)


Preset = Annotated[str, typer.Argument(help="Named config (tiny, paper) or a YAML file.")]


@model_app.command("tokens")
@friendly_errors
def model_tokens(preset: Preset, overrides: Overrides = None) -> None:
    """Tokens per video at each step, encoders to soft prompt, and the compression ratio."""

    from damo.model.accounting import compression_ratio, naive_visual_tokens, token_steps

    cfg = load_config(preset, overrides or []).model
    table = Table(title=f"DaMO tokens per video ({preset})")
    for column in ("step", "visual", "audio", "total"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in token_steps(cfg):
        table.add_row(step.name, f"{step.visual:,}", f"{step.audio:,}", f"{step.total:,}")
    console.print(table)
    console.print(
        f"naive per-patch concatenation of every frame: {naive_visual_tokens(cfg):,} tokens; "
        f"soft prompt: {cfg.bridge.queries} tokens; ratio {compression_ratio(cfg):.1f}x"
    )


@model_app.command("params")
@friendly_errors
def model_params(preset: Preset, overrides: Overrides = None) -> None:
    """Parameter counts (frozen backbones, trainable components, per stage), on meta device."""

    from damo.model.accounting import compression_ratio, naive_visual_tokens, parameter_counts

    cfg = load_config(preset, overrides or []).model
    counts = parameter_counts(cfg)
    table = Table(title=f"DaMO parameters ({preset})")
    table.add_column("group")
    table.add_column("name")
    table.add_column("parameters", justify="right")
    for group in ("frozen", "components", "stages"):
        label = {"frozen": "frozen", "components": "trainable", "stages": "trained in"}[group]
        for name, value in counts[group].items():
            table.add_row(label, name, f"{value:,}")
    console.print(table)
    console.print(f"frozen total: {sum(counts['frozen'].values()):,}")
    console.print(f"trainable total: {sum(counts['components'].values()):,}")
    vision = cfg.vision.hub_id or cfg.vision.model_type
    llm = cfg.llm.hub_id or cfg.llm.model_type
    console.print(f"backbones: vision {vision} ({cfg.vision.library}), LLM {llm}", soft_wrap=True)
    console.print(
        f"LLM input tokens per video: {cfg.bridge.queries} soft-prompt tokens for "
        f"{naive_visual_tokens(cfg):,} per-patch tokens: ratio {compression_ratio(cfg):.1f}x",
        soft_wrap=True,
    )


@backbones_app.command("make-tiny")
@friendly_errors
def backbones_make_tiny(
    out: Annotated[str, typer.Option(help="Where to write vision/, audio/, text_encoder/, llm/.")],
    steps: Annotated[int, typer.Option(min=0, help="Pre-training steps of the tiny LLM.")] = 300,
    clips: Annotated[int, typer.Option(min=1, help="Synthetic clips whose text it reads.")] = 200,
    seed: int = 0,
    config: Annotated[
        str, typer.Option("--config", "-c", help="Config whose model.* arch fields to build.")
    ] = "tiny",
    overrides: Overrides = None,
) -> None:
    """Write tiny real HF backbones (tokenizer and LLM pre-trained on synthetic-world text)."""
    from damo.data.backbones import make_tiny_backbones
    from damo.storage import Storage

    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, out=out)
    timings = make_tiny_backbones(
        out,
        cfg=cfg.model,
        storage=Storage(cfg.storage.s3),
        steps=steps,
        num_clips=clips,
        seed=seed,
        log=console.print,
    )
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    console.print(f"tiny backbones written to {escape(out)} in {total:.1f}s")


@backbones_app.command("prepare")
@friendly_errors
def backbones_prepare(
    out: Annotated[
        str,
        typer.Option(
            help="Backbone root (path, file:// or s3://): writes <out>/llm, <out>/vision..."
        ),
    ],
    llava: Annotated[
        str | None,
        typer.Option(
            help="A LlavaNext checkpoint (hf download llava-hf/llava-v1.6-mistral-7b-hf): its "
            "language model becomes <out>/llm; the vision tower and projector are dropped."
        ),
    ] = None,
    vision: Annotated[
        str | None, typer.Option(help="A downloaded vision checkpoint, copied to <out>/vision.")
    ] = None,
    audio: Annotated[
        str | None, typer.Option(help="A downloaded Whisper checkpoint, copied to <out>/audio.")
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help="A downloaded text encoder, copied to <out>/text_encoder."),
    ] = None,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Put downloaded checkpoints into the backbone layout the platform loads (local or S3).

    The paper's LLM is the Mistral-7B inside LLaVA-v1.6: --llava extracts it as a standard
    causal-LM directory (safetensors, config, tokenizer, chat template) and reports what it
    dropped.
    """
    from damo.data.backbones import prepare_backbones
    from damo.storage import Storage

    sources = {
        name: source
        for name, source in (
            ("llm", llava),
            ("vision", vision),
            ("audio", audio),
            ("text_encoder", text_encoder),
        )
        if source is not None
    }
    if not sources:
        err_console.print(
            "[bold red]error:[/] nothing to prepare: pass --llava, --vision, --audio "
            "or --text-encoder"
        )
        raise typer.Exit(code=2)
    cfg = load_config(config or "default", overrides or [])
    prepare_backbones(
        out,
        sources,
        storage=Storage(cfg.storage.s3),
        log=lambda message: console.print(escape(message), soft_wrap=True),
    )
    console.print(f"backbones prepared under {escape(out)}: {', '.join(sources)}")
