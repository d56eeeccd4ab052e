"""Teaching the pathway where a shape is and what it is: captions that say the place,
negatives that differ only in the place or only in the shape (VTC + VTM), and a learned
embedding per token slot (opt-in, off in presets)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from damo.config import load_config
from damo.data.synthetic import (
    POSITIONS,
    SHAPES,
    annotations,
    place_negative,
    sample_clip,
    shape_negative,
)
from damo.data.training import StageCollator
from damo.model.damo import DamoModel, negative_captions, random_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PLACE = re.compile(r" in the (" + "|".join(POSITIONS) + r")\b")
SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def captions(places: bool, count: int = 300) -> list[str]:
    specs = [sample_clip(0, i, 6.0, 20.0, 4) for i in range(count)]
    return [annotations(spec, caption_places=places)[0]["answer"] for spec in specs]


def test_captions_say_where_each_shape_is_only_when_asked():
    specs = [sample_clip(0, i, 6.0, 20.0, 4) for i in range(50)]
    for spec, caption in zip(specs, captions(True, 50), strict=True):
        places = PLACE.findall(caption)
        assert places == [e.position for e in spec.events if e.visible], caption
    assert not any(PLACE.search(c) for c in captions(False, 50))
    # the other annotations are the same either way
    spec = specs[0]
    assert annotations(spec, True)[1:] == annotations(spec, False)[1:]


def test_a_place_negative_differs_from_its_caption_in_the_places_alone():
    kinds = {"swapped": 0, "moved": 0, "none": 0}
    for caption in captions(True):
        negative = place_negative(caption)
        places = PLACE.findall(caption)
        if not places:
            assert negative is None
            kinds["none"] += 1
            continue
        assert negative is not None and negative != caption
        assert negative == place_negative(caption)  # the same caption, the same negative
        wrong = PLACE.findall(negative)
        assert PLACE.sub("", negative) == PLACE.sub("", caption)  # colours, sounds, times kept
        if len(places) >= 2:
            assert wrong == [places[1], places[0], *places[2:]]
            kinds["swapped"] += 1
        else:
            assert len(wrong) == 1 and wrong[0] != places[0]
            kinds["moved"] += 1
    assert all(kinds.values()), kinds  # the world has all three kinds of caption
    moved_to = {
        PLACE.search(
            place_negative(f"a red square appears in the top left from {i}.0 to 9.0 seconds.")
        ).group(1)
        for i in range(40)
    }
    # a lone place goes to each of the other quadrants, chosen by the caption
    assert moved_to == set(POSITIONS) - {"top left"}


def test_the_collator_tokenizes_each_negative_beside_its_caption():
    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[len(word) + 1 for word in text.split()] for text in texts]
        longest = max(map(len, ids))
        return {
            "text_input_ids": torch.tensor([row + [0] * (longest - len(row)) for row in ids]),
            "text_attention_mask": torch.tensor(
                [[1] * len(row) + [0] * (longest - len(row)) for row in ids]
            ),
        }

    cfg = load_config("tiny").model
    video = random_video(cfg, 2)
    batch = {
        "visual_features": np.asarray(video.visual.numpy()),
        "audio_features": np.asarray(video.audio.numpy()),
        "segment_bounds": np.zeros((2, cfg.audio_segments, 2), dtype=np.float32),
        "frame_times": video.visual_times.numpy(),
        "has_audio": np.array([True, True]),
        "caption": np.array(
            [
                "a red square appears in the top left from 1.0 to 2.0 seconds.",
                "a low tone is heard from 1.0 to 2.0 seconds.",
            ],
            dtype=object,
        ),
    }
    plain = StageCollator("alignment", tokenize_text=tokenize)(batch)
    assert "negative_text_input_ids" not in plain and negative_captions(plain) is None
    out = StageCollator("alignment", tokenize_text=tokenize, negative_caption=place_negative)(batch)
    ids, mask, has_one = negative_captions(out)
    assert has_one.tolist() == [True, False]
    expected = tokenize([place_negative(str(batch["caption"][0])), str(batch["caption"][1])])
    assert torch.equal(ids, expected["text_input_ids"])
    assert torch.equal(mask, expected["text_attention_mask"])


def alignment_batch(cfg, has_one: list[bool]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    batch = random_video(cfg, len(has_one), generator=generator).as_batch()
    batch["text_input_ids"] = torch.randint(5, 100, (len(has_one), 12), generator=generator)
    batch["text_attention_mask"] = torch.ones(len(has_one), 12, dtype=torch.long)
    negatives = batch["text_input_ids"].clone()
    negatives[:, 4] = 100 + torch.arange(len(has_one))  # one word differs, as a place would
    batch["negative_text_input_ids"] = negatives
    batch["negative_text_attention_mask"] = torch.ones(len(has_one), 12, dtype=torch.long)
    batch["has_negative"] = torch.tensor(has_one)
    return batch


def test_vtc_and_vtm_score_each_caption_against_its_own_negative():
    cfg = load_config("tiny", ["model.drop_audio_prob=0"]).model
    torch.manual_seed(0)
    model = DamoModel.from_config(cfg, pretrained=False).eval()

    def losses(batch: dict) -> dict[str, torch.Tensor]:
        torch.manual_seed(7)  # VTM samples its in-batch negatives
        return model(batch, 1)

    with_negatives = alignment_batch(cfg, [True, True, False, True])
    without = {k: v for k, v in with_negatives.items() if "negative" not in k}
    none_valid = {**with_negatives, "has_negative": torch.zeros(4, dtype=torch.bool)}
    base, extra, masked = losses(without), losses(with_negatives), losses(none_valid)
    # a negative joins the video-to-text softmax: the loss can only grow, and by what the
    # negatives' similarities say
    assert extra["vtc"] > base["vtc"]
    assert masked["vtc"] == base["vtc"] and masked["vtm"] == base["vtm"]
    assert extra["vtm"] != base["vtm"]
    # a batch of one has no in-batch negatives, but its own negative still teaches VTM
    one = {k: v[:1] for k, v in with_negatives.items()}
    alone = losses({k: v for k, v in one.items() if "negative" not in k})
    assert alone["vtm"] == 0 and losses(one)["vtm"] > 0
    # the negative's gradient reaches the pathway through VTM and VTC both
    model.train()
    for name in ("vtc", "vtm"):
        model.zero_grad()
        (losses(with_negatives)[name] - losses(none_valid)[name]).backward()
        grads = [p.grad for p in model.pathway.bridge.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_the_slot_embedding_tells_a_frame_from_its_mirror_image():
    """Attention has no order: without a slot embedding, mirroring every frame left to right
    leaves the soft prompt as it was; with one, the prompt changes."""
    for slots, changes in ((False, False), (True, True)):
        cfg = load_config("tiny", [f"model.temporal.slot_embedding={str(slots).lower()}"]).model
        torch.manual_seed(0)
        model = DamoModel.from_config(cfg, pretrained=False).eval()
        video = random_video(cfg, 2, generator=torch.Generator().manual_seed(1))
        mirrored = random_video(cfg, 2, generator=torch.Generator().manual_seed(1))
        batch, frames, tokens, dim = video.visual.shape
        side = int((tokens - 1) ** 0.5)
        grid = video.visual[:, :, 1:].reshape(batch, frames, side, side, dim)
        mirrored.visual[:, :, 1:] = grid.flip(3).reshape(batch, frames, side * side, dim)
        with torch.no_grad():
            moved = (model.pathway(video) - model.pathway(mirrored)).abs().max()
        assert (moved > 1e-3) == changes, (slots, float(moved))
        names = [n for n in model.component_parameters("temporal") if ".slot." in n]
        assert len(names) == (2 if slots else 0)  # visual cells, audio sub-windows


def test_place_negatives_can_be_kept_to_the_anchor():
    """`model.heads.place_negatives`: true gives stage 1 and the anchor negatives, "anchor"
    the anchor alone; anything else is refused with the field's name."""
    from damo.train.loop import caption_negatives_for

    caption = "a red square appears in the top left from 1.0 to 4.0 seconds."
    expected = {"false": (None, None), "true": (True, True), "anchor": (None, True)}
    for field, made_wrong in (("place", place_negative), ("shape", shape_negative)):
        for value, (own, anchored) in expected.items():
            heads = load_config("tiny", [f"model.heads.{field}_negatives={value}"]).model.heads
            for anchor, wanted in ((False, own), (True, anchored)):
                negative = caption_negatives_for(heads, anchor=anchor)
                if wanted is None:
                    assert negative is None, (field, value, anchor)
                else:
                    assert negative(caption) == made_wrong(caption) != caption
        with pytest.raises(ValueError, match=f"{field}_negatives"):
            load_config("tiny", [f"model.heads.{field}_negatives=stage1"])


