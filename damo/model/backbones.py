"""Pretrained backbones (vision, audio, text encoder, LLM) and the frozen encoders.

A backbone is either loaded with `from_pretrained` from a local directory (an object-storage URI
is first turned into one by `resolve`, e.g. `Storage().fetch_dir`), or built from its `arch`
fields alone: at random, or on the meta device for counting parameters and checking shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from damo.config.model import (
    AudioEncoderConfig,
    BackboneConfig,
    LLMConfig,
    ModelConfig,
    VisionEncoderConfig,
)
from damo.model.vision import TimmImageProcessor, VisionTower, timm_geometry, timm_model

Resolve = Callable[[str], Path]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A directory holds weights when it has one of these (transformers, sharded, timm).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class MissingBackboneError(FileNotFoundError):
    """A backbone's weights are not where the config points; the message says how to get them."""


def local_dir(path: str, resolve: Resolve | None) -> Path:
    """A backbone's local directory: `resolve(path)` when given, else the path itself."""
    return Path(resolve(path)) if resolve is not None else Path(path)


def is_hub_name(path: str) -> bool:
    """`owner/name` that is not an existing local path: transformers fetches it from the hub."""
    return bool(_HUB_NAME.match(path)) and not Path(path).exists()


def fetch_instructions(name: str, cfg: BackboneConfig) -> str:
    """The commands that put backbone `name` where `cfg.path` points."""
    root = cfg.path.rstrip("/").rsplit("/", 1)[0]
    if cfg.hub_id is None:
        return (
            f"no hub_id is configured for model.{name}; tiny backbones are built with "
            f"`damo backbones make-tiny --out {root}`"
        )
    download = Path(".damo/downloads") / cfg.hub_id.rsplit("/", 1)[-1]
    fetch = f"hf download {cfg.hub_id} --local-dir {download}"
    if getattr(cfg, "hub_format", "causal_lm") == "llava_next":
        return (
            f"it is the language model of the LlavaNext checkpoint {cfg.hub_id}: fetch it with "
            f"`{fetch}`, then extract it with "
            f"`damo backbones prepare --llava {download} --out {root}`"
        )
    if "://" in cfg.path and not cfg.path.startswith("file://"):
        return (
            f"fetch it with `{fetch}`, then put it in place with "
            f"`damo backbones prepare --{name.replace('_', '-')} {download} --out {root}`"
        )
    return f"fetch it with `hf download {cfg.hub_id} --local-dir {cfg.path}`"


def _missing(name: str, cfg: BackboneConfig, where: str) -> MissingBackboneError:
    hub = f" ({cfg.hub_id})" if cfg.hub_id else ""
    return MissingBackboneError(
        f"model.{name}{hub}: no weights at {where}; {fetch_instructions(name, cfg)}"
    )


def locate(name: str, cfg: BackboneConfig, resolve: Resolve | None) -> Path:
    """The local directory of backbone `name`, or a MissingBackboneError saying how to fetch it.

    Checked before anything is loaded, so a missing text encoder fails before a 7B LLM loads.
    """
    if is_hub_name(cfg.path):
        if not _hub_cached(cfg.path):
            raise _missing(name, cfg, f"the hub cache (offline) for {cfg.path}")
        return Path(cfg.path)
    try:
        directory = local_dir(cfg.path, resolve)
    except Exception as err:
        # object storage says not_found (damo.storage.StorageError.reason) or the OS does
        if getattr(err, "reason", None) == "not_found" or isinstance(err, FileNotFoundError):
            raise _missing(name, cfg, cfg.path) from None
        raise
    has_config = (directory / "config.json").is_file()
    if not has_config or not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise _missing(name, cfg, f"{cfg.path} (local {directory})")
    return directory


def require_present(name: str, cfg: BackboneConfig, exists: Callable[[str], bool]) -> None:
    """A cheap check, before a job starts workers that would load backbone `name`, that its
    config.json is where the config points (`exists` answers for a path or URI)."""
    if is_hub_name(cfg.path):
        if not _hub_cached(cfg.path):
            raise _missing(name, cfg, f"the hub cache (offline) for {cfg.path}")
    elif not exists(f"{cfg.path.rstrip('/')}/config.json"):
        raise _missing(name, cfg, cfg.path)


