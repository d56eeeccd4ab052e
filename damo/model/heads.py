"""Stage-1 heads (no LLM): VTC, VTM and VTG, BLIP-2 style, on the bridge's query states.

All three read the query states (B, K, D) of the bridge's Q-Former and the outputs of a frozen
text encoder (B, S, Dt); each loss can be computed on its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from damo.config.model import HeadsConfig
from damo.model.layers import QueryLayer, SelfAttentionBlock, key_mask_to_attn_mask


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """(B, S, Dt) masked mean over tokens -> (B, Dt), as sentence encoders pool."""
    weights = mask.to(states.dtype)[..., None]  # (B, S, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ContrastiveHead(nn.Module):
    """VTC: video and text projected to one space, InfoNCE with a learnable temperature."""

    def __init__(self, dim: int, text_dim: int, cfg: HeadsConfig):
        super().__init__()
        self.video_proj = nn.Linear(dim, cfg.embed_dim)
        self.text_proj = nn.Linear(text_dim, cfg.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def embed_video(self, query_states: Tensor) -> Tensor:
        return F.normalize(self.video_proj(query_states.mean(dim=1)), dim=-1)  # (B, E)

    def embed_text(self, text_states: Tensor, text_mask: Tensor) -> Tensor:
        return F.normalize(self.text_proj(mean_pool(text_states, text_mask)), dim=-1)  # (B, E)

    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()  # CLIP caps 1/temperature at 100

    def similarities(self, video_emb: Tensor, text_emb: Tensor) -> Tensor:
        return self.scale() * video_emb @ text_emb.T  # (Bv, Bt)

    def pair_similarities(self, video_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Each video with its own text alone: the diagonal of `similarities`, for texts that
        are not in the batch (a caption's hard negative)."""
        return self.scale() * (video_emb * text_emb).sum(dim=1)  # (B,)

    def loss(self, sims: Tensor, negative_sims: Tensor | None = None) -> Tensor:
        """InfoNCE both ways; `negative_sims` (B,), each video's similarity to its own hard
        negative caption (-inf where it has none), join that video's video-to-text softmax."""
        targets = torch.arange(sims.shape[0], device=sims.device)
        video_to_text = sims  # (B, B)
        if negative_sims is not None:
            video_to_text = torch.cat([sims, negative_sims[:, None]], dim=1)  # (B, B+1)
        return (F.cross_entropy(video_to_text, targets) + F.cross_entropy(sims.T, targets)) / 2


