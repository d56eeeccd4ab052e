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

import json
import time

from position_probe import TENSOR_COLUMNS, bar_run, feature_shapes, read_features, run_arguments


def main() -> None:
    args = run_arguments(__doc__.splitlines()[0], "benchmarks/results_place_match.json")

    import torch
    from tqdm import tqdm

    from damo.data.extract import feature_config_hash
    from damo.data.synthetic import _caption, load_world_clips, place_negative, video_uri
    from damo.data.training import video_tensors
    from damo.demo import BUCKET
    from damo.eval.batch import load_model
    from damo.model.damo import DamoModel
    from damo.model.video import VideoFeatures
    from damo.storage import join
    from damo.version import code_version

    torch.set_num_threads(1)
    started = time.monotonic()
    with bar_run(args.cache, args.run) as (storage, manifest, finished, cfg):
        shapes = feature_shapes(cfg)
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