def _hub_cached(repo_id: str) -> bool:
    """Online, transformers downloads a hub name; offline it must be in the local cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def arch_config(cfg: BackboneConfig) -> PretrainedConfig:
    return AutoConfig.for_model(cfg.model_type, **cfg.arch)


def _vision_class(config: PretrainedConfig) -> type[nn.Module]:
    """The vision tower class of a config: CLIPVisionModel for a full CLIP checkpoint."""
    vision_config = getattr(config, "vision_config", None)
    return MODEL_MAPPING[type(vision_config if vision_config is not None else config)]


def load_vision(cfg: VisionEncoderConfig, pretrained: bool, resolve: Resolve | None) -> VisionTower:
    if cfg.library == "timm":
        directory = locate("vision", cfg, resolve) if pretrained else None
        model = timm_model(cfg, directory, hub=pretrained and is_hub_name(cfg.path))
        return VisionTower(model, "timm", cfg.feature_layer)
    if not pretrained:
        model = AutoModel.from_config(arch_config(cfg))
    else:
        path = locate("vision", cfg, resolve)
        model = _vision_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
    return VisionTower(model, "transformers", cfg.feature_layer)


def load_image_processor(cfg: VisionEncoderConfig, tower: VisionTower, resolve: Resolve | None):
    """The backbone's own preprocessing: timm's pretrained_cfg, or the HF image processor."""
    if cfg.library == "timm":
        return TimmImageProcessor.for_model(tower.model)
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(locate("vision", cfg, resolve))


def load_audio(cfg: AudioEncoderConfig, pretrained: bool, resolve: Resolve | None) -> nn.Module:
    """The Whisper encoder alone (the decoder is dropped)."""
    if pretrained:
        whisper = AutoModel.from_pretrained(locate("audio", cfg, resolve))
    else:
        whisper = AutoModel.from_config(arch_config(cfg))
    return whisper.get_encoder()


def load_text_encoder(cfg: BackboneConfig, pretrained: bool, resolve: Resolve | None) -> nn.Module:
    if pretrained:
        return AutoModel.from_pretrained(locate("text_encoder", cfg, resolve))
    return AutoModel.from_config(arch_config(cfg))


def load_llm(
    cfg: LLMConfig,
    pretrained: bool,
    resolve: Resolve | None,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
):
    """The causal LM, straight into `dtype` on `device`.

    transformers (v5) builds the model on the meta device and then fills each parameter from
    the (memory-mapped) safetensors shards, cast to `dtype` and placed on `device` by
    `device_map`: a 7B model never exists twice, nor at float32, nor on the CPU first.
    """
    if not pretrained:
        return AutoModelForCausalLM.from_config(arch_config(cfg), dtype=dtype)
    device_map = {"": str(torch.device(device))} if device is not None else None
    return AutoModelForCausalLM.from_pretrained(
        locate("llm", cfg, resolve), dtype=dtype, device_map=device_map
    )


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Recompute the LLM's layer activations in the backward pass (HF's own mechanism).

    Non-reentrant checkpointing needs no input that requires grad, so it works with a frozen
    base and LoRA, whose only trainable inputs are the adapter weights and the soft prompt.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x
        llm.activation_checkpointing_enable(kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def vision_geometry(cfg: VisionEncoderConfig) -> tuple[int, int]:
    """(width Dv, patches P per frame) of the vision encoder described by `arch`."""
    if cfg.library == "timm":
        width, patches, _ = timm_geometry(cfg)
        return width, patches
    config = arch_config(cfg)
    config = getattr(config, "vision_config", None) or config
    patches = (config.image_size // config.patch_size) ** 2
    return config.hidden_size, patches


def check_geometry(cfg: ModelConfig, vision: VisionTower, audio_config) -> None:
    """The model is sized from `arch`; a checkpoint of another size must fail loudly here."""
    expected_dim, expected_patches = vision_geometry(cfg.vision)
    problems = []
    if (vision.width, vision.patches) != (expected_dim, expected_patches):
        problems.append(
            f"vision {cfg.vision.path}: width {vision.width}, {vision.patches} patches; "
            f"model.vision.arch says {expected_dim}, {expected_patches}"
        )
    expected_audio = int(cfg.audio.arch.get("d_model", 768))
    if audio_config.d_model != expected_audio:
        problems.append(
            f"audio {cfg.audio.path}: width {audio_config.d_model}; "
            f"model.audio.arch says {expected_audio}"
        )
    if problems:
        raise ValueError("encoder checkpoints do not match the config: " + "; ".join(problems))


class FrozenEncoders(nn.Module):
    """The frozen vision and audio encoders that feature extraction runs once per video.

    `encode_frames` and `encode_audio` produce exactly the tensors of the `VideoFeatures`
    contract (damo/model/video.py), per frame and per segment; extraction stacks them per video.
    """

    def __init__(self, vision: VisionTower, audio: nn.Module, audio_cfg: AudioEncoderConfig):
        super().__init__()
        self.vision = freeze(vision)
        self.audio = freeze(audio)
        self.tokens_per_segment = audio_cfg.tokens_per_segment
        self.window_frames = audio_cfg.window_frames
        self.image_processor = None
        self.audio_processor = None

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, pretrained: bool = True, resolve: Resolve | None = None
    ) -> FrozenEncoders:
        if pretrained:  # every backbone present before any loads
            locate("vision", cfg.vision, resolve)
            locate("audio", cfg.audio, resolve)
        encoders = cls(
            load_vision(cfg.vision, pretrained, resolve),
            load_audio(cfg.audio, pretrained, resolve),
            cfg.audio,
        )
        if pretrained:
            from transformers import WhisperFeatureExtractor

            check_geometry(cfg, encoders.vision, encoders.audio.config)
            encoders.image_processor = load_image_processor(cfg.vision, encoders.vision, resolve)
            encoders.audio_processor = WhisperFeatureExtractor.from_pretrained(
                locate("audio", cfg.audio, resolve)
            )
        return encoders

    def train(self, mode: bool = True) -> FrozenEncoders:
        return super().train(False)  # always eval: no dropout, frozen statistics

    @torch.no_grad()
    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed frames -> (N, 1+P, Dv): CLS then patch tokens."""
        return self.vision(pixel_values)

    @torch.no_grad()
    def encode_audio(self, mel: Tensor) -> Tensor:
        """(N, n_mels, window) log-mel segments, zero-padded to Whisper's window -> (N, L, Da).

        Only the first L = segment_seconds x 50 tokens are kept: the rest encode padding.
        """
        if mel.shape[-1] != self.window_frames:
            raise ValueError(
                f"mel segments must have {self.window_frames} frames (the encoder's window), "
                f"got {mel.shape[-1]}"
            )
        dtype = next(self.audio.parameters()).dtype
        hidden = self.audio(input_features=mel.to(dtype)).last_hidden_state  # (N, window/2, Da)
        return hidden[:, : self.tokens_per_segment]

    def preprocess_frames(self, frames: list) -> Tensor:
        """RGB frames (H, W, 3 uint8 arrays or PIL images) -> pixel values (N, 3, H', W')."""
        if self.image_processor is None:
            raise RuntimeError("no image processor: load the encoders with pretrained=True")
        return self.image_processor(images=frames, return_tensors="pt")["pixel_values"]

    def preprocess_audio(self, waveforms: list, sampling_rate: int = 16000) -> Tensor:
        """16 kHz mono waveforms (one per segment) -> log-mel (N, n_mels, window)."""
        if self.audio_processor is None:
            raise RuntimeError("no audio processor: load the encoders with pretrained=True")
        features = self.audio_processor(
            waveforms, sampling_rate=sampling_rate, return_tensors="pt", padding="max_length"
        )
        return features["input_features"]
