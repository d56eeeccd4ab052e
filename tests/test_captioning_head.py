"""VTG, the captioning head: padding predicts nothing, and `vtg_vocabulary: batch` is the full
softmax with every word the batch's captions do not use taken out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from damo.config import load_config
from damo.config.model import HeadsConfig
from damo.model.heads import CaptioningHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB, DIM, QUERIES = 50, 16, 4


def heads() -> dict[str, CaptioningHead]:
    torch.manual_seed(0)
    full = CaptioningHead(DIM, 2, VOCAB, HeadsConfig(vtg_vocabulary="full"))
    batch = CaptioningHead(DIM, 2, VOCAB, HeadsConfig(vtg_vocabulary="batch"))
    batch.load_state_dict(full.state_dict())
    return {"full": full, "batch": batch}


def captions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    query_states = torch.randn(3, QUERIES, DIM, generator=generator)  # (B, K, D)
    # words 10-19 only, so most of the vocabulary is never a target
    input_ids = torch.randint(10, 20, (3, 9), generator=generator)  # (B, S)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, 5:] = 0  # captions of 9, 5 and 7 tokens
    attention_mask[2, 7:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # [PAD]
    return query_states, input_ids, attention_mask


def logits_at_every_position(head: CaptioningHead, query_states, input_ids, attention_mask):
    """The logits over the whole vocabulary at every text position, padding included, through
    the head's own layers (what the loss scored before padding was left out)."""
    captured = {}
    hook = head.norm.register_forward_hook(lambda _m, _i, out: captured.update(states=out))
    head.loss(query_states, input_ids, attention_mask)
    hook.remove()
    return captured["states"] @ head.embed.weight.T  # (B, S-1, V)


def test_padding_predicts_nothing_and_the_full_softmax_is_unchanged():
    head = heads()["full"]
    query_states, input_ids, attention_mask = captions()
    loss = head.loss(query_states, input_ids, attention_mask)
    logits = logits_at_every_position(head, query_states, input_ids, attention_mask)
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, reference)
    # padding's ids do not move the loss
    repadded = input_ids.masked_fill(attention_mask == 0, 7)
    torch.testing.assert_close(head.loss(query_states, repadded, attention_mask), loss)


def test_the_batch_vocabulary_ranks_each_token_against_the_batchs_own_words():
    pair = heads()
    query_states, input_ids, attention_mask = captions()
    loss = pair["batch"].loss(query_states, input_ids, attention_mask)
    logits = logits_at_every_position(pair["full"], query_states, input_ids, attention_mask)
    scored = attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[targets.unique()] = False
    reference = F.cross_entropy(logits[scored].masked_fill(unused, float("-inf")), targets)
    torch.testing.assert_close(loss, reference)
    assert float(loss) < float(pair["full"].loss(query_states, input_ids, attention_mask))
    # only the batch's words get a gradient through the tied output table (the input side
    # reads the inputs' words, which here are the same 10-19 plus [PAD])
    loss.backward()
    touched = pair["batch"].embed.weight.grad.abs().sum(-1) > 0  # (V,)
    assert set(touched.nonzero().flatten().tolist()) <= set(range(10, 20)) | {0}
    assert touched[targets.unique()].all()


def test_the_vtg_vocabulary_comes_from_config():
    assert load_config("tiny").model.heads.vtg_vocabulary == "batch"  # the preset's anchor
    assert load_config("paper").model.heads.vtg_vocabulary == "full"
    full = load_config("tiny", ["model.heads.vtg_vocabulary=full"]).model.heads
    assert full.vtg_vocabulary == "full"
    assert heads()["batch"].batch_vocabulary and not heads()["full"].batch_vocabulary
    with pytest.raises(ValueError, match="vtg_vocabulary"):
        load_config("tiny", ["model.heads.vtg_vocabulary=sampled"])
