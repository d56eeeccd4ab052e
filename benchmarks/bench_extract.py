"""Feature extraction throughput: streaming Ray Data on 2 CPUs vs a plain single-process loop.

Both run the same code on the same clips: `damo.data.extract.decode_videos` then
`EncodeFeatures`, in batches of 4. The loop calls them directly in one process (decoding in
process, torch using every core for intra-op threads). Ray Data runs `extract_features`:
decode tasks (in a child process each) stream into an actor pool sized from the cluster
(`--actors` to override), which streams into the Parquet shards, so decoding overlaps with
encoding. Model loading is outside the timed region for the loop and inside it for Ray (each
actor loads its own copy), which favours the loop. `--rounds` alternates the two, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

CACHE = Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench"))


# Random-weight encoders of real sizes: compute per clip as with pretrained ones.
BASE = [
    "model.vision.arch={hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 12, "
    "num_attention_heads: 12, image_size: 224, patch_size: 16, projection_dim: 512}",
    "model.audio.arch={d_model: 512, encoder_layers: 6, encoder_attention_heads: 8, "
    "encoder_ffn_dim: 2048, decoder_layers: 1, decoder_attention_heads: 8, decoder_ffn_dim: 512, "
    "num_mel_bins: 80, max_source_positions: 1500, vocab_size: 64, pad_token_id: 0, "
    "bos_token_id: 1, eos_token_id: 2, decoder_start_token_id: 1}",
    "model.audio.segment_seconds=2.0",
    "model.frames=24",
    "model.audio_segments=8",
    "data.decode.num_frames=24",
    "data.decode.num_segments=8",
    "data.decode.image_size=224",
]
# For serving: a random-weight LLM of a small real size (12 layers, 768 wide; ~85M parameters,
# weights 340 MB in float32), so that generation, not the tiny model's ~1 ms per token, is
# what a request costs, as it is with any real LLM. The paper's LLM is ~80x larger.
BASE_LLM = [
    "model.llm.arch={hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 12, "
    "num_attention_heads: 12, num_key_value_heads: 12, vocab_size: 512, "
    "max_position_embeddings: 512, tie_word_embeddings: true}",
]
SIZES = {"tiny": [], "base": BASE, "base-llm": BASE + BASE_LLM}


def tiny_config(backbones: Path, extra: list[str]):
    from damo.config import load_config

    cfg = load_config("tiny", list(extra))
    return cfg.model_copy(update={"model": cfg.model.with_backbones_at(str(backbones))})


def prepare(clips: int, size: str = "tiny") -> tuple[Path, list[str]]:
    from damo.config.data import SyntheticConfig
    from damo.data.backbones import build_tiny_backbones
    from damo.data.synthetic import generate_world
    from damo.storage import Storage

    backbones = CACHE / f"{size}-backbones"
    if not (backbones / "llm" / "config.json").exists():
        from damo.config import load_config

        # the base-size LLM stays at random weights: pre-training it here would take ~20 s a
        # step on one core, and what the serving bench measures is its cost, not its answers
        steps = 0 if size == "base-llm" else 50
        build_tiny_backbones(backbones, load_config("tiny", SIZES[size]).model, steps=steps)
    world = CACHE / f"world-{clips}"
    settings = SyntheticConfig(num_clips=clips, seed=11, min_duration_s=6.0, max_duration_s=20.0)
    generate_world(str(world), Storage(), settings, progress=False)
    uris = sorted(str(p) for p in (world / "videos").glob("*.mp4"))
    return backbones, uris


def bench_loop(cfg, uris: list[str], batch_size: int) -> float:
    import numpy as np
    import torch

    from damo.data.extract import EncodeFeatures, decode_videos, feature_config_hash

    torch.set_num_threads(os.cpu_count() or 1)
    extract = cfg.data.extract.model_copy(update={"isolate_decoder": False})  # a plain loop
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"extract": extract})})
    encode = EncodeFeatures(cfg, feature_config_hash(cfg), cfg.storage.s3)
    start = time.perf_counter()
    for i in range(0, len(uris), batch_size):
        chunk = uris[i : i + batch_size]
        batch = {"key": np.array(chunk), "video_uri": np.array(chunk)}
        out = encode(decode_videos(batch, cfg))
        assert (out["error_reason"] == "").all()
    return time.perf_counter() - start


def bench_ray(cfg, uris: list[str], batch_size: int, actors: int | None) -> float:
    from damo.data.extract import extract_features

    out = CACHE / "extract-out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = extract_features(uris, str(out), cfg, batch_size=batch_size, num_actors=actors)
    elapsed = time.perf_counter() - start
    assert summary.ok == len(uris), summary
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, default=None, help="default: sized by extract")
    parser.add_argument("--rounds", type=int, default=1, help="loop/Ray pairs, alternating")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--skip-loop", action="store_true", help="time Ray Data only")
    parser.add_argument("--out", default=None, help="default: benchmarks/results_extract_SIZE")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    backbones, uris = prepare(args.clips, args.size)
    cfg = tiny_config(
        backbones, ["ray.num_cpus=2", "ray.object_store_memory_mb=512", *SIZES[args.size]]
    )
    from damo.data.extract import connect_ray

    connect_ray(cfg)  # cluster start-up is not timed
    rounds = []
    for _ in range(args.rounds):
        loop_s = None if args.skip_loop else bench_loop(cfg, uris, args.batch_size)
        ray_s = bench_ray(cfg, uris, args.batch_size, args.actors)
        rounds.append(
            {"loop_s": loop_s, "ray_s": ray_s, "loop_over_ray": loop_s and loop_s / ray_s}
        )
        print(json.dumps(rounds[-1]), flush=True)
    loop_best = None if args.skip_loop else min(r["loop_s"] for r in rounds)
    ray_best = min(r["ray_s"] for r in rounds)
    results = {
        "size": args.size,
        "clips": len(uris),
        "batch_size": args.batch_size,
        "actors": args.actors or "sized",
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "loop_s": loop_best,
        "ray_s": ray_best,
        "loop_clips_per_s": len(uris) / loop_best if loop_best else None,
        "ray_clips_per_s": len(uris) / ray_best,
        "speedup": loop_best / ray_best if loop_best else None,
    }
    out = args.out or f"benchmarks/results_extract_{args.size}.json"
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
