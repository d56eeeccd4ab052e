"""`model.bridge.read_question`: the bridge's queries read the question, so the soft prompt is
per (video, question); training, generation, serving's per-video state and checkpoints agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from damo.config import load_config
from damo.data.training import StageCollator
from damo.model.checkpoint import load_checkpoint, save_checkpoint
from damo.model.damo import DamoModel, random_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    "when is the red square seen?",
    "when is the low tone heard while a blue circle moves?",
    "is there a green triangle?",
]


def build(backbones, read_question: bool) -> DamoModel:
    cfg = load_config("tiny", [f"model.bridge.read_question={str(read_question).lower()}"])
    torch.manual_seed(0)
    return DamoModel.from_config(cfg.model.with_backbones_at(str(backbones))).eval()


@pytest.fixture(scope="module")
def model(tiny_backbones) -> DamoModel:
    return build(tiny_backbones, read_question=True)


def extracted_columns(video) -> dict[str, np.ndarray]:
    """The feature columns the extraction writes, one row per sample of `video`."""
    bounds = torch.stack([video.audio_times - 0.5, video.audio_times + 0.5], -1)  # (B, M, 2)
    return {
        "visual_features": video.visual.numpy(),
        "frame_times": video.visual_times.numpy(),
        "audio_features": video.audio.numpy(),
        "segment_bounds": bounds.numpy(),
        "has_audio": np.ones(video.visual.shape[0], dtype=bool),
    }


def lm_batch(model: DamoModel, questions: list[str]) -> dict:
    video = random_video(model.cfg, len(questions), generator=torch.Generator().manual_seed(0))
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": "from 1.0 to 2.0."}]
        for q in questions
    ]
    rows = extracted_columns(video)
    rows["conversation"] = np.array([json.dumps(c) for c in conversations], dtype=object)
    collate = StageCollator("lm", model.conversation_inputs)
    return collate(rows)


def test_the_soft_prompt_depends_on_the_question_and_only_lm_stages_train_its_projection(model):
    video = random_video(model.cfg, 1, generator=torch.Generator().manual_seed(1))
    video = video.__class__(
        **{k: getattr(video, k).expand(2, *getattr(video, k).shape[1:]) for k in video.KEYS}
    )  # one video, asked two things
    with torch.no_grad():
        question = model.encode_questions(QUESTIONS[:2])
        asked = model.soft_prompt(video, question)  # (2, K, H)
        again = model.soft_prompt(video, model.encode_questions(QUESTIONS[:2]))
        unasked = model.soft_prompt(video)
    width = model.llm.get_input_embeddings().embedding_dim
    assert asked.shape == (2, model.cfg.bridge.queries, width)
    assert (asked[0] - asked[1]).abs().max() > 1e-3  # two questions, two soft prompts
    torch.testing.assert_close(asked, again, rtol=0, atol=0)
    torch.testing.assert_close(unasked[0], unasked[1], rtol=0, atol=0)
    # stage 1 has no question: the projection is not on its loss path, the LM stages' it is
    assert not any("bridge.question" in n for n in model.trainable_named_parameters(1))
    assert any("bridge.question" in n for n in model.trainable_named_parameters(2))
    assert any("bridge.question" in n for n in model.trainable_named_parameters(3))


def test_an_lm_step_trains_the_question_projection_and_needs_the_question(model):
    batch = lm_batch(model, QUESTIONS)
    assert batch["question_input_ids"].shape[0] == 3
    assert batch["question_attention_mask"].sum(1).tolist() == [
        len(model.text_tokenizer(q)["input_ids"]) for q in QUESTIONS
    ]
    model.train()
    try:
        params = model.set_stage(3)
        model.zero_grad()
        model(batch, stage=3)["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "bridge.question" in n}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        assert all(p.grad is not None for p in params)
        without = {k: v for k, v in batch.items() if not k.startswith("question_")}
        with pytest.raises(ValueError, match="question_input_ids"):
            model(without, stage=3)
    finally:
        model.zero_grad()
        model.eval()


def test_generation_batched_one_by_one_and_from_cached_fusion_tokens_agree(model):
    video = random_video(model.cfg, 3, generator=torch.Generator().manual_seed(2))
    batched = model.generate(video, QUESTIONS, max_new_tokens=10)
    singles = [
        model.generate(
            video.__class__(**{k: getattr(video, k)[i : i + 1] for k in video.KEYS}),
            [QUESTIONS[i]],
            max_new_tokens=10,
        )[0]
        for i in range(3)
    ]
    assert batched == singles  # question padding changes nothing
    with torch.no_grad():
        fusion = model.per_video_state(video)  # what serving keeps per video
    assert fusion.shape == (3, model.cfg.fuseformer.fusion_tokens, model.cfg.fuseformer.width)
    assert model.generate(None, QUESTIONS, max_new_tokens=10, video_state=fusion) == batched
    with torch.no_grad(), pytest.raises(ValueError, match="fusion tokens"):
        # a soft prompt already made for other questions cannot be reused for these
        soft = model.soft_prompt(video, model.encode_questions(QUESTIONS))
        model.generate(None, QUESTIONS, max_new_tokens=10, video_state=soft)
    # a `<video>` placeholder in the prompt is not part of the question
    placed = [f"{model.cfg.llm.video_token} {q}" for q in QUESTIONS]
    with torch.no_grad():
        torch.testing.assert_close(
            model.soft_prompt(video, model.encode_questions(placed)),
            model.soft_prompt(video, model.encode_questions(QUESTIONS)),
            rtol=0,
            atol=0,
        )


def test_a_prompt_count_that_does_not_match_the_videos_fails_before_the_pathway_runs(
    model, monkeypatch
):
    video = random_video(model.cfg, 2, generator=torch.Generator().manual_seed(5))

    def pathway_must_not_run(*args, **kwargs):
        raise AssertionError("the pathway ran before the prompt count was checked")

    monkeypatch.setattr(model, "per_video_state", pathway_must_not_run)
    with pytest.raises(ValueError, match="3 prompts for 2 videos"):
        model.generate(video, QUESTIONS, max_new_tokens=4)
    with pytest.raises(ValueError, match="features or its per_video_state"):
        model.generate(None, QUESTIONS, max_new_tokens=4)


def test_a_cut_question_warns_as_a_question(model):
    from damo.model.damo import CaptionTruncated

    with pytest.warns(CaptionTruncated, match="^questions longer"):
        model.tokenize_questions([" ".join(["when is the red square seen?"] * 30)])


def test_fusion_tokens_are_refused_by_a_bridge_that_does_not_read_the_question(tiny_backbones):
    plain = build(tiny_backbones, read_question=False)
    video = random_video(plain.cfg, 1, generator=torch.Generator().manual_seed(3))
    assert plain.per_video_state(video).shape[1] == plain.cfg.bridge.queries  # the soft prompt
    assert not any("bridge.question" in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="the soft prompt"):
        plain.generate(None, QUESTIONS[:1], video_state=plain.pathway.fusion_tokens(video))


def test_a_checkpoint_keeps_the_choice_and_serving_answers_per_question(model, tmp_path):
    from damo.serve.answer import Answerer, Question
    from damo.serve.featurizer import VideoFeaturesRow

    video = random_video(model.cfg, 1, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for param in model.pathway.bridge.question.parameters():  # not the initial weights
            param.add_(torch.randn_like(param) * 0.1)
    saved = save_checkpoint(model, tmp_path / "ckpt", stage=3)
    loaded = load_checkpoint(saved).eval()
    assert loaded.reads_question
    twice = video.__class__(
        **{k: getattr(video, k).expand(2, *getattr(video, k).shape[1:]) for k in video.KEYS}
    )
    expected = model.generate(twice, QUESTIONS[:2], max_new_tokens=10)
    assert loaded.generate(twice, QUESTIONS[:2], max_new_tokens=10) == expected

    # serving: two questions about one video, one pathway run, each its own soft prompt
    answerer = Answerer(load_config("tiny"), str(saved))
    columns = {name: column[0] for name, column in extracted_columns(video).items()}
    features = VideoFeaturesRow("clip", columns, duration=20.0)
    answers = answerer.answer_batch([Question(features, q, 10) for q in QUESTIONS[:2]])
    assert [a.text for a in answers] == expected
    assert answerer.soft_prompt_cache.computed == 1
