"""Checkpoints: safetensors + JSON, only what DaMO trains; the backbones are referenced by path.

A checkpoint directory holds
  config.json              {"format": 1, "stage": ..., "model": ModelConfig, "extra": {...}}
  damo.safetensors         the DaMO-owned weights (residual, temporal, Fuseformer, bridge, heads)
  adapter/                 the LLM's LoRA adapter in PEFT's format (adapter_config.json +
                           adapter_model.safetensors), loadable with `PeftModel.from_pretrained`

It is written into a temporary sibling directory and renamed into place, so a reader never sees
half a checkpoint. No pickle: tensors go through safetensors, everything else through JSON.
Every way loading can fail (missing file, corrupt file, names or shapes that do not fit the
config) raises `CheckpointError`, naming the file and what does not match.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from damo.config.model import ModelConfig
from damo.model.backbones import Resolve
from damo.model.damo import OWNED_PREFIXES, DamoModel

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "damo.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into the model it describes."""


def owned_state_dict(model: DamoModel) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(OWNED_PREFIXES)
    }


def save_checkpoint(
    model: DamoModel,
    directory: str | os.PathLike,
    stage: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s trained weights to `directory` atomically (replacing an old one)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        save_file(
            {k: v.cpu() for k, v in owned_state_dict(model).items()},
            staging / WEIGHTS_FILE,
            metadata={"format": str(FORMAT_VERSION)},
        )
        if model.llm is not None:  # a model built without its LLM has no adapter to save
            model.llm.save_pretrained(staging / ADAPTER_DIR, safe_serialization=True)
        header = {
            "format": FORMAT_VERSION,
            "stage": stage,
            "adapter": model.llm is not None,
            "model": model.cfg.model_dump(mode="json"),
            "extra": extra or {},
        }
        (staging / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        retired = None
        if target.exists():  # swap: old aside, new in, old removed
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, retired)
        os.replace(staging, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is {directory} a DaMO checkpoint?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupt: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT_VERSION}")
    return header


def read_config(directory: str | os.PathLike) -> ModelConfig:
    header = read_header(directory)
    try:
        return ModelConfig.model_validate(header.get("model", {}))
    except ValidationError as err:
        path = Path(directory) / CONFIG_FILE
        raise CheckpointError(f"{path}: invalid model config: {err}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors file: {err}") from None


def _check_fits(path: Path, loaded: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """Same names and same shapes, or a CheckpointError listing what differs."""
    problems = []
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    for name in sorted(set(loaded) & set(expected)):
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"{name}: shape {tuple(loaded[name].shape)} in the file, "
                f"{tuple(expected[name].shape)} in the model"
            )
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} problems)" if len(problems) > 6 else ""
        )
        raise CheckpointError(f"{path}: does not fit the model config: {shown}")


def load_weights(model: DamoModel, directory: str | os.PathLike) -> DamoModel:
    """Load a checkpoint's DaMO weights and LoRA adapter into an existing model.

    A checkpoint saved without an LLM (stage 1) leaves the model's adapter as initialised
    (LoRA starts as the identity); a model without an LLM ignores a saved adapter."""
    directory = Path(directory)
    header = read_header(directory)
    weights_path = directory / WEIGHTS_FILE
    weights = _read_tensors(weights_path)
    expected = owned_state_dict(model)
    _check_fits(weights_path, weights, expected)
    adapter = None
    if model.llm is not None and header.get("adapter", True):
        adapter_path = directory / ADAPTER_DIR / ADAPTER_WEIGHTS
        adapter = _read_tensors(adapter_path)
        _check_fits(adapter_path, adapter, get_peft_model_state_dict(model.llm))
    model.load_state_dict(weights, strict=False)  # backbones are not in the file, by design
    if adapter is not None:
        set_peft_model_state_dict(model.llm, adapter)
    return model


def load_checkpoint(
    directory: str | os.PathLike,
    resolve: Resolve | None = None,
    device: str | torch.device | None = None,
    pretrained: bool = True,
    with_llm: bool = True,
) -> DamoModel:
    """Rebuild a DamoModel from a checkpoint: its config, its backbones, its weights.

    `directory` is local; for an object-storage URI pass `resolve` (e.g. `Storage().fetch_dir`),
    which also resolves the backbone paths named in the config. `with_llm=False` skips the
    LLM (retrieval needs only the video pathway, the heads and the text encoder).
    """
    local = Path(resolve(str(directory))) if resolve is not None else Path(directory)
    model = DamoModel.from_config(
        read_config(local), pretrained=pretrained, resolve=resolve, with_llm=with_llm
    )
    load_weights(model, local)
    return model.to(device) if device is not None else model
