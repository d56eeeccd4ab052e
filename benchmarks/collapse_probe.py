"""Why do the LM stages collapse the video pathway? Short side-by-side runs on a small world.

One process, no Ray: a small synthetic world (--clips), its features extracted in-process with
the same UDFs as `damo extract`, one shared stage-1 checkpoint, then stages 2 and 3 once per
recipe variant (what trains and at which learning rate). After each stage it measures

- spread: how much the soft prompt differs between videos, sqrt(mean over (K, H) of the
  variance across validation videos) / sqrt(mean square); 0 means one prompt for every video;
- video gap: validation LM loss with each sample's video swapped for another's, minus the loss
  with its own (nats per answer token); 0 means the answers ignore the video;
- after stage 3: grounding mIoU / R1@0.5 and QA accuracy on the test split (greedy decoding).

Usage (about 1 minute per variant on 2 busy cores after the world and backbones exist):
    nice python benchmarks/collapse_probe.py --clips 100 --variants paper frozen anchor
Results go to benchmarks/results_collapse_probe.json and, as Markdown, to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
from learning_bar import add_overrides_option, backbones_tag

# What each variant trains in stages 2 and 3, and the learning-rate scale of the pathway
# components (fuseformer, bridge) against the stage's lr; `anchor` adds the stage-1 alignment
# losses on caption batches to every LM step (`anchor_every8`: to one in 8; `anchor_vtc_vtm`:
# VTC + VTM only).
VARIANTS: dict[str, dict] = {
    "paper": {"trainable": {2: ["fuseformer", "bridge"], 3: ["fuseformer", "bridge", "lora"]}},
    "frozen": {"trainable": {2: ["bridge"], 3: ["lora"]}},
    "bridge34": {"trainable": {2: ["bridge"], 3: ["bridge", "lora"]}},
    "paper_lowlr": {
        "trainable": {2: ["fuseformer", "bridge"], 3: ["fuseformer", "bridge", "lora"]},
        "pathway_lr_scale": 0.1,
    },
    "anchor": {
        "trainable": {2: ["fuseformer", "bridge"], 3: ["fuseformer", "bridge", "lora"]},
        "anchor_weight": 1.0,
    },
    # the anchor on one LM step in 8, a rate the full bar also ran (`train.stages.stageK.anchor`)
    "anchor_every8": {
        "trainable": {2: ["fuseformer", "bridge"], 3: ["fuseformer", "bridge", "lora"]},
        "anchor_weight": 1.0,
        "anchor_every": 8,
    },
    # the anchor without VTG, the captioning head (90% of an anchor step's cost): the tiny
    # preset's recipe (`train.stages.stage{2,3}.anchor.losses: [vtc, vtm]`)
    "anchor_vtc_vtm": {
        "trainable": {2: ["fuseformer", "bridge"], 3: ["fuseformer", "bridge", "lora"]},
        "anchor_weight": 1.0,
        "anchor_losses": ["vtc", "vtm"],
    },
    "bridge34_anchor": {
        "trainable": {2: ["bridge"], 3: ["bridge", "lora"]},
        "anchor_weight": 1.0,
    },
}
RECIPE = [
    "model.llm.lora.r=32",
    "model.llm.lora.alpha=64",
    "model.llm.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]
TASKS = {1: ("caption",), 2: ("caption", "qa"), 3: ("grounding", "temporal_qa", "qa")}
FEATURE_KEYS = ("visual_features", "frame_times", "audio_features", "segment_bounds", "has_audio")


def extract(cfg, storage, world: str, out: Path) -> dict[str, np.ndarray]:
    """Every clip's features, with the UDFs of `damo extract`, in this process."""
    from damo.data.extract import EncodeFeatures, decode_videos, video_uris

    if out.exists():
        loaded = np.load(out, allow_pickle=False)
        return {k: loaded[k] for k in loaded.files}
    uris = video_uris(storage, f"{world}/videos")
    encode = EncodeFeatures(cfg, "probe", cfg.storage.s3)
    parts = []
    for first in range(0, len(uris), 8):
        chunk = np.array(uris[first : first + 8])
        decoded = decode_videos({"key": chunk, "video_uri": chunk}, cfg)
        assert (decoded["error_reason"] == "").all(), decoded["error_message"]
        encoded = encode(decoded)
        parts.append({k: encoded[k] for k in (*FEATURE_KEYS, "video_uri", "duration")})
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    table["video_uri"] = table["video_uri"].astype(str)
    np.savez(out, **table)
    return table


