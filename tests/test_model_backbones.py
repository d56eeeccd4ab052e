"""Tiny backbones: real HF directories, loaded exactly like real checkpoints (also from S3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config
from damo.model.backbones import FrozenEncoders, vision_geometry
from damo.model.checkpoint import load_checkpoint, save_checkpoint
from damo.model.damo import DamoModel, random_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_make_tiny_cli_writes_loadable_hf_directories(tmp_path):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(
        app, ["backbones", "make-tiny", "--out", str(out), "--steps", "2", "--clips", "10"]
    )
    assert result.exit_code == 0, result.output
    assert "tiny backbones written" in result.output
    for name in ("vision", "audio", "text_encoder", "llm"):
        assert (out / name / "config.json").is_file()
        assert (out / name / "model.safetensors").is_file()
    cfg = load_config("tiny").model
    assert AutoConfig.from_pretrained(out / "vision").hidden_size == cfg.vision.arch["hidden_size"]
    assert AutoConfig.from_pretrained(out / "llm").vocab_size == cfg.llm.arch["vocab_size"]
    help_text = CliRunner().invoke(app, ["backbones", "make-tiny", "--help"]).output
    assert "--steps" in help_text and "--out" in help_text


def test_tiny_llm_knows_the_world_and_its_chat_format(tiny_backbones):
    timings = json.loads((tiny_backbones / "timings.json").read_text())
    assert timings["pretrain_last_loss"] < 0.2 * timings["pretrain_first_loss"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones / "llm")
    assert "<video>" in tokenizer.get_vocab() and "<video>" in tokenizer.all_special_tokens
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<video>\nwhat colour is the square?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|user|><video>\nwhat colour is the square?<|end|><|assistant|>"
    ids = tokenizer("a red square appears from 12.5 to 20.0 seconds.")["input_ids"]
    assert tokenizer.decode(ids) == "a red square appears from 12.5 to 20.0 seconds."
    assert len(ids) < 20  # BPE learned the world's words, not bytes
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones / "llm").eval()
    prompt = tokenizer("a red square appears from 12.5 to", return_tensors="pt")
    with torch.no_grad():
        loss = llm(**prompt, labels=prompt["input_ids"]).loss
    assert loss < 3.0  # far below uniform over the vocabulary (ln 512 = 6.2)


def test_frozen_encoders_load_and_preprocess_real_media(tiny_backbones):
    cfg = load_config("tiny").model.with_backbones_at(str(tiny_backbones))
    encoders = FrozenEncoders.from_config(cfg)
    frames = [np.full((48, 64, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    pixels = encoders.preprocess_frames(frames)
    size = cfg.vision.arch["image_size"]
    assert pixels.shape == (3, 3, size, size)
    dim, patches = vision_geometry(cfg.vision)
    assert encoders.encode_frames(pixels).shape == (3, 1 + patches, dim)
    seconds = cfg.audio.segment_seconds
    waves = [np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(16000 * seconds)))] * 2
    mel = encoders.preprocess_audio([w.astype(np.float32) for w in waves])
    assert mel.shape == (2, 80, cfg.audio.window_frames)
    audio = encoders.encode_audio(mel)
    assert audio.shape == (2, cfg.audio.tokens_per_segment, cfg.audio.arch["d_model"])
    assert not any(p.requires_grad for p in encoders.parameters())
    wrong = load_config("tiny", ["model.vision.arch.hidden_size=48"]).model
    with pytest.raises(ValueError, match="vision .* width 32"):
        FrozenEncoders.from_config(wrong.with_backbones_at(str(tiny_backbones)))


def test_backbones_and_checkpoints_load_from_object_storage(tiny_backbones, s3_storage, tmp_path):
    root = "s3://damo-test/model-tests/backbones"
    s3_storage.put_dir(tiny_backbones, root)
    cache = tmp_path / "cache"

    def resolve(uri: str):
        return s3_storage.fetch_dir(uri, cache_root=cache)

    cfg = load_config("tiny").model.with_backbones_at(root)
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg, resolve=resolve).eval()
    local = save_checkpoint(model, tmp_path / "ckpt", stage=2)
    s3_storage.put_dir(local, "s3://damo-test/model-tests/ckpt")
    loaded = load_checkpoint("s3://damo-test/model-tests/ckpt", resolve=resolve).eval()
    video = random_video(cfg, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.soft_prompt(video), loaded.soft_prompt(video))
    assert loaded.cfg.llm.path == f"{root}/llm"  # backbones stay referenced by URI
    assert FrozenEncoders.from_config(cfg, resolve=resolve).encode_frames(
        torch.zeros(1, 3, 32, 32)
    ).shape == (1, 17, 32)
