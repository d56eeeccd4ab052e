"""From cached encoder features to the soft prompt: residual -> temporal -> T-Fuseformer -> bridge.

Shapes use B batch, T frames, P patches per frame, M audio segments, L audio tokens per segment,
L' tokens per frame/segment after the residual, D the Fuseformer width, F fusion tokens,
K bridge queries (soft prompt length) and H the LLM width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from damo.config.model import BridgeConfig, FuseformerConfig, ResidualConfig, TemporalConfig
from damo.model.layers import (
    CrossAttention,
    FeedForward,
    QueryLayer,
    SelfAttentionBlock,
    key_mask_to_attn_mask,
    sinusoidal_embedding,
)

# The question the bridge reads (`read_question`): its frozen text-encoder states (B, S, Dt)
# and their mask (B, S), True for real tokens.
Question = tuple[Tensor, Tensor]


@dataclass
class VideoFeatures:
    """The feature contract between extraction (frozen encoders, run once) and training.

    visual        (B, T, 1+P, Dv) float  vision encoder's last hidden state per frame, CLS first
    visual_times  (B, T)          float  each frame's timestamp in seconds
    visual_mask   (B, T)          bool   True for real frames, False for padding
    audio         (B, M, L, Da)   float  Whisper encoder tokens per segment
    audio_times   (B, M)          float  each segment's centre in seconds
    audio_mask    (B, M)          bool   True for real segments (a silent video may have none)

    Features are stored as float16 or float32; the model casts them to its own dtype.
    """

    visual: Tensor
    visual_times: Tensor
    visual_mask: Tensor
    audio: Tensor
    audio_times: Tensor
    audio_mask: Tensor

    KEYS = ("visual", "visual_times", "visual_mask", "audio", "audio_times", "audio_mask")

    @classmethod
    def from_batch(cls, batch: dict[str, Tensor]) -> VideoFeatures:
        missing = [key for key in cls.KEYS if key not in batch]
        if missing:
            raise KeyError(f"batch lacks video feature fields {missing}")
        return cls(**{key: batch[key] for key in cls.KEYS})

    @classmethod
    def random(
        cls,
        batch: int,
        frames: int,
        visual_tokens: int,
        visual_dim: int,
        segments: int,
        audio_tokens: int,
        audio_dim: int,
        duration_s: float = 30.0,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> VideoFeatures:
        """Random features with the contract's shapes (shape checks, benchmarks, tests)."""

        def normal(*shape: int) -> Tensor:
            if torch.device(device or "cpu").type == "meta":
                return torch.empty(*shape, device="meta")
            return torch.randn(*shape, generator=generator).to(device)

        def centres(count: int) -> Tensor:
            times = (torch.arange(count, dtype=torch.float32) + 0.5) * duration_s / count
            return times.expand(batch, count).to(device)  # (B, count) evenly spread

        return cls(
            visual=normal(batch, frames, visual_tokens, visual_dim),
            visual_times=centres(frames),
            visual_mask=torch.ones(batch, frames, dtype=torch.bool, device=device),
            audio=normal(batch, segments, audio_tokens, audio_dim),
            audio_times=centres(segments),
            audio_mask=torch.ones(batch, segments, dtype=torch.bool, device=device),
        )

    def as_batch(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in self.KEYS}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VideoFeatures:
        def move(tensor: Tensor, floating: bool) -> Tensor:
            return tensor.to(device=device, dtype=dtype if floating and dtype else None)

        return VideoFeatures(
            visual=move(self.visual, True),
            visual_times=move(self.visual_times, False),
            visual_mask=move(self.visual_mask, False).bool(),
            audio=move(self.audio, True),
            audio_times=move(self.audio_times, False),
            audio_mask=move(self.audio_mask, False).bool(),
        )


