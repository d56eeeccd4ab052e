"""Pretrained backbones (vision, audio, text encoder, LLM) and the frozen encoders.

A backbone is either loaded with `from_pretrained` from a local directory (an object-storage URI
is first turned into one by `resolve`, e.g. `Storage().fetch_dir`), or built from its `arch`
fields alone: at random, or on the meta device for counting parameters and checking shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from damo.config.model import AudioEncoderConfig, BackboneConfig, ModelConfig, VisionEncoderConfig

Resolve = Callable[[str], Path]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_dir(path: str, resolve: Resolve | None) -> Path:
    """A backbone's local directory: `resolve(path)` when given, else the path itself."""
    return Path(resolve(path)) if resolve is not None else Path(path)


def arch_config(cfg: BackboneConfig) -> PretrainedConfig:
    return AutoConfig.for_model(cfg.model_type, **cfg.arch)


def _vision_class(config: PretrainedConfig) -> type[nn.Module]:
    """The vision tower class of a config: CLIPVisionModel for a full CLIP checkpoint."""
    vision_config = getattr(config, "vision_config", None)
    return MODEL_MAPPING[type(vision_config if vision_config is not None else config)]


def load_vision(cfg: VisionEncoderConfig, pretrained: bool, resolve: Resolve | None) -> nn.Module:
    if not pretrained:
        return AutoModel.from_config(arch_config(cfg))
    path = local_dir(cfg.path, resolve)
    return _vision_class(AutoConfig.from_pretrained(path)).from_pretrained(path)


def load_audio(cfg: AudioEncoderConfig, pretrained: bool, resolve: Resolve | None) -> nn.Module:
    """The Whisper encoder alone (the decoder is dropped)."""
    if pretrained:
        whisper = AutoModel.from_pretrained(local_dir(cfg.path, resolve))
    else:
        whisper = AutoModel.from_config(arch_config(cfg))
    return whisper.get_encoder()


def load_text_encoder(cfg: BackboneConfig, pretrained: bool, resolve: Resolve | None) -> nn.Module:
    if pretrained:
        return AutoModel.from_pretrained(local_dir(cfg.path, resolve))
    return AutoModel.from_config(arch_config(cfg))


def load_llm(cfg: BackboneConfig, pretrained: bool, resolve: Resolve | None, dtype: torch.dtype):
    if pretrained:
        return AutoModelForCausalLM.from_pretrained(local_dir(cfg.path, resolve), dtype=dtype)
    return AutoModelForCausalLM.from_config(arch_config(cfg), dtype=dtype)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def vision_geometry(cfg: VisionEncoderConfig) -> tuple[int, int]:
    """(width Dv, patches P per frame) of the vision encoder described by `arch`."""
    config = arch_config(cfg)
    config = getattr(config, "vision_config", None) or config
    patches = (config.image_size // config.patch_size) ** 2
    return config.hidden_size, patches


def check_geometry(cfg: ModelConfig, vision_config, audio_config) -> None:
    """The model is sized from `arch`; a checkpoint of another size must fail loudly here."""
    expected_dim, expected_patches = vision_geometry(cfg.vision)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    problems = []
    if (vision_config.hidden_size, patches) != (expected_dim, expected_patches):
        problems.append(
            f"vision {cfg.vision.path}: width {vision_config.hidden_size}, {patches} patches; "
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

    def __init__(self, vision: nn.Module, audio: nn.Module, audio_cfg: AudioEncoderConfig):
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
        encoders = cls(
            load_vision(cfg.vision, pretrained, resolve),
            load_audio(cfg.audio, pretrained, resolve),
            cfg.audio,
        )
        if pretrained:
            from transformers import AutoImageProcessor, WhisperFeatureExtractor

            check_geometry(cfg, encoders.vision.config, encoders.audio.config)

            encoders.image_processor = AutoImageProcessor.from_pretrained(
                local_dir(cfg.vision.path, resolve)
            )
            encoders.audio_processor = WhisperFeatureExtractor.from_pretrained(
                local_dir(cfg.audio.path, resolve)
            )
        return encoders

    def train(self, mode: bool = True) -> FrozenEncoders:
        return super().train(False)  # always eval: no dropout, frozen statistics

    @torch.no_grad()
    def encode_frames(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed frames -> (N, 1+P, Dv): CLS then patch tokens."""
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state

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
