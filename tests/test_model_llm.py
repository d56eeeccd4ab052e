"""The LLM side: the `<video>` splice, prompt labels, padding sides and batched generation."""

from __future__ import annotations

import pytest
import torch

from damo.config import load_config
from damo.model.damo import DamoModel, random_video
from damo.model.llm import IGNORE_INDEX, splice_video
from damo.model.video import VideoFeatures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_backbones) -> DamoModel:
    cfg = load_config("tiny").model.with_backbones_at(str(tiny_backbones))
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg).eval()
    for name, param in model.llm.named_parameters():  # a non-trivial adapter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


CONVERSATIONS = [
    [
        {"role": "user", "content": "what colour is the square?"},
        {"role": "assistant", "content": "red."},
    ],
    [
        {"role": "user", "content": "when is the low tone heard?"},
        {"role": "assistant", "content": "from 12.5 to 20.0 seconds."},
        {"role": "user", "content": "and the square?"},
        {"role": "assistant", "content": "from 3.0 to 4.5 seconds."},
    ],
]


def test_splice_puts_the_soft_prompt_exactly_at_the_video_tokens():
    video_id, pad_id, k, width = 9, 0, 3, 4
    # left-padded row 0, right-padded row 1, video tokens at different offsets
    input_ids = torch.tensor(
        [
            [pad_id, pad_id, 5, video_id, video_id, video_id, 6, 7],
            [5, 6, 7, 8, video_id, video_id, video_id, pad_id],
        ]
    )
    embeds = torch.randn(2, 8, width)
    soft = torch.randn(2, k, width)
    out = splice_video(embeds, input_ids, video_id, soft)
    is_video = input_ids == video_id
    torch.testing.assert_close(out[~is_video], embeds[~is_video], rtol=0, atol=0)  # text intact
    torch.testing.assert_close(out[0, 3:6], soft[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 4:7], soft[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly 3"):
        splice_video(embeds, input_ids[:, :5], video_id, soft)  # row 0 holds only 2


def test_prompt_builder_expands_video_and_labels_only_answers(model):
    builder = model.prompt_builder
    k = model.cfg.bridge.queries
    for side in ("left", "right"):
        batch = builder(CONVERSATIONS, padding_side=side)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ((ids == model.video_token_id).sum(1) == k).all()
        for row, conversation in enumerate(CONVERSATIONS):
            answer_text = model.tokenizer.decode(ids[row][labels[row] != IGNORE_INDEX])
            answers = [t["content"] for t in conversation if t["role"] == "assistant"]
            assert answer_text == "<|end|>".join(answers) + "<|end|>"
            assert (labels[row][mask[row] == 0] == IGNORE_INDEX).all()
        first_real = mask.argmax(1)
        if side == "left":
            assert first_real[0] > 0 and (mask[:, -1] == 1).all()
        else:
            assert (first_real == 0).all()


def test_video_placement_after_puts_the_soft_prompt_behind_the_question(model):
    from damo.model.llm import PromptBuilder

    k = model.cfg.bridge.queries
    before = model.prompt_builder(CONVERSATIONS[:1])
    after = PromptBuilder(model.tokenizer, model.cfg.llm.video_token, k, "after")(CONVERSATIONS[:1])
    question = model.tokenizer("what colour is the square?", add_special_tokens=False)["input_ids"]
    for batch, video_first in ((before, True), (after, False)):
        ids = batch["input_ids"][0].tolist()
        video_at = ids.index(model.video_token_id)
        question_at = next(i for i in range(len(ids)) if ids[i : i + len(question)] == question)
        assert (video_at < question_at) == video_first
        assert ids[video_at : video_at + k] == [model.video_token_id] * k
    # the same answer tokens are learned wherever the video goes
    for batch in (before, after):
        labels = batch["labels"][0]
        assert (
            model.tokenizer.decode(batch["input_ids"][0][labels != IGNORE_INDEX]) == "red.<|end|>"
        )
    with pytest.raises(ValueError, match="placement"):
        PromptBuilder(model.tokenizer, model.cfg.llm.video_token, k, "middle")


def test_left_and_right_padding_give_the_same_loss_and_logits(model):
    video = random_video(model.cfg, 2, generator=torch.Generator().manual_seed(0))
    results = {}
    for side in ("left", "right"):
        batch = video.as_batch()
        batch.update(model.conversation_inputs(CONVERSATIONS, padding_side=side))
        with torch.no_grad():
            loss = model(batch, stage=3)["loss"]
            embeds = model.llm_inputs(video, batch["input_ids"])
        is_video = batch["input_ids"] == model.video_token_id
        results[side] = (loss, embeds[is_video], embeds[batch["attention_mask"].bool()])
    torch.testing.assert_close(results["left"][0], results["right"][0], atol=1e-5, rtol=1e-5)
    # the soft prompt and the text embeddings are the same, only their positions differ
    torch.testing.assert_close(results["left"][1], results["right"][1], rtol=0, atol=0)
    torch.testing.assert_close(
        results["left"][2].sort(0).values, results["right"][2].sort(0).values, rtol=0, atol=0
    )
    soft = model.soft_prompt(video).reshape(-1, results["left"][1].shape[-1])
    torch.testing.assert_close(results["left"][1], soft, atol=1e-6, rtol=1e-6)


def test_batched_greedy_generation_matches_one_by_one(model):
    video = random_video(model.cfg, 3, generator=torch.Generator().manual_seed(1))
    prompts = ["what colour is the square?", "when is the low tone heard?", "where is it?"]
    batched = model.generate(video, prompts, max_new_tokens=12)
    assert len(batched) == 3 and all(isinstance(text, str) for text in batched)
    assert all(text for text in batched)
    singles = [
        model.generate(
            VideoFeatures(**{key: getattr(video, key)[i : i + 1] for key in video.KEYS}),
            [prompts[i]],
            max_new_tokens=12,
        )[0]
        for i in range(3)
    ]
    assert batched == singles
    with pytest.raises(ValueError, match="prompts"):
        model.generate(video, prompts[:2])
    # the pathway's output, computed once and given back (serving caches it per video)
    with torch.no_grad():
        state = model.per_video_state(video)
    assert model.generate(None, prompts, max_new_tokens=12, video_state=state) == batched


def test_embed_video_and_text_share_a_unit_space(model):
    video = random_video(model.cfg, 2, generator=torch.Generator().manual_seed(2))
    video_emb = model.embed_video(video)
    text_emb = model.embed_text(["a red square appears.", "a low tone is heard."])
    assert video_emb.shape == text_emb.shape == (2, model.cfg.heads.embed_dim)
    torch.testing.assert_close(video_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(2))