class GlobalResidual(nn.Module):
    """X_res = AdaptiveAvgPool(X_local -> L') + FFN(X_global), then a linear to width D.

    The pooled local tokens keep coarse spatial (or spectral) detail; the global token, added to
    every one of them, carries what the whole frame or segment is about. With `grid` (vision)
    the local tokens are a row-major (rows, cols) patch grid pooled in 2-D to `pooled`
    (rows', cols'), L' = rows' x cols'; without it (audio) they are a sequence pooled to
    `pooled` tokens.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        pooled: int | tuple[int, int],
        ffn_mult: int,
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(in_dim)  # encoder outputs are unnormalised (pre final LN)
        self.pool = nn.AdaptiveAvgPool2d(pooled) if grid else nn.AdaptiveAvgPool1d(pooled)
        self.global_ffn = FeedForward(in_dim, ffn_mult)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, local: Tensor, global_: Tensor) -> Tensor:
        batch, steps, tokens, in_dim = local.shape  # (B, T, P, Din)
        local = self.norm(local).reshape(batch * steps, tokens, in_dim).transpose(1, 2)
        if self.grid:
            local = local.reshape(batch * steps, in_dim, *self.grid)  # (B*T, Din, rows, cols)
        pooled = self.pool(local).flatten(2).transpose(1, 2)  # (B*T, L', Din)
        pooled = pooled.reshape(batch, steps, -1, in_dim)  # (B, T, L', Din)
        residual = pooled + self.global_ffn(self.norm(global_))[:, :, None, :]  # (B, T, L', Din)
        return self.proj(residual)  # (B, T, L', D)


def patch_grid(patches: int) -> tuple[int, int]:
    """(rows, cols) of a square image's patch grid: ViT encoders see square frames."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches per frame do not form a square grid")
    return side, side


