"""The model's known defects stay fixed: 2-D spatial pooling, masked missing audio, audio drop."""

from __future__ import annotations

import pytest
import torch

from damo.config import load_config
from damo.config.model import ResidualConfig
from damo.model.damo import DamoModel, drop_audio, random_video
from damo.model.video import GlobalResidual

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spatial_pooling_keeps_left_and_right_apart():
    """Each pooled token reads only its own block of the patch grid: a patch in the top-right
    quadrant moves the top-right token alone (a 1-D pool over the row-major sequence would
    average the top row's left and right halves into one token)."""
    torch.manual_seed(0)
    residual = GlobalResidual(8, 8, (2, 2), 2, grid=(4, 4)).eval()
    local = torch.randn(1, 1, 16, 8)  # (B, T, P, Din), P = 4 x 4 row-major
    global_ = torch.randn(1, 1, 8)
    base = residual(local, global_)  # (1, 1, 4, 8)
    for row, col in [(0, 3), (0, 0), (3, 1), (2, 2)]:
        moved = local.clone()
        moved[0, 0, row * 4 + col] += 5.0 * torch.randn(8)  # not constant: LayerNorm
        changed = (residual(moved, global_) - base).abs().sum(-1)[0, 0] > 1e-6  # (4,)
        quadrant = (row // 2) * 2 + col // 2
        assert changed.tolist() == [i == quadrant for i in range(4)], (row, col)


def test_pool_grid_comes_from_config():
    assert ResidualConfig(visual_grid=(2, 3)).visual_pool_grid(4, 4) == (2, 3)
    # derived: the paper's 16x16 patches at compression 8 -> 32 tokens, the squarest grid
    assert ResidualConfig(visual_compression=8).visual_pool_grid(16, 16) == (4, 8)
    assert ResidualConfig(visual_compression=4).visual_pool_grid(4, 4) == (2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        ResidualConfig(visual_grid=(5, 1)).visual_pool_grid(4, 4)
    tiny = load_config("tiny").model
    model = DamoModel.from_config(tiny, pretrained=False)
    video = random_video(tiny, 2)
    pooled = model.pathway.visual_residual(video.visual[:, :, 1:], video.visual[:, :, 0])
    assert pooled.shape[2] == 4  # (B, T, 2 x 2, D)


def test_a_video_without_audio_is_seen_through_its_frames_alone():
    """With its audio masked, no audio value reaches the soft prompt, at any layer; the other
    videos of the batch keep hearing theirs."""
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg, pretrained=False).eval()
    video = random_video(cfg, 3, generator=torch.Generator().manual_seed(1))
    video.audio_mask[0] = False
    before = model.pathway(video)
    video.audio[0] = torch.randn_like(video.audio[0]) * 3  # other sounds, still masked
    after = model.pathway(video)
    torch.testing.assert_close(before[0], after[0])
    video.audio[1] = torch.randn_like(video.audio[1]) * 3  # a heard video hears the change
    assert not torch.allclose(model.pathway(video)[1], before[1])


def test_drop_audio_masks_whole_tracks_in_training_only():
    cfg = load_config("tiny", ["model.drop_audio_prob=0.25"]).model
    video = random_video(cfg, 4000, generator=torch.Generator().manual_seed(0))
    dropped = drop_audio(video, 0.25)
    silent = ~dropped.audio_mask.any(dim=1)
    assert 0.22 < silent.float().mean() < 0.28
    assert (dropped.audio_mask.all(dim=1) | silent).all()  # a track goes whole or not at all
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg, pretrained=False).eval()
    batch = random_video(cfg, 4).as_batch()
    batch["text_input_ids"] = torch.randint(5, 100, (4, 12))
    batch["text_attention_mask"] = torch.ones(4, 12, dtype=torch.long)
    torch.manual_seed(1)
    first = model(batch, 1)["vtc"]
    torch.manual_seed(2)  # evaluation never drops: another random state, the same loss
    assert model(batch, 1)["vtc"] == first


def test_the_tiny_limits_hold_every_caption_of_a_big_world(tiny_backbones):
    """The limits are sized from the data: no caption of a 600-clip world is cut (with 32
    tokens, 43% were)."""
    from transformers import AutoTokenizer

    from damo.data.synthetic import _caption, sample_clip

    cfg = load_config("tiny")
    world = cfg.data.synthetic
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones / "text_encoder")
    captions = [
        _caption(sample_clip(0, i, world.min_duration_s, world.max_duration_s, world.max_events))
        for i in range(600)
    ]
    longest = max(len(ids) for ids in tokenizer(captions)["input_ids"])
    limit = min(cfg.model.text_encoder.max_length, cfg.model.heads.vtg_max_length + 1)
    assert 32 < longest <= limit


