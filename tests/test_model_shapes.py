"""Shapes at every step of the DaMO pathway, for the tiny preset and the paper preset (meta)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config
from damo.model.accounting import compression_ratio, conv_length, token_steps
from damo.model.backbones import FrozenEncoders, vision_geometry
from damo.model.damo import DamoModel, random_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _expected(cfg):
    _, patches = vision_geometry(cfg.vision)
    return {
        "patches": patches,
        "visual_slots": patches // cfg.residual.visual_compression,  # both presets divide
        "audio_slots": cfg.audio.tokens_per_segment // cfg.residual.audio_compression,
        "frames_after_conv": conv_length(cfg.frames, cfg.temporal.kernel, cfg.temporal.stride),
    }


def _check_every_step(model: DamoModel, batch: int, device: str) -> None:
    cfg = model.cfg
    exp = _expected(cfg)
    width, llm_width = cfg.fuseformer.width, model.llm.get_input_embeddings().embedding_dim
    video = random_video(cfg, batch, device=device)
    assert video.visual.shape == (batch, cfg.frames, 1 + exp["patches"], video.visual.shape[-1])
    pathway = model.pathway
    visual = pathway.visual_residual(video.visual[:, :, 1:], video.visual[:, :, 0])
    assert visual.shape == (batch, cfg.frames, exp["visual_slots"], width)
    audio = pathway.audio_residual(video.audio, video.audio.mean(2))
    assert audio.shape == (batch, cfg.audio_segments, exp["audio_slots"], width)
    visual, times, mask = pathway.visual_temporal(visual, video.visual_times, video.visual_mask)
    assert visual.shape == (batch, exp["frames_after_conv"], exp["visual_slots"], width)
    assert times.shape == mask.shape == (batch, exp["frames_after_conv"])
    fusion = pathway.fusion_tokens(video)
    assert fusion.shape == (batch, cfg.fuseformer.fusion_tokens, width)
    assert pathway.bridge.query_states(fusion).shape == (batch, cfg.bridge.queries, width)
    assert pathway(video).shape == (batch, cfg.bridge.queries, llm_width)
    # the soft prompt lands in the LLM's input sequence
    length = cfg.bridge.queries + 5
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    ids[:, 2 : 2 + cfg.bridge.queries] = model.video_token_id
    assert model.llm_inputs(video, ids).shape == (batch, length, llm_width)


def test_tiny_shapes_at_every_step():
    cfg = load_config("tiny").model
    _check_every_step(DamoModel.from_config(cfg, pretrained=False), batch=2, device="cpu")


def test_tiny_shapes_with_strided_temporal_conv():
    cfg = load_config("tiny", ["model.temporal.stride=2", "model.temporal.kernel=5"]).model
    model = DamoModel.from_config(cfg, pretrained=False)
    assert _expected(cfg)["frames_after_conv"] == cfg.frames // 2
    _check_every_step(model, batch=3, device="cpu")


def test_paper_shapes_on_meta_device():
    cfg = load_config("paper").model
    model = DamoModel.from_config(cfg, pretrained=False, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.llm.get_input_embeddings().embedding_dim == 4096
    _check_every_step(model, batch=2, device="meta")
    assert (cfg.fuseformer.width, cfg.fuseformer.depth) == (768, 4)
    assert (cfg.fuseformer.visual_queries, cfg.fuseformer.audio_queries) == (192, 64)
    assert cfg.fuseformer.fusion_tokens == 128 and (cfg.llm.lora.r, cfg.llm.lora.alpha) == (32, 64)
    assert (cfg.frames, cfg.audio_segments) == (24, 8)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_frozen_encoders_produce_the_feature_contract(preset):
    cfg = load_config(preset).model
    device = "meta" if preset == "paper" else "cpu"
    with torch.device(device):
        encoders = FrozenEncoders.from_config(cfg, pretrained=False)
    assert not any(p.requires_grad for p in encoders.parameters())
    assert not encoders.train().training  # always eval
    dim, patches = vision_geometry(cfg.vision)
    size = cfg.vision.arch.get("image_size") or cfg.vision.arch["img_size"]  # HF or timm
    frames = encoders.encode_frames(torch.zeros(3, 3, size, size, device=device))
    assert frames.shape == (3, 1 + patches, dim)
    audio = encoders.encode_audio(torch.zeros(2, 80, cfg.audio.window_frames, device=device))
    assert audio.shape == (2, cfg.audio.tokens_per_segment, cfg.audio.arch["d_model"])
    with pytest.raises(ValueError, match="frames"):
        encoders.encode_audio(torch.zeros(1, 80, 7, device=device))


def test_padded_frames_and_segments_do_not_change_the_output():
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg, pretrained=False).eval()
    video = random_video(cfg, 2, generator=torch.Generator().manual_seed(1))
    video.visual_mask[0, 5:] = False
    video.audio_mask[1, 2:] = False
    video.audio_mask[0, :] = False  # a video without audio at all stays finite
    before = model.pathway(video)
    video.visual[0, 5:] = 100.0
    video.audio[1, 2:] = -100.0
    video.audio[0] = 7.0
    after = model.pathway(video)
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, after)


def test_token_accounting_paper_ratio_and_cli():
    paper = load_config("paper").model
    steps = token_steps(paper)
    assert steps[0].visual == 24 * 257 and steps[-1].total == 32
    assert [s.total for s in steps] == sorted((s.total for s in steps), reverse=True)
    assert compression_ratio(paper) >= 40
    result = CliRunner().invoke(app, ["model", "tokens", "paper"])
    assert result.exit_code == 0, result.output
    assert "6,144" in result.output and "192.0x" in result.output
    assert "soft prompt" in result.output


def test_presets_take_overrides():
    result = CliRunner().invoke(
        app, ["config", "show", "tiny", "--set", "model.fuseformer.depth=2"]
    )
    assert result.exit_code == 0, result.output
    assert "depth: 2" in result.output
    cfg = load_config("tiny", ["model.fuseformer.depth=3"]).model
    assert len(DamoModel.from_config(cfg, pretrained=False).pathway.fuseformer.layers) == 3
    bad = CliRunner().invoke(app, ["config", "show", "tiny", "--set", "model.fuseformer.dpth=2"])
    assert bad.exit_code == 2 and "dpth" in bad.output