class TemporalPathway(nn.Module):
    """Grouped conv along time (optional) + learnable positions + sinusoidal timestamps.

    The convolution runs over time independently for each of the L' token slots, mixing
    neighbouring frames; with stride s it keeps every s-th frame's time and mask. With
    `cfg.slot_embedding` each of the `slots` token slots gets a learned embedding too: the
    pathway flattens a frame's slots into one sequence, and attention has no order of its own.
    """

    def __init__(self, dim: int, cfg: TemporalConfig, convolve: bool, slots: int = 1):
        super().__init__()
        self.slot = nn.Embedding(slots, dim) if cfg.slot_embedding else None
        if convolve and cfg.kernel % 2 == 0:
            raise ValueError(f"temporal kernel must be odd, got {cfg.kernel}")
        self.time_scale = cfg.time_scale
        self.stride = cfg.stride if convolve else 1
        self.conv = (
            nn.Conv1d(
                dim, dim, cfg.kernel, stride=cfg.stride, padding=cfg.kernel // 2, groups=cfg.groups
            )
            if convolve
            else None
        )
        self.position = nn.Embedding(cfg.max_positions, dim)

    def forward(self, x: Tensor, times: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, steps, tokens, dim = x.shape  # (B, T, L', D)
        x = x * mask[:, :, None, None].to(x.dtype)  # padded frames must not leak into neighbours
        if self.conv is not None:
            series = x.permute(0, 2, 3, 1).reshape(batch * tokens, dim, steps)  # (B*L', D, T)
            mixed = self.conv(series)  # (B*L', D, T')
            mixed = mixed.reshape(batch, tokens, dim, -1).permute(0, 3, 1, 2)  # (B, T', L', D)
            x = x[:, :: self.stride] + mixed
            times, mask = times[:, :: self.stride], mask[:, :: self.stride]  # (B, T')
        positions = self.position(torch.arange(x.shape[1], device=x.device))  # (T', D)
        clock = sinusoidal_embedding(times, dim, self.time_scale).to(x.dtype)  # (B, T', D)
        x = x + positions[None, :, None, :] + clock[:, :, None, :]  # (B, T', L', D)
        if self.slot is not None:
            x = x + self.slot.weight[None, None]  # (L', D), the same in every frame
        return x, times, mask


class FuseformerLayer(nn.Module):
    """One T-Fuseformer layer.

    1. per-modality self-attention + FFN over that modality's stream;
    2. each modality's learnable queries cross-attend to its stream (compression);
    3. multimodal self-attention + FFN over [fusion tokens; visual queries; audio queries].
    The updated queries become the next layer's streams.
    """

    def __init__(self, cfg: FuseformerConfig):
        super().__init__()
        dim, heads = cfg.width, cfg.heads
        self.visual_self = SelfAttentionBlock(dim, heads, cfg.ffn_mult, cfg.dropout)
        self.audio_self = SelfAttentionBlock(dim, heads, cfg.ffn_mult, cfg.dropout)
        self.visual_queries = nn.Parameter(torch.randn(cfg.visual_queries, dim) * 0.02)
        self.audio_queries = nn.Parameter(torch.randn(cfg.audio_queries, dim) * 0.02)
        self.visual_cross = CrossAttention(dim, heads, cfg.dropout)
        self.audio_cross = CrossAttention(dim, heads, cfg.dropout)
        self.multimodal = SelfAttentionBlock(dim, heads, cfg.ffn_mult, cfg.dropout)

    def forward(
        self,
        visual: Tensor,
        visual_mask: Tensor | None,
        audio: Tensor,
        audio_mask: Tensor | None,
        fusion: Tensor,
        joint_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch = fusion.shape[0]
        visual_attn = key_mask_to_attn_mask(visual_mask)  # (B, 1, 1, Sv) or None
        audio_attn = key_mask_to_attn_mask(audio_mask)  # (B, 1, 1, Sa) or None
        joint_attn = key_mask_to_attn_mask(joint_mask)  # (B, 1, 1, F+Nv+Na) or None
        visual = self.visual_self(visual, visual_attn)  # (B, Sv, D)
        audio = self.audio_self(audio, audio_attn)  # (B, Sa, D)
        visual_queries = self.visual_queries.expand(batch, -1, -1)  # (B, Nv, D)
        audio_queries = self.audio_queries.expand(batch, -1, -1)  # (B, Na, D)
        visual_queries = self.visual_cross(visual_queries, visual, visual_attn)  # (B, Nv, D)
        audio_queries = self.audio_cross(audio_queries, audio, audio_attn)  # (B, Na, D)
        joint = torch.cat([fusion, visual_queries, audio_queries], dim=1)  # (B, F+Nv+Na, D)
        joint = self.multimodal(joint, joint_attn)
        sizes = [fusion.shape[1], visual_queries.shape[1], audio_queries.shape[1]]
        fusion, visual_queries, audio_queries = joint.split(sizes, dim=1)
        return fusion, visual_queries, audio_queries


class TFuseformer(nn.Module):
    """Hierarchical dual-stream fusion; returns the fusion tokens (B, F, D)."""

    def __init__(self, cfg: FuseformerConfig):
        super().__init__()
        self.fusion_tokens = nn.Parameter(torch.randn(cfg.fusion_tokens, cfg.width) * 0.02)
        self.fused_and_visual = cfg.fusion_tokens + cfg.visual_queries
        self.audio_queries = cfg.audio_queries
        self.layers = nn.ModuleList(FuseformerLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(
        self, visual: Tensor, visual_mask: Tensor, audio: Tensor, audio_mask: Tensor
    ) -> Tensor:
        # visual (B, Sv, D), audio (B, Sa, D) with key masks (B, Sv), (B, Sa)
        batch = visual.shape[0]
        fusion = self.fusion_tokens.expand(batch, -1, -1)  # (B, F, D)
        # A video without audio (or with its audio masked out) has audio queries that read
        # nothing real: nothing may read them, in this layer's fusion or the next layer's
        # audio stream, so the video is seen through its frames alone.
        heard = audio_mask.any(dim=1, keepdim=True)  # (B, 1)
        audio_queries_mask = heard.expand(batch, self.audio_queries)  # (B, Na)
        joint_mask = torch.cat(
            [torch.ones_like(heard).expand(batch, self.fused_and_visual), audio_queries_mask],
            dim=1,
        )  # (B, F+Nv+Na)
        masks: tuple[Tensor | None, Tensor | None] = (visual_mask, audio_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                fusion, visual, audio = checkpoint(
                    layer,
                    visual,
                    masks[0],
                    audio,
                    masks[1],
                    fusion,
                    joint_mask,
                    use_reentrant=False,
                )  # activations recomputed in the backward pass
            else:
                fusion, visual, audio = layer(visual, masks[0], audio, masks[1], fusion, joint_mask)
            # from layer 2 on the streams are the queries: every visual one is real, the audio
            # ones only where there is audio
            masks = (None, audio_queries_mask)
        return self.norm(fusion)  # (B, F, D)


class Bridge(nn.Module):
    """A small Q-Former over the fusion tokens, then a linear to the LLM width (the soft prompt).

    With `text_dim` (`read_question`) the queries' self-attention also reads the question's
    text-encoder states, projected to the bridge's width, as InstructBLIP's Q-Former reads the
    instruction: the soft prompt can then pick out the event the question names. Without a
    question (stage 1, the anchor) the queries read only each other."""

    def __init__(
        self, dim: int, llm_dim: int, cfg: BridgeConfig, ffn_mult: int = 4, text_dim: int = 0
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.queries, dim) * 0.02)
        self.layers = nn.ModuleList(QueryLayer(dim, cfg.heads, ffn_mult) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.to_llm = nn.Linear(dim, llm_dim)
        self.question = None
        if cfg.read_question:
            if not text_dim:
                raise ValueError("a bridge that reads the question needs the text width")
            self.question = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))

    def query_states(self, fusion: Tensor, question: Question | None = None) -> Tensor:
        """(B, F, D) -> (B, K, D): what the stage-1 heads and the LLM projection read."""
        queries = self.queries.expand(fusion.shape[0], -1, -1)  # (B, K, D)
        prefix = self_attn_mask = None
        if self.question is not None and question is not None:
            states, mask = question  # (B, S, Dt), (B, S)
            prefix = self.question(states.to(queries.dtype))  # (B, S, D)
            every_query = mask.new_ones(mask.shape[0], queries.shape[1])  # (B, K)
            self_attn_mask = torch.cat([every_query, mask], dim=1).bool()[:, None, None, :]
        for layer in self.layers:
            queries = layer(queries, fusion, self_attn_mask=self_attn_mask, prefix=prefix)
        return self.norm(queries)

    def forward(self, fusion: Tensor, question: Question | None = None) -> Tensor:
        return self.to_llm(self.query_states(fusion, question))  # (B, K, H)


class VideoPathway(nn.Module):
    """Everything trainable between the frozen encoders and the LLM."""

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        visual_patches: int,
        audio_tokens: int,
        llm_dim: int,
        residual: ResidualConfig,
        temporal: TemporalConfig,
        fuseformer: FuseformerConfig,
        bridge: BridgeConfig,
        text_dim: int = 0,
    ):
        super().__init__()
        width = fuseformer.width
        if width % temporal.groups:
            raise ValueError(f"temporal groups {temporal.groups} must divide width {width}")
        grid = patch_grid(visual_patches)
        pooled_grid = residual.visual_pool_grid(*grid)
        audio_slots = max(1, audio_tokens // residual.audio_compression)
        self.visual_residual = GlobalResidual(
            visual_dim, width, pooled_grid, residual.ffn_mult, grid=grid
        )
        self.audio_residual = GlobalResidual(audio_dim, width, audio_slots, residual.ffn_mult)
        visual_slots = pooled_grid[0] * pooled_grid[1]
        self.visual_temporal = TemporalPathway(width, temporal, convolve=True, slots=visual_slots)
        self.audio_temporal = TemporalPathway(width, temporal, convolve=False, slots=audio_slots)
        self.fuseformer = TFuseformer(fuseformer)
        self.bridge = Bridge(width, llm_dim, bridge, fuseformer.ffn_mult, text_dim)

    def fusion_tokens(self, video: VideoFeatures) -> Tensor:
        """(B, F, D) fusion tokens from encoder features."""
        dtype = self.fuseformer.fusion_tokens.dtype
        visual = self.visual_residual(
            video.visual[:, :, 1:].to(dtype),
            video.visual[:, :, 0].to(dtype),  # patches, CLS
        )  # (B, T, L'v, D)
        audio_tokens = video.audio.to(dtype)  # (B, M, L, Da)
        audio = self.audio_residual(audio_tokens, audio_tokens.mean(dim=2))  # (B, M, L'a, D)
        visual, _, visual_mask = self.visual_temporal(visual, video.visual_times, video.visual_mask)
        audio, _, audio_mask = self.audio_temporal(audio, video.audio_times, video.audio_mask)
        batch, _, visual_slots, width = visual.shape
        audio_slots = audio.shape[2]
        visual = visual.reshape(batch, -1, width)  # (B, T'*L'v, D)
        audio = audio.reshape(batch, -1, width)  # (B, M*L'a, D)
        visual_mask = visual_mask.repeat_interleave(visual_slots, dim=1)  # (B, T'*L'v)
        audio_mask = audio_mask.repeat_interleave(audio_slots, dim=1)  # (B, M*L'a)
        return self.fuseformer(visual, visual_mask, audio, audio_mask)  # (B, F, D)

    def query_states(self, video: VideoFeatures) -> Tensor:
        return self.bridge.query_states(self.fusion_tokens(video))  # (B, K, D)

    def forward(self, video: VideoFeatures, question: Question | None = None) -> Tensor:
        return self.bridge(self.fusion_tokens(video), question)  # (B, K, H): the soft prompt
