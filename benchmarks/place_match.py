"""Does a run's pathway know where each shape is? A caption against its place negative.

For every clip with a shape, in the training world and the held-out world, the caption that says
where each shape is ("a red square appears in the top left from ...") is scored against its
place negative (`damo.data.synthetic.place_negative`: the same caption with two shapes' places
swapped, or a lone shape moved to another quadrant). Nothing but the place tells them apart, so
a pathway that dropped the place prefers the true caption half the time (chance 50).
- VTC: the true caption is nearer the video in the contrastive space;
- VTM: the matching head gives the true caption the higher "match" probability.
Each finished stage of a learning-bar run is scored, and an untrained pathway. The captions are
built from the worlds' clip lists, so a run trained on captions without places is scored too.

It reads the learning bar's cache (`benchmarks/learning_bar.py` must have run) through its S3
server, which it shares if a bar run is using it.

    .venv/bin/python benchmarks/place_match.py --run bar-f30d4915-seed0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from position_probe import TENSOR_COLUMNS, read_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a learning-bar run id (its checkpoints)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench")) / "learning-bar",
    )
    parser.add_argument("--test-world", default="heldout-1-200", help="the held-out world's name")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_place_match.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from tqdm import tqdm

    from damo.config import DamoConfig, load_config
    from damo.data.extract import feature_config_hash
    from damo.data.synthetic import _caption, load_world_clips, place_negative, video_uri
    from damo.data.training import video_tensors
    from damo.demo import BUCKET
    from damo.eval.batch import load_model
    from damo.model.backbones import vision_geometry
    from damo.model.damo import DamoModel
    from damo.model.video import VideoFeatures
    from damo.storage import Storage, join
    from damo.storage.s3server import EmbeddedS3Server
    from damo.train.pipeline import read_manifest
    from damo.version import code_version

    torch.set_num_threads(1)
    started = time.monotonic()
    server = EmbeddedS3Server(
        load_config("tiny").storage.embedded, data_dir=str(args.cache / "storage")
    )
    with server.shared() as state:
        storage = Storage(state.s3_config())
        manifest = read_manifest(storage, join(BUCKET, "runs", args.run))
        finished = sorted(
            s for s, e in (manifest or {}).get("stages", {}).items() if "checkpoint" in e
        )
        if not finished:
            raise SystemExit(
                f"{args.run}: no run of that name with a finished stage in {args.cache}"
            )
        cfg = DamoConfig.model_validate(manifest["config"])
        visual_dim, _ = vision_geometry(cfg.model.vision)
        shapes = {
            "visual_features": (cfg.model.frames, -1, visual_dim),
            "audio_features": (cfg.model.audio_segments, -1, cfg.model.audio.arch["d_model"]),
            "frame_times": (cfg.model.frames,),
            "segment_bounds": (cfg.model.audio_segments, 2),
        }
        worlds = {
            "train": (join(BUCKET, "world"), join(BUCKET, "features")),
            "test": (join(BUCKET, args.test_world), join(BUCKET, "features-" + args.test_world)),
        }
        data = {}
        for split, (world, features) in worlds.items():
            if not storage.exists(join(world, "clips.jsonl")):  # a bar run makes it after training
                print(f"{split}: no world at {world} yet, skipped", flush=True)
                continue
            specs = {
                video_uri(world, spec.clip_id): spec
                for spec in load_world_clips(world, storage)
                if (split == "test" or spec.split == "train")  # the held-out world: every clip
                and any(event.visible for event in spec.events)
            }
            rows = read_features(storage, features, feature_config_hash(cfg), set(specs), shapes)
            videos = sorted(set(specs) & set(rows))
            captions = [_caption(specs[v], places=True) for v in videos]
            data[split] = {
                "rows": [rows[v] for v in videos],
                "captions": captions,
                "negatives": [place_negative(c) for c in captions],
                "shapes": [sum(e.visible for e in specs[v].events) for v in videos],
            }
            print(f"{split}: {len(videos)} clips with a shape", flush=True)

        models = {"untrained pathway": None}
        models.update({f"after stage {s}": manifest["stages"][s]["checkpoint"] for s in finished})
        results: dict[str, dict] = {}
        for when, checkpoint in models.items():
            if checkpoint is None:
                torch.manual_seed(cfg.seed)
                model = DamoModel.from_config(
                    cfg.model, resolve=storage.fetch_dir, with_llm=False
                ).eval()
            else:
                model = load_model(checkpoint, storage, with_llm=False)
            results[when] = {}
            for split, d in data.items():
                vtc, vtm = [], []
                for begin in tqdm(range(0, len(d["rows"]), 32), desc=f"{when}, {split}"):
                    chunk = d["rows"][begin : begin + 32]
                    batch = {k: [r[k] for r in chunk] for k in (*TENSOR_COLUMNS, "has_audio")}
                    video = VideoFeatures.from_batch(video_tensors(batch))
                    with torch.no_grad():
                        query = model.pathway.query_states(video)  # (B, K, D)
                        video_emb = model.heads.vtc.embed_video(query)  # (B, E)
                        scores = {}
                        for kind in ("captions", "negatives"):
                            inputs = model.tokenize_text(d[kind][begin : begin + 32])
                            ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
                            text = model.text_states(ids, mask)  # (B, S, Dt)
                            text_emb = model.heads.vtc.embed_text(text, mask)  # (B, E)
                            match = model.heads.vtm.logits(query, text, mask).softmax(-1)[:, 1]
                            scores[kind] = ((video_emb * text_emb).sum(-1), match)  # (B,) each
                    vtc.append(scores["captions"][0] > scores["negatives"][0])
                    vtm.append(scores["captions"][1] > scores["negatives"][1])
                vtc_right, vtm_right = torch.cat(vtc), torch.cat(vtm)
                lone = torch.tensor([n == 1 for n in d["shapes"]])

                def percent(right: torch.Tensor, where: torch.Tensor | None = None) -> float:
                    right = right if where is None else right[where]
                    return round(float(right.float().mean()) * 100, 1)

                results[when][split] = {
                    "clips": len(d["rows"]),
                    "vtc": percent(vtc_right),
                    "vtm": percent(vtm_right),
                    "vtc, one shape moved": percent(vtc_right, lone),
                    "vtc, two shapes swapped": percent(vtc_right, ~lone),
                    "vtm, one shape moved": percent(vtm_right, lone),
                    "vtm, two shapes swapped": percent(vtm_right, ~lone),
                }
            print(f"{when}: {results[when]}", flush=True)
        summary = {
            "run": args.run,
            "code_version": code_version(),
            "true caption preferred to its place negative (%; chance 50)": results,
            "total_s": round(time.monotonic() - started, 1),
        }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
