"""What each stage trains, and whether the tiny model can learn at all."""

from __future__ import annotations

import pytest
import torch

from damo.config import load_config
from damo.data.synthetic import text_corpus
from damo.model.damo import DamoModel, random_video
from damo.model.video import VideoFeatures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STAGES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_backbones):
    return load_config("tiny").model.with_backbones_at(str(tiny_backbones))


def qa_pairs(count: int) -> list[tuple[str, str]]:
    """Distinct (question, answer) pairs from the synthetic world's text."""
    pairs: dict[str, tuple[str, str]] = {}
    for text in text_corpus(20, seed=3):
        question, mark, answer = text.partition("? ")
        if mark and answer and answer not in pairs and len(answer) < 40:
            pairs[answer] = (question + "?", answer)
    assert len(pairs) >= count, "the synthetic world should yield enough distinct answers"
    return list(pairs.values())[:count]


def video_like(model: DamoModel, count: int, seed: int) -> VideoFeatures:
    """Random features with a video's structure: one content vector per video, shared by all
    its frames and patches (and one per audio track), plus token-level noise. I.i.d. noise in
    every token would average away in the pooling, leaving nothing to tell videos apart."""
    generator = torch.Generator().manual_seed(seed)
    video = random_video(model.cfg, count, generator=generator)
    for name in ("visual", "audio"):
        tokens = getattr(video, name)  # (B, T, N, D)
        content = torch.randn(count, 1, 1, tokens.shape[-1], generator=generator)
        setattr(video, name, content + 0.5 * tokens)
    return video


def make_batch(model: DamoModel, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    pairs = qa_pairs(count)
    batch = video_like(model, count, seed).as_batch()
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs
    ]
    batch.update(model.conversation_inputs(conversations))  # with the question the bridge reads
    batch.update(model.tokenize_text([f"{q} {a}" for q, a in pairs]))
    return batch


@pytest.mark.parametrize("stage", STAGES)
def test_gradients_reach_exactly_the_trainable_set(tiny_cfg, stage):
    torch.manual_seed(stage)
    model = DamoModel.from_config(tiny_cfg)
    batch = make_batch(model, 4)
    optimizer_params = model.set_stage(stage)
    expected = set(model.trainable_named_parameters(stage))
    assert {id(p) for p in optimizer_params} == {id(p) for p in model.trainable_parameters(stage)}
    model.train()
    losses = model(batch, stage)
    assert set(losses) == ({"vtc", "vtm", "vtg", "loss"} if stage == 1 else {"lm", "loss"})
    losses["loss"].backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    # and the gradients carry signal (LoRA's A is the exception: B starts at zero)
    nonzero = {n for n in with_grad if model.get_parameter(n).grad.abs().sum() > 0}
    assert nonzero >= {n for n in expected if "lora_A" not in n} - {
        n for n in expected if "lora_B" in n and stage == 1
    }
    components = set(tiny_cfg.stages.get(stage).trainable)
    prefixes = {
        "residual": "pathway.visual_residual",
        "temporal": "pathway.visual_temporal",
        "fuseformer": "pathway.fuseformer",
        "bridge": "pathway.bridge",
        "heads": "heads.",
        "lora": "lora_",
    }
    for component, marker in prefixes.items():
        present = any(marker in name for name in expected)
        should = component in components and not (component == "heads" and stage > 1)
        assert present == should, f"stage {stage}: {component}"
    assert not any(name.startswith(("text_encoder.",)) for name in with_grad)


def test_stage_trainable_sets_come_from_config(tiny_backbones):
    cfg = load_config(
        "tiny", ["model.stages.stage2.trainable=[fuseformer]"]
    ).model.with_backbones_at(str(tiny_backbones))
    model = DamoModel.from_config(cfg, pretrained=False)
    names = set(model.trainable_named_parameters(2))
    assert names and all(name.startswith("pathway.fuseformer.") for name in names)
    with pytest.raises(ValueError, match="stage"):
        model.trainable_parameters(5)


def overfit(model: DamoModel, batch, stage: int, steps: int, lr: float) -> list[float]:
    params = model.set_stage(stage)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(batch, stage)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# (stage, steps): a fixed budget per stage. Stage 3 trains bridge + Fuseformer + LoRA on the
# frozen LLM (answer loss); stage 1 trains the pathway and heads (VTC + VTM + VTG).
@pytest.mark.parametrize(("stage", "steps"), [(3, 200), (1, 60)])
def test_tiny_model_overfits_eight_samples(tiny_cfg, stage, steps):
    torch.manual_seed(0)
    model = DamoModel.from_config(tiny_cfg)
    batch = make_batch(model, 8)
    losses = overfit(model, batch, stage=stage, steps=steps, lr=3e-3)
    final = sum(losses[-5:]) / 5  # the last few steps, not one that may spike
    assert final <= 0.1 * losses[0], f"loss {losses[0]:.3f} -> {final:.3f}"
    if stage == 1:  # retrieval works on the training set: each video finds its own caption
        model.eval()
        video = VideoFeatures.from_batch(batch)
        with torch.no_grad():
            video_emb = model.embed_video(video)
            text_emb = model.heads.vtc.embed_text(
                model.text_states(batch["text_input_ids"], batch["text_attention_mask"]),
                batch["text_attention_mask"],
            )
        assert torch.equal((video_emb @ text_emb.T).argmax(1), torch.arange(8))