class Examples:
    """One split's records of some tasks, each pointing at its video's row of the features."""

    def __init__(self, records: list[dict], tasks, features: dict[str, np.ndarray]):
        from damo.data.training import conversation

        row_of = {uri: i for i, uri in enumerate(features["video_uri"])}
        chosen = [r for r in records if r["task"] in tasks]
        self.records = chosen
        self.rows = np.array([row_of[r["video_uri"]] for r in chosen])
        self.conversations = [json.dumps(conversation(r)) for r in chosen]
        self.captions = [r["answer"] if r["task"] == "caption" else "" for r in chosen]
        self.features = features

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray, video_rows: np.ndarray | None = None) -> dict:
        rows = self.rows[index] if video_rows is None else video_rows
        out = {k: self.features[k][rows] for k in FEATURE_KEYS}
        out["caption"] = np.array([self.captions[i] for i in index], dtype=object)
        out["conversation"] = np.array([self.conversations[i] for i in index], dtype=object)
        return out


def soft_prompt_spread(model, features: dict, rows: np.ndarray) -> float:
    import torch

    from damo.data.training import video_tensors
    from damo.model.video import VideoFeatures

    model.eval()
    with torch.no_grad():
        batch = {k: features[k][rows] for k in FEATURE_KEYS}
        prompt = model.soft_prompt(VideoFeatures.from_batch(video_tensors(batch))).float()
    model.train()
    return float(prompt.var(dim=0).mean().sqrt() / prompt.pow(2).mean().sqrt())


def lm_loss(model, examples: Examples, collate, shuffle_videos: bool, seed: int = 0) -> float:
    """Mean LM loss per answer token over a split (videos optionally swapped between samples)."""
    import torch

    model.eval()
    rng = np.random.default_rng(seed)
    total = count = 0.0
    with torch.no_grad():
        for first in range(0, len(examples), 16):
            index = np.arange(first, min(first + 16, len(examples)))
            rows = examples.rows[index]
            if shuffle_videos:  # another clip's video for every sample
                others = [r for r in np.unique(examples.rows)]
                rows = np.array([rng.choice([o for o in others if o != r]) for r in rows])
            batch = collate(examples.batch(index, rows))
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(batch, 2)["loss"]) * tokens
            count += tokens
    model.train()
    return total / max(count, 1)