def test_cut_captions_warn_and_cached_text_states_match(tiny_backbones):
    from damo.model.damo import CaptionTruncated

    cfg = load_config("tiny", ["model.text_encoder.cache_size=3"]).model
    model = DamoModel.from_config(cfg.with_backbones_at(str(tiny_backbones))).eval()
    short, long = "a red square appears.", " ".join(["a red square appears."] * 30)
    with pytest.warns(CaptionTruncated, match="max_length"):
        model.tokenize_text([short, long])
    texts = ["a red square appears.", "a low tone is heard from 1.0 to 3.5 seconds.", short]
    inputs = model.tokenize_text(texts)
    ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    fresh = model.encode_text_tokens(ids, mask)
    first = model.text_states(ids, mask)  # fills the cache
    again = model.text_states(ids[[1, 0]], mask[[1, 0]])  # read back, in another batch shape
    real = mask.bool()[..., None]
    torch.testing.assert_close(first * real, fresh * real, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[0, : mask[1].sum()], fresh[1, : mask[1].sum()])
    assert len(model.text_cache) == 2  # the same caption twice is one entry
    # a caption's cached states do not depend on the batch that first encoded it (a resumed
    # stage starts with an empty cache and meets its captions in other batches)
    tone = " and a low tone is heard from 1.0 to 3.5 seconds."
    texts = [
        f"a red circle appears from {i}.0 to {i + 2}.5 seconds{tone * (i % 3)}" for i in range(16)
    ]
    inputs = model.tokenize_text(texts)
    ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    model.text_cache.clear()
    with_others = model.text_states(ids, mask)
    for i in range(len(texts)):
        model.text_cache.clear()
        alone, length = model.text_states(ids[[i]], mask[[i]]), int(mask[i].sum())
        assert torch.equal(alone[0, :length], with_others[i, :length]), texts[i]


def test_two_loads_answer_bit_identically_when_the_llm_lacks_placeholder_rows(
    tiny_backbones, tmp_path
):
    """The paper preset's tokenizer lacks `<video>`, so loading grows the LLM's vocabulary.
    The new rows must not be random: two loads of one checkpoint give the same logits and
    the same greedy answers, and `<video>` is never generated."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from damo.model.checkpoint import load_weights, save_checkpoint

    cfg = load_config("tiny").model.with_backbones_at(str(tiny_backbones))

    def load(seed: int) -> DamoModel:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(tiny_backbones / "llm")
        llm = AutoModelForCausalLM.from_pretrained(tiny_backbones / "llm")
        spare = llm.get_input_embeddings().num_embeddings - len(tokenizer)
        tokenizer.add_tokens([f"<extra{i}>" for i in range(spare + 3)])  # past the table
        model = DamoModel(
            cfg,
            llm,
            AutoModel.from_pretrained(tiny_backbones / "text_encoder"),
            tokenizer,
            AutoTokenizer.from_pretrained(tiny_backbones / "text_encoder"),
        )
        assert model.llm.get_input_embeddings().num_embeddings == len(tokenizer)
        return model.eval()

    first = load(0)
    save_checkpoint(first, tmp_path / "ckpt")
    second = load_weights(load(1), tmp_path / "ckpt").eval()
    video = random_video(cfg, 2, generator=torch.Generator().manual_seed(3))
    prompts = ["when does the red square appear?", "what colour is the circle?"]
    inputs = first.prompt_builder.prompts(prompts)
    logits = [
        m.llm(inputs_embeds=m.llm_inputs(video, inputs["input_ids"])).logits
        for m in (first, second)
    ]
    assert torch.equal(logits[0], logits[1])
    answers = first.generate(video, prompts, max_new_tokens=12)
    assert answers == second.generate(video, prompts, max_new_tokens=12)
    assert not any(cfg.llm.video_token in a for a in answers)


def test_the_paper_preset_hears_8_windows_of_up_to_30_s_spread_over_the_video():
    import numpy as np

    from damo.media.decode import cut_segments, segment_bounds, segment_samples

    cfg = load_config("paper")
    audio, rate = cfg.model.audio, cfg.data.decode.sample_rate
    assert cfg.data.decode.num_segments == cfg.model.audio_segments == 8
    assert audio.tokens_per_segment == 1500  # Whisper's whole 30 s window is kept
    for duration, heard in [(60.0, 7.5), (240.0, 30.0), (600.0, 30.0)]:
        bounds = segment_bounds(duration, 8)
        assert segment_samples(bounds, rate, audio.segment_seconds) == int(heard * rate)
        track = np.arange(int(duration * rate), dtype=np.float32)
        windows = cut_segments(track, bounds, rate, audio.segment_seconds)
        centres = windows.mean(axis=1) / rate  # a ramp's mean is its window's centre
        np.testing.assert_allclose(centres, bounds.mean(axis=1), atol=0.01)
    assert "max_segment_seconds" not in cfg.data.decode.model_dump()  # no dead knob


def test_parameter_groups_scale_each_component_and_cover_the_stage():
    cfg = load_config("tiny", ["model.stages.stage3.trainable=[fuseformer,bridge,lora]"])
    scale = cfg.model_copy(deep=True)
    scale.train.stages.stage3.optimizer.lr_scale = {"fuseformer": 0.1}
    model = DamoModel.from_config(cfg.model, pretrained=False)
    trainable = model.set_stage(3)
    groups = model.parameter_groups(3, 1e-3, scale.train.stages.stage3.optimizer.lr_scale)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        fuse = {names[id(p)].startswith("pathway.fuseformer.") for p in group["params"]}
        assert len(fuse) == 1  # one component per group
        assert group["lr"] == pytest.approx(1e-4 if fuse.pop() else 1e-3)
    with pytest.raises(ValueError):
        load_config("tiny", ["train.stages.stage3.optimizer.lr_scale={fusefomer: 0.1}"])