class MatchingHead(nn.Module):
    """VTM: does this text describe this video? Text tokens cross-attend to the query states."""

    def __init__(self, dim: int, text_dim: int, heads: int, cfg: HeadsConfig):
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(QueryLayer(dim, heads) for _ in range(cfg.vtm_depth))
        self.classifier = nn.Linear(dim, 2)

    def logits(self, query_states: Tensor, text_states: Tensor, text_mask: Tensor) -> Tensor:
        # query_states (N, K, D), text_states (N, S, Dt), text_mask (N, S) -> (N, 2)
        x = self.text_in(text_states)  # (N, S, D)
        text_attn = key_mask_to_attn_mask(text_mask.bool())  # padding is not read
        for layer in self.layers:
            x = layer(x, query_states, self_attn_mask=text_attn)
        return self.classifier(x[:, 0])  # the first ([CLS]) token decides

    def loss(
        self,
        query_states: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        sims: Tensor,
        negatives: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Positives plus one hard negative text per video and one hard negative video per text.

        Negatives are sampled in proportion to softmax(VTC similarity), the diagonal (the true
        pair) excluded, as in ALBEF/BLIP: similar-but-wrong pairs teach the most. `negatives`
        (states (B, S', Dt), mask (B, S'), has_one (B,)) adds each video paired with its own
        negative caption, where it has one, as a non-match. A batch of one has no in-batch
        negatives, so without `negatives` the loss is zero there.
        """
        batch = sims.shape[0]
        own = negatives is not None and bool(negatives[2].any())
        if batch < 2 and not own:
            return query_states.sum() * 0.0
        videos, texts, masks = [query_states], [text_states], [text_mask]  # the true pairs
        labels = [torch.ones(batch)]
        if batch >= 2:
            with torch.no_grad():
                diagonal = torch.eye(batch, dtype=torch.bool, device=sims.device)
                masked = sims.float().masked_fill(diagonal, float("-inf"))
                negative_text = torch.multinomial(masked.softmax(dim=1), 1).squeeze(1)  # (B,)
                negative_video = torch.multinomial(masked.T.softmax(dim=1), 1).squeeze(1)  # (B,)
            videos += [query_states, query_states[negative_video]]
            texts += [text_states[negative_text], text_states]
            masks += [text_mask[negative_text], text_mask]
            labels.append(torch.zeros(2 * batch))
        if own:
            states, mask, has_one = negatives
            videos.append(query_states[has_one])
            texts.append(states[has_one])
            masks.append(mask[has_one])
            labels.append(torch.zeros(int(has_one.sum())))
        length = max(t.shape[1] for t in texts)  # captions and negatives pad apart
        texts = [F.pad(t, (0, 0, 0, length - t.shape[1])) for t in texts]  # (N, S, Dt) each
        masks = [F.pad(m, (0, length - m.shape[1])) for m in masks]
        logits = self.logits(torch.cat(videos), torch.cat(texts), torch.cat(masks))  # (N, 2)
        return F.cross_entropy(logits, torch.cat(labels).long().to(sims.device))


class CaptioningHead(nn.Module):
    """VTG: a small causal decoder writes the caption, prefixed by the query states.

    Queries attend to each other; each text token attends to all queries and to earlier text
    tokens. It predicts the text encoder tokenizer's ids ([CLS] starts, [SEP] ends), ranked
    against the whole vocabulary or, with `vtg_vocabulary: batch`, against the batch's own words.
    """

    def __init__(self, dim: int, heads: int, vocab_size: int, cfg: HeadsConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(cfg.vtg_max_length, dim)
        for table in (self.embed, self.position):  # small init: logits start near uniform
            nn.init.normal_(table.weight, std=0.02)
        self.layers = nn.ModuleList(SelfAttentionBlock(dim, heads) for _ in range(cfg.vtg_depth))
        self.norm = nn.LayerNorm(dim)
        self.batch_vocabulary = cfg.vtg_vocabulary == "batch"

    def loss(self, query_states: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        num_queries = query_states.shape[1]
        inputs, targets = input_ids[:, :-1], input_ids[:, 1:]  # (B, S-1) each
        text_mask = attention_mask[:, :-1].bool()
        length = inputs.shape[1]
        text = self.embed(inputs) + self.position(torch.arange(length, device=inputs.device))
        x = torch.cat([query_states, text], dim=1)  # (B, K+S-1, D)
        total = num_queries + length
        # prefix-LM mask: queries see queries; text sees queries and the text before it
        rows = torch.arange(total, device=x.device)
        allowed = (rows[None, :] < num_queries) | (rows[None, :] <= rows[:, None])  # (N, N)
        allowed = allowed & ((rows[:, None] >= num_queries) | (rows[None, :] < num_queries))
        key_mask = torch.cat(
            [torch.ones(x.shape[0], num_queries, dtype=torch.bool, device=x.device), text_mask],
            dim=1,
        )  # (B, N)
        attn_mask = allowed[None, None] & key_mask_to_attn_mask(key_mask)  # (B, 1, N, N)
        for layer in self.layers:
            x = layer(x, attn_mask)
        scored = attention_mask[:, 1:].bool()  # (B, S-1): padding predicts nothing
        states = self.norm(x[:, num_queries:])[scored]  # (M, D)
        targets = targets[scored]  # (M,)
        words = self.embed.weight  # (V, D), tied
        if self.batch_vocabulary:
            vocabulary = targets.unique()  # (U,), sorted
            words = words[vocabulary]  # (U, D)
            targets = torch.searchsorted(vocabulary, targets)  # (M,) in [0, U)
        return F.cross_entropy(states @ words.T, targets)  # logits (M, V) or (M, U)


class AlignmentHeads(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int, vocab_size: int, cfg: HeadsConfig):
        super().__init__()
        self.vtc = ContrastiveHead(dim, text_dim, cfg)
        self.vtm = MatchingHead(dim, text_dim, heads, cfg)
        self.vtg = CaptioningHead(dim, heads, vocab_size, cfg)