def train_stage(model, stage, examples, collate, steps, lr, batch_size, variant, anchor=None):
    """Plain AdamW + warm-up/cosine over random batches; returns the last losses."""
    import torch

    from damo.config.train import ALIGNMENT_LOSSES
    from damo.train.loop import warmup_cosine

    params = model.set_stage(stage)
    scale = variant.get("pathway_lr_scale", 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    pathway = [p for p in params if names[id(p)].startswith("pathway.")]
    others = [p for p in params if not names[id(p)].startswith("pathway.")]
    groups = [g for g in ({"params": pathway, "lr": lr * scale}, {"params": others}) if g["params"]]
    anchor_weight = variant.get("anchor_weight", 0.0) if stage > 1 else 0.0
    if anchor_weight:  # the stage-1 heads and the whole pathway before the bridge projection
        heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
        for p in heads:
            p.requires_grad_(True)
        groups.append({"params": heads, "lr": lr * scale})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.02)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 0.05, 0.1))
    rng = np.random.default_rng(stage)
    model.train()
    losses = []
    every = variant.get("anchor_every", 1)
    for step in range(steps):
        index = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        loss = model(collate(examples.batch(index)), stage)["loss"]
        if anchor_weight and step % every == 0:
            a_index = rng.choice(len(anchor[0]), size=min(16, len(anchor[0])), replace=False)
            captions = anchor[1](anchor[0].batch(a_index))
            alignment = model.alignment_losses(
                model.training_video(captions),
                captions["text_input_ids"],
                captions["text_attention_mask"],
                variant.get("anchor_losses", ALIGNMENT_LOSSES),
            )
            loss = loss + anchor_weight * alignment["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses[-20:]))


def evaluate(model, records: list[dict], features: dict) -> dict:
    """Greedy answers on the test split: grounding mIoU / R1@0.5 and QA accuracy."""
    from damo.data.training import video_tensors
    from damo.eval.metrics import grounding_metrics, normalize_answer
    from damo.eval.parse import parse_span
    from damo.model.video import VideoFeatures

    model.eval()
    row_of = {uri: i for i, uri in enumerate(features["video_uri"])}
    out = {}
    for task in ("grounding", "qa"):
        chosen = [r for r in records if r["task"] == task]
        answers = []
        for first in range(0, len(chosen), 16):
            part = chosen[first : first + 16]
            rows = np.array([row_of[r["video_uri"]] for r in part])
            video = VideoFeatures.from_batch(
                video_tensors({k: features[k][rows] for k in FEATURE_KEYS})
            )
            answers += model.generate(video, [r["query"] for r in part], max_new_tokens=24)
        if task == "grounding":
            spans = [parse_span(a, r["duration"]) for a, r in zip(answers, chosen, strict=True)]
            metrics = grounding_metrics(spans, [tuple(r["spans"][0]) for r in chosen])
            out["grounding mIoU"] = metrics["mIoU"]
            out["grounding R1@0.5"] = metrics["R1@0.5"]
        else:
            right = [
                normalize_answer(a) == normalize_answer(r["answer"])
                for a, r in zip(answers, chosen, strict=True)
            ]
            out["QA acc."] = 100.0 * float(np.mean(right))
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, nargs=3, default=(200, 150, 400), help="stages 1-3")
    parser.add_argument("--lr", type=float, nargs=3, default=(3e-4, 1e-4, 1e-3), help="stages 1-3")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    add_overrides_option(parser)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/damo-probe"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_collapse_probe.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from damo.config import load_config
    from damo.config.data import SyntheticConfig
    from damo.data.backbones import make_tiny_backbones
    from damo.data.extract import feature_config_hash
    from damo.data.records import read_records
    from damo.data.synthetic import generate_world
    from damo.data.training import StageCollator
    from damo.model.damo import DamoModel
    from damo.storage import Storage

    torch.set_num_threads(1)
    started = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    storage = Storage()
    cfg = load_config("tiny", [*RECIPE, *args.set])
    tag = backbones_tag(cfg.model, args.lm_steps)
    backbones = str(args.cache / f"backbones-{args.clips}-{tag}")
    cfg = cfg.model_copy(update={"model": cfg.model.with_backbones_at(backbones)})
    if not Path(backbones, "llm", "config.json").exists():
        make_tiny_backbones(backbones, cfg.model, storage, args.lm_steps, args.clips)
    world = str(args.cache / f"world-{args.clips}")
    settings = SyntheticConfig.model_validate(
        {**cfg.data.synthetic.model_dump(), "num_clips": args.clips}
    )
    generate_world(world, storage, settings, progress=False)
    features_file = f"features-{args.clips}-{feature_config_hash(cfg)[:8]}.npz"
    features = extract(cfg, storage, world, args.cache / features_file)
    split = {
        s: read_records(f"{world}/records/{s}.parquet", storage).to_pylist()
        for s in ("train", "val", "test")
    }
    print(f"world ready in {time.monotonic() - started:.0f}s", flush=True)

    torch.manual_seed(0)
    model = DamoModel.from_config(cfg.model)
    align = StageCollator("alignment", tokenize_text=model.tokenize_text)
    lm = StageCollator("lm", model.conversation_inputs)
    captions = Examples(split["train"], TASKS[1], features)
    val_rows = np.unique(Examples(split["val"], TASKS[1], features).rows)
    results: dict = {"clips": args.clips, "steps": args.steps, "lr": args.lr, "variants": {}}
    tick = time.monotonic()
    results["stage1"] = {
        "loss": train_stage(model, 1, captions, align, args.steps[0], args.lr[0], 16, {}),
        "spread": soft_prompt_spread(model, features, val_rows),
        "seconds": round(time.monotonic() - tick),
    }
    print("stage 1", results["stage1"], flush=True)
    stage1_state = copy.deepcopy(model.state_dict())
    for name in args.variants:
        variant = VARIANTS[name]
        model.load_state_dict(stage1_state)
        row: dict = {}
        tick = time.monotonic()
        for stage in (2, 3):
            model.cfg.stages.get(stage).trainable = list(variant["trainable"][stage])
            train_examples = Examples(split["train"], TASKS[stage], features)
            val_examples = Examples(split["val"], TASKS[stage], features)
            loss = train_stage(
                model,
                stage,
                train_examples,
                lm,
                args.steps[stage - 1],
                args.lr[stage - 1],
                8,
                variant,
                anchor=(captions, align),
            )
            own = lm_loss(model, val_examples, lm, shuffle_videos=False)
            row[f"stage{stage}"] = {
                "train_loss": loss,
                "val_loss": own,
                "video_gap": lm_loss(model, val_examples, lm, shuffle_videos=True) - own,
                "spread": soft_prompt_spread(model, features, val_rows),
            }
        row["test"] = evaluate(model, split["test"], features)
        row["seconds"] = round(time.monotonic() - tick)
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| variant | spread after 2 | spread after 3 | video gap after 3 | grounding mIoU "
        "| R1@0.5 | QA acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["variants"].items():
        lines.append(
            f"| {name} | {row['stage2']['spread']:.3f} | {row['stage3']['spread']:.3f} | "
            f"{row['stage3']['video_gap']:.3f} | {row['test']['grounding mIoU']:.1f} | "
            f"{row['test']['grounding R1@0.5']:.1f} | {row['test']['QA acc.']:.1f} |"
        )
    print(f"stage-1 spread {results['stage1']['spread']:.3f}")
    print("\n".join(lines))
    print(f"total {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
