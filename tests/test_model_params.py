"""Parameter counts of the paper preset, printed by `damo model params paper`.

Tolerances, and where they come from:
- Frozen backbones are compared with their published sizes (Mistral-7B 7.24B; the EVA-CLIP
  paper's 304M for the EVA02-CLIP-L/14 image encoder; BERT-base 110M). Published sizes are
  rounded to three significant figures (up to 0.5% off) and we leave out heads DaMO does not
  use (EVA-CLIP's 0.8M projection to the joint space, 0.26%), and LLaVA's LLM has 64 more
  vocabulary rows than Mistral's (0.5M, 0.007%), so 1% covers all three. The Whisper-small
  encoder has no published figure of its own: it is checked against its closed form (convs,
  positions, 12 pre-LN layers) exactly.
- DaMO's own components are checked against closed forms derived below from the architecture
  (every weight and bias of every block), within 0.1%: enough to absorb nothing but a typo in
  a formula, so a block added to or dropped from the model fails the test.
- The LoRA adapter is exact: layers x r x sum(in + out) over q, k, v, o projections.
"""

from __future__ import annotations

import re

from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config

PUBLISHED = {"llm": 7.24e9, "vision": 304e6, "text_encoder": 110e6}


def linear(a: int, b: int) -> int:
    return a * b + b


def norm(d: int) -> int:
    return 2 * d


def attention(d: int) -> int:
    return linear(d, d) + linear(d, 2 * d) + linear(d, d)


def ffn(d: int, mult: int) -> int:
    return linear(d, mult * d) + linear(mult * d, d)


def self_block(d: int, mult: int) -> int:
    return 2 * norm(d) + attention(d) + ffn(d, mult)


def cross(d: int) -> int:
    return 2 * norm(d) + attention(d)


def query_layer(d: int, mult: int) -> int:
    return norm(d) + attention(d) + cross(d) + norm(d) + ffn(d, mult)


def closed_forms(cfg) -> dict[str, int]:
    d, m = cfg.fuseformer.width, cfg.fuseformer.ffn_mult
    dv, da, dt, h = 1024, 768, 768, 4096
    vocab_text, e = 30522, cfg.heads.embed_dim
    fuse = cfg.fuseformer
    residual = sum(norm(x) + ffn(x, cfg.residual.ffn_mult) + linear(x, d) for x in (dv, da))
    temporal = (d * (d // cfg.temporal.groups) * cfg.temporal.kernel + d) + 2 * (
        cfg.temporal.max_positions * d
    )
    layer = 3 * self_block(d, m) + 2 * cross(d) + (fuse.visual_queries + fuse.audio_queries) * d
    fuseformer = fuse.fusion_tokens * d + fuse.depth * layer + norm(d)
    to_llm = linear(d, h)
    bridge = cfg.bridge.queries * d + cfg.bridge.depth * query_layer(d, m) + norm(d) + to_llm
    heads = (
        linear(d, e) + linear(dt, e) + 1
        + linear(dt, d) + cfg.heads.vtm_depth * query_layer(d, 4) + linear(d, 2)
        + vocab_text * d + cfg.heads.vtg_max_length * d
        + cfg.heads.vtg_depth * self_block(d, 4) + norm(d)
    )  # fmt: skip
    r = cfg.llm.lora.r
    lora = 32 * r * ((4096 + 4096) + (4096 + 1024) + (4096 + 1024) + (4096 + 4096))
    return {
        "residual": residual,
        "temporal": temporal,
        "fuseformer": fuseformer,
        "bridge": bridge,
        "heads": heads,
        "lora": lora,
        "stage1": residual + temporal + fuseformer + bridge - to_llm + heads,
        "stage2": fuseformer + bridge,
        "stage3": fuseformer + bridge + lora,
        "stage4": bridge + lora,
    }


def whisper_small_encoder() -> int:
    d, layers, ffn_dim, mels, positions = 768, 12, 3072, 80, 1500
    convs = (mels * d * 3 + d) + (d * d * 3 + d)
    attn = 4 * d * d + 3 * d  # Whisper's k projection has no bias
    per_layer = attn + norm(d) + linear(d, ffn_dim) + linear(ffn_dim, d) + norm(d)
    return convs + positions * d + layers * per_layer + norm(d)


def printed_counts() -> dict[str, int]:
    result = CliRunner().invoke(app, ["model", "params", "paper"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = re.findall(r"(frozen|trainable|trained in)\s*│\s*(\w+)\s*│\s*([\d,]+)", result.output)
    assert len(rows) == 14, result.output
    assert "frozen total" in result.output and "trainable total" in result.output
    # the paper's backbones, and the token ratio: 24 frames x 256 patches / 32 soft-prompt tokens
    assert "vision timm/eva02_large_patch14_clip_224.merged2b (timm)" in result.output
    assert "LLM llava-hf/llava-v1.6-mistral-7b-hf" in result.output
    assert "6,144 per-patch tokens: ratio 192.0x" in result.output
    return {name: int(value.replace(",", "")) for _, name, value in rows}


def test_paper_parameter_counts_printed_by_the_cli():
    counts = printed_counts()
    for name, published in PUBLISHED.items():
        assert abs(counts[name] - published) <= 0.01 * published, (name, counts[name])
    assert counts["audio"] == whisper_small_encoder()
    expected = closed_forms(load_config("paper").model)
    for name, value in expected.items():
        assert abs(counts[name] - value) <= 0.001 * value, (name, counts[name], value)
    assert counts["lora"] == expected["lora"] == 27_262_976
    # the frozen side dwarfs what trains: the point of the recipe
    frozen = sum(counts[k] for k in ("vision", "audio", "text_encoder", "llm"))
    assert max(counts[f"stage{s}"] for s in (1, 2, 3, 4)) < 0.03 * frozen