def test_a_shape_negative_differs_from_its_caption_in_the_shapes_alone():
    kinds = {"swapped": 0, "changed": 0, "none": 0}
    for caption in captions(True):
        negative = shape_negative(caption)
        shapes = SHAPE.findall(caption)
        if not shapes:
            assert negative is None
            kinds["none"] += 1
            continue
        assert negative is not None and negative != caption
        assert negative == shape_negative(caption)  # the same caption, the same negative
        wrong = SHAPE.findall(negative)
        # colours, places, sounds and times kept; as many shapes, one or two of them wrong
        assert SHAPE.sub("", negative) == SHAPE.sub("", caption)
        assert len(wrong) == len(shapes)
        differs = [i for i, (a, b) in enumerate(zip(shapes, wrong, strict=True)) if a != b]
        if len(set(shapes)) >= 2:
            i, j = differs
            assert (wrong[i], wrong[j]) == (shapes[j], shapes[i])  # two shapes traded
            kinds["swapped"] += 1
        else:
            assert differs == [0]
            kinds["changed"] += 1
    assert all(kinds.values()), kinds  # the world has all three kinds of caption
    # a sound's name is never taken for a shape
    assert shape_negative("a low tone is heard from 1.0 to 2.0 seconds.") is None


def test_with_place_and_shape_negatives_each_caption_gets_one_of_them():
    from damo.train.loop import caption_negatives_for

    heads = load_config(
        "tiny", ["model.heads.place_negatives=anchor", "model.heads.shape_negatives=anchor"]
    ).model.heads
    assert caption_negatives_for(heads, anchor=False) is None
    negative = caption_negatives_for(heads, anchor=True)
    got = {"place": 0, "shape": 0}
    for caption in captions(True):
        made = negative(caption)
        if made is None:  # a caption of sounds alone has neither
            assert place_negative(caption) is None and shape_negative(caption) is None
            continue
        assert made == negative(caption)
        kind = "place" if made == place_negative(caption) else "shape"
        assert made == (place_negative if kind == "place" else shape_negative)(caption)
        got[kind] += 1
    assert min(got.values()) > 0.3 * sum(got.values()), got  # about half each
