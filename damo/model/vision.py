"""The frozen vision tower, from transformers (OpenAI CLIP) or timm (EVA-CLIP), behind one contract.

`VisionTower(pixel_values)` gives (N, 1+P, Dv) per frame: the CLS token first, then the P patch
tokens, taken from the layer `feature_layer` names (HF's hidden_states numbering: -1 the last
layer, -2 the penultimate, k > 0 the k-th), before any final norm. This is exactly what HF's
`CLIPVisionModel(...).last_hidden_state` gives for -1, and what DaMO's extraction caches.

A timm backbone directory is what `timm.models.save_for_hf` writes and what the hub's
`timm/<architecture>.<tag>` repositories hold (config.json with `architecture`, `model_args` and
`pretrained_cfg`, plus model.safetensors). Its preprocessing (resize, crop, mean/std,
interpolation) comes from that `pretrained_cfg`, through timm's own transforms.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from damo.config.model import VisionEncoderConfig


def _timm():
    try:
        import timm
    except ImportError as err:  # a runtime dependency; the message says how to get it
        raise RuntimeError("timm vision backbones need timm: pip install timm") from err
    return timm


def timm_model(
    cfg: VisionEncoderConfig, directory: Path | None = None, hub: bool = False
) -> nn.Module:
    """The timm image tower without its projection head: from `directory` when given (weights
    and the checkpoint's own model args; a hub name when `hub`), else built at random from
    `model_type` + `arch`."""
    timm = _timm()
    if directory is None:
        return timm.create_model(cfg.model_type, pretrained=False, num_classes=0, **cfg.arch)
    source = f"hf-hub:{directory}" if hub else f"local-dir:{directory}"
    # num_classes=0 drops the CLIP projection head: timm skips its weights when loading
    return timm.create_model(source, pretrained=True, num_classes=0)


@functools.lru_cache(maxsize=32)
def _timm_geometry(model_type: str, arch_json: str) -> tuple[int, int, int]:
    with torch.device("meta"):
        model = _timm().create_model(
            model_type, pretrained=False, num_classes=0, **json.loads(arch_json)
        )
    grid = model.patch_embed.grid_size
    return model.embed_dim, grid[0] * grid[1], len(model.blocks)


def timm_geometry(cfg: VisionEncoderConfig) -> tuple[int, int, int]:
    """(width Dv, patches P, depth) of a timm tower, from a meta-device build (no weights)."""
    return _timm_geometry(cfg.model_type, json.dumps(cfg.arch, sort_keys=True))


class VisionTower(nn.Module):
    """A frozen image encoder giving (N, 1+P, Dv): CLS, then patches, from `feature_layer`."""

    def __init__(self, model: nn.Module, library: str, feature_layer: int = -1):
        super().__init__()
        self.model = model
        self.library = library
        self.feature_layer = feature_layer
        if library == "timm":
            grid = model.patch_embed.grid_size
            self.width, self.patches = model.embed_dim, grid[0] * grid[1]
            self.depth = len(model.blocks)
            if model.num_prefix_tokens != 1:
                raise ValueError(
                    f"the vision contract needs exactly one prefix (CLS) token; this timm "
                    f"model has {model.num_prefix_tokens}"
                )
        else:
            config = model.config
            self.width = config.hidden_size
            self.patches = (config.image_size // config.patch_size) ** 2
            self.depth = config.num_hidden_layers
        if not -self.depth <= feature_layer <= self.depth or feature_layer == 0:
            raise ValueError(
                f"feature_layer {feature_layer} does not name one of the {self.depth} layers "
                f"(use -1..-{self.depth} or 1..{self.depth})"
            )

    @property
    def block_index(self) -> int:
        """0-based index of the block whose output the features are."""
        return self.feature_layer - 1 if self.feature_layer > 0 else self.depth + self.feature_layer

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed frames -> (N, 1+P, Dv)."""
        dtype = next(self.model.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if self.library == "timm":
            ((patches, prefix),) = self.model.forward_intermediates(
                pixel_values,
                indices=[self.block_index],
                return_prefix_tokens=True,
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )  # patches (N, P, Dv), prefix (N, 1, Dv)
            return torch.cat([prefix, patches], dim=1)
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return hidden[self.feature_layer]  # hidden[0] is the embeddings, hidden[k] layer k


class TimmImageProcessor:
    """Frames -> pixel values with a timm model's own eval transform (its pretrained_cfg: resize
    by crop_pct, centre crop, interpolation, mean/std). Called like HF's image processors."""

    def __init__(self, data_config: dict[str, Any]):
        from timm.data import create_transform

        self.data_config = dict(data_config)
        self.transform = create_transform(**self.data_config, is_training=False)

    @classmethod
    def for_model(cls, model: nn.Module) -> TimmImageProcessor:
        from timm.data import resolve_data_config

        return cls(resolve_data_config({}, model=model))

    @staticmethod
    def _to_pil(frame):
        from PIL import Image

        if isinstance(frame, Image.Image):
            return frame.convert("RGB")
        array = np.asarray(frame)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        if array.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB, got {array.dtype}")
        return Image.fromarray(array, mode="RGB")

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, Tensor]:
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        pixels = torch.stack([self.transform(self._to_pil(frame)) for frame in images])
        return {"pixel_values": pixels}  # (N, 3, H', W')
