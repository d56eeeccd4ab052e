"""Stage 1 (alignment) and retrieval build DamoModel without its LLM; their checkpoints still
load into the full model that stage 2 trains."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import damo.model.damo as damo_module
from damo.model.checkpoint import ADAPTER_DIR, load_checkpoint, load_weights, save_checkpoint
from damo.model.damo import DamoModel, random_video


def video_batch(cfg, batch: int) -> dict:
    video = random_video(cfg, batch, generator=torch.Generator().manual_seed(0))
    return {key: getattr(video, key) for key in video.KEYS}


def test_stage1_never_loads_the_llm_and_its_checkpoint_feeds_stage2(
    tiny_backbones, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_backbones).model

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded")

    with monkeypatch.context() as patched:
        patched.setattr(damo_module, "load_llm", no_llm)
        torch.manual_seed(0)
        stage1 = DamoModel.from_config(cfg, with_llm=False)
        assert stage1.llm is None
        assert not [name for name, _ in stage1.named_parameters() if name.startswith("llm.")]
        params = stage1.set_stage(1)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        batch = {**video_batch(cfg, 2), **stage1.tokenize_text(["a red circle.", "a low tone."])}
        losses = stage1(batch, 1)
        losses["loss"].backward()
        optimizer.step()
        saved = save_checkpoint(stage1, tmp_path / "stage1", stage=1)
        assert not (saved / ADAPTER_DIR).exists()
        with pytest.raises(RuntimeError, match="without its LLM"):
            stage1.generate(random_video(cfg, 1), ["when?"])
        # retrieval loads the stage-1 checkpoint without the LLM too
        retrieval_model = load_checkpoint(saved, with_llm=False)
        assert retrieval_model.llm is None

    full = load_weights(DamoModel.from_config(cfg), saved)  # the LLM from the backbone
    assert full.llm is not None
    trained = stage1.state_dict()
    for name, tensor in full.state_dict().items():
        if name.startswith(("pathway.", "heads.")):
            assert torch.equal(tensor, trained[name]), name
    full.set_stage(2)
    conversations = [
        [{"role": "user", "content": "what is seen?"}, {"role": "assistant", "content": "red."}]
    ] * 2
    lm = full({**video_batch(cfg, 2), **full.conversation_inputs(conversations)}, 2)
    assert torch.isfinite(lm["loss"])
    lm["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in full.trainable_parameters(2))
