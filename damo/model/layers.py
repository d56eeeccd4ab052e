"""Transformer building blocks shared by the T-Fuseformer, the bridge and the stage-1 heads.

Pre-LayerNorm blocks on `F.scaled_dot_product_attention`. Masks are boolean with True meaning
"may attend", the convention of SDPA: a key mask (B, Nk) marks real tokens, a full mask
(B, 1, Nq, Nk) is used where queries differ in what they see (causal captioning).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(seconds: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sin/cos features of timestamps in seconds: (...,) -> (..., dim)."""
    half = dim // 2
    exponents = torch.arange(half, device=seconds.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (half,)
    angles = seconds.float()[..., None] * frequencies  # (..., half)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2*half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def key_mask_to_attn_mask(key_mask: Tensor | None) -> Tensor | None:
    """(B, Nk) bool -> (B, 1, 1, Nk), broadcast over heads and queries.

    A sample with no real key at all (a video without audio, say) would make softmax produce
    NaN; such rows attend to everything instead, and what they read is padding the caller
    masks out downstream.
    """
    if key_mask is None:
        return None
    empty = ~key_mask.any(dim=-1, keepdim=True)  # (B, 1)
    return (key_mask | empty)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention: queries from `x`, keys and values from `context` (default `x`)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, context: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        context = x if context is None else context
        batch, num_queries, dim = x.shape  # (B, Nq, D)
        num_keys = context.shape[1]
        head_dim = dim // self.heads
        q = self.query(x).view(batch, num_queries, self.heads, head_dim).transpose(1, 2)
        kv = self.key_value(context).view(batch, num_keys, 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nk, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, Nq, hd)
        return self.out(y.transpose(1, 2).reshape(batch, num_queries, dim))  # (B, Nq, D)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mult * dim, out_dim or dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttentionBlock(nn.Module):
    """x + SelfAttn(LN(x)), then + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout=dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), attn_mask=attn_mask)
        return x + self.ffn(self.ffn_norm(x))


class CrossAttention(nn.Module):
    """queries + CrossAttn(LN(queries), LN(context)): queries read (and compress) a context."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)

    def forward(self, queries: Tensor, context: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return queries + self.attn(
            self.query_norm(queries), self.context_norm(context), attn_mask=attn_mask
        )


class QueryLayer(nn.Module):
    """A Q-Former layer: self-attention among queries, cross-attention to a context, FFN."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross = CrossAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout=dropout)

    def forward(
        self,
        queries: Tensor,
        context: Tensor,
        attn_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """`prefix` (B, P, D): more keys for the self-attention, read but never updated (the
        bridge's question); `self_attn_mask` then covers queries + prefix."""
        normed = self.self_norm(queries)
        keys = normed if prefix is None else torch.cat([normed, prefix], dim=1)  # (B, Nq+P, D)
        queries = queries + self.self_attn(normed, keys, attn_mask=self_attn_mask)
        queries = self.cross(queries, context, attn_mask)
        return queries + self.ffn(self.ffn_norm(queries))
