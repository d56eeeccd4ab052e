"""Batch evaluation with Ray Data: a checkpoint answers every record of a split.

    feature shards + records --> actor pool (model.generate, greedy) --> predictions
        --> metrics (grounding, QA, retrieval; beside chance baselines) --> report

Outputs under `out_uri`: predictions.jsonl (and a QVHighlights submission when the records
come from QVHighlights), metrics.json, report.md, plots/*.png.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from damo.config import DamoConfig
from damo.config.schema import S3Config
from damo.data.extract import feature_config_hash
from damo.data.records import read_records, write_qvhighlights_submission
from damo.data.training import (
    feature_dataset,
    read_feature_table,
    select_feature_rows,
    table_to_numpy,
    training_dataset,
    video_tensors,
)
from damo.eval.metrics import (
    grounding_metrics,
    qa_accuracy,
    retrieval_metrics,
    timed_answer_metrics,
)
from damo.eval.parse import parse_span, split_timed_answer
from damo.storage import Storage, join
from damo.version import code_version

TASKS = ("grounding", "qa", "temporal_qa")
AudioAblation = Literal["as_is", "swap", "mask", "zero"]
AUDIO_COLUMNS = ("audio_features", "has_audio")
MODEL_DIR = "model"  # inside a training checkpoint (damo.train.loop)


@dataclass
class EvalSettings:
    max_new_tokens: int = 24
    batch_size: int = 8
    actors: int = 1
    gpus_per_actor: float = 0.0  # per answering/embedding actor; CUDA only when > 0
    # ablation of the audio stream at inference: "as_is"; "swap": each video hears the audio
    # of the split's video nearest in duration; "mask": no audio (the mask says so, as for a
    # silent video); "zero": zero features while the mask says "present" (out of distribution)
    audio: AudioAblation = "as_is"
    plots: int = 6
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    notes: dict = field(default_factory=dict)


def load_model(checkpoint_uri: str, storage: Storage, with_llm: bool = True):
    from damo.model.checkpoint import load_checkpoint

    local = storage.fetch_dir(checkpoint_uri)
    directory = local / MODEL_DIR if (local / MODEL_DIR).is_dir() else local
    return load_checkpoint(directory, resolve=storage.fetch_dir, with_llm=with_llm).eval()


def actor_device() -> str:
    """CUDA only when Ray gave this actor a GPU: Ray 2.60 no longer hides the GPUs from
    actors that asked for none, so `torch.cuda.is_available()` alone would crowd them."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class AnswerQuestions:
    """map_batches UDF (actor pool): one model per actor, greedy answers for a batch."""

    def __init__(
        self, checkpoint_uri: str, s3: S3Config, settings: EvalSettings, donors: dict | None = None
    ):
        self.device = actor_device()
        self.model = load_model(checkpoint_uri, Storage(s3)).to(self.device)
        self.settings = settings
        self.donors = donors or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from damo.model.video import VideoFeatures

        video = VideoFeatures.from_batch(
            video_tensors(ablate_audio(batch, self.settings.audio, self.donors))
        )
        prompts = [json.loads(str(c))[0]["content"] for c in batch["conversation"]]
        answers = self.model.generate(video, prompts, max_new_tokens=self.settings.max_new_tokens)
        keep = ("record_id", "video_uri", "task", "query", "answer", "spans", "extra", "duration")
        out = {k: batch[k] for k in keep}
        out["prediction"] = np.array(answers, dtype=object)
        return out


def predict(
    cfg: DamoConfig,
    checkpoint_uri: str,
    features_uri: str,
    records_uri: str,
    settings: EvalSettings,
    storage: Storage,
) -> tuple[list[dict], object]:
    import ray

    dataset, report = training_dataset(
        features_uri, records_uri, settings.tasks, storage, feature_config_hash(cfg)
    )
    if not report.matched:
        raise ValueError(f"no records of {records_uri} for {settings.tasks} have features")
    donors = None
    if settings.audio == "swap":
        donors = swapped_audio(features_uri, records_uri, storage, feature_config_hash(cfg))
    answered = dataset.map_batches(
        AnswerQuestions,
        fn_constructor_args=(checkpoint_uri, cfg.storage.s3, settings, donors),
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=settings.actors),
        num_cpus=1,
        num_gpus=settings.gpus_per_actor,
    )
    rows = sorted(answered.take_all(), key=lambda r: r["record_id"])
    return rows, report


# ---- the audio ablation --------------------------------------------------------------------
def audio_donors(uris: list[str], durations: list[float]) -> dict[str, str]:
    """video -> the video whose audio it hears when swapped: its neighbour in duration order
    (a cycle, so every video gives and takes one track and none keeps its own). A donor of
    about the same length puts sounds at about the same places in the clip."""
    if len(set(uris)) < 2:
        raise ValueError("swapping audio needs at least two videos")
    order = sorted(set(zip(uris, durations, strict=True)), key=lambda u: (u[1], u[0]))
    return {uri: order[(i + 1) % len(order)][0] for i, (uri, _) in enumerate(order)}


def swapped_audio(
    features_uri: str, records_uri: str, storage: Storage, feature_hash: str
) -> dict[str, dict]:
    """video -> its donor's audio feature columns, for the split's videos."""
    wanted = set(read_records(records_uri, storage).column("video_uri").to_pylist())
    columns = table_to_numpy(read_feature_table(features_uri, storage, feature_hash, wanted))
    uris = [str(u) for u in columns["video_uri"]]
    row = {uri: i for i, uri in enumerate(uris)}
    donors = audio_donors(uris, [float(d) for d in columns["duration"]])
    return {
        uri: {k: columns[k][row[donor]] for k in AUDIO_COLUMNS} | {"donor": donor}
        for uri, donor in donors.items()
    }


def ablate_audio(batch: dict[str, np.ndarray], mode: str, donors: dict) -> dict[str, np.ndarray]:
    """A copy of a feature batch with its audio ablated (`EvalSettings.audio`)."""
    if mode == "as_is":
        return batch
    batch = dict(batch)
    if mode == "swap":
        for key in AUDIO_COLUMNS:
            batch[key] = np.stack([donors[str(uri)][key] for uri in batch["video_uri"]])
    elif mode == "mask":
        batch["has_audio"] = np.zeros(len(batch["has_audio"]), dtype=bool)
    elif mode == "zero":
        batch["audio_features"] = np.zeros_like(np.stack(list(batch["audio_features"])))
    else:
        raise ValueError(f"unknown audio ablation {mode!r}")
    return batch


# ---- scoring -------------------------------------------------------------------------------
def score_rows(rows: list[dict], seed: int = 0) -> tuple[dict, list[dict]]:
    """Metrics per task, each beside its chance baselines; rows gain parsed spans and IoU."""
    from damo.eval.metrics import normalize_answer, temporal_iou_paired

    metrics: dict = {}
    rng = np.random.default_rng(seed)
    grounding = [r for r in rows if r["task"] == "grounding"]
    if grounding:
        gt = [tuple(json.loads(r["spans"])[0]) for r in grounding]
        pred = [parse_span(r["prediction"], r["duration"]) for r in grounding]
        for row, span, truth in zip(grounding, pred, gt, strict=True):
            row["pred_span"] = list(span) if span is not None else None
            iou = 0.0 if span is None else temporal_iou_paired([span], [truth])[0]
            row["iou"] = float(iou)
        durations = [r["duration"] for r in grounding]
        starts = rng.uniform(0, 1, len(grounding)) * np.array(durations)
        ends = starts + rng.uniform(0, 1, len(grounding)) * (np.array(durations) - starts)
        predictions = {
            "model": pred,
            "baseline_whole_clip": [(0.0, d) for d in durations],
            "baseline_random_span": list(zip(starts, ends, strict=True)),
        }
        metrics["grounding"] = {
            name: grounding_metrics(spans, gt) for name, spans in predictions.items()
        }
        by_modality: dict[str, list[int]] = {}
        for i, row in enumerate(grounding):
            modality = json.loads(row["extra"]).get("modality")
            if modality:
                by_modality.setdefault(modality, []).append(i)
        for modality, index in sorted(by_modality.items()):
            subset = f"{modality}_only" if modality != "both" else "audio_visual"
            for name, spans in predictions.items():
                metrics["grounding"][f"{name}/{subset}"] = grounding_metrics(
                    [spans[i] for i in index], [gt[i] for i in index]
                )
    for task in ("qa", "temporal_qa"):
        subset = [r for r in rows if r["task"] == task]
        if not subset:
            continue
        answers = [r["answer"] for r in subset]
        predictions = [r["prediction"] for r in subset]
        majority = Counter(answers).most_common(1)[0][0]
        types = [json.loads(r["extra"]).get("question") or task for r in subset]
        for row in subset:
            row["correct"] = normalize_answer(row["prediction"]) == normalize_answer(row["answer"])
        metrics[task] = {
            "model": qa_accuracy(predictions, answers, types),
            "baseline_majority_answer": qa_accuracy([majority] * len(subset), answers, types),
        }
        if task == "temporal_qa":  # the event part and the span, scored apart
            gt = [tuple(json.loads(r["spans"])[0]) for r in subset]
            durations = [r["duration"] for r in subset]
            event = Counter(split_timed_answer(a)[0] for a in answers).most_common(1)[0][0]
            metrics[task]["model"].update(timed_answer_metrics(predictions, answers, gt, durations))
            metrics[task]["baseline_majority_answer"].update(
                timed_answer_metrics([majority] * len(subset), answers, gt, durations)
            )
            metrics[task]["baseline_majority_event_whole_clip"] = timed_answer_metrics(
                [f"{event} from 0.0 to {d:.1f} seconds" for d in durations],
                answers,
                gt,
                durations,
            )
    return metrics, rows


class EmbedVideos:
    """map_batches UDF (actor pool): stage-1 embeddings of each video and of its caption.

    The model is loaded without its LLM: retrieval needs the video pathway, the VTC head and
    the text encoder only."""

    def __init__(self, checkpoint_uri: str, s3: S3Config, captions: dict[str, str]):
        self.device = actor_device()
        self.model = load_model(checkpoint_uri, Storage(s3), with_llm=False).to(self.device)
        self.captions = captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from damo.model.video import VideoFeatures

        video = VideoFeatures.from_batch(video_tensors(batch)).to(self.device)
        texts = [self.captions[str(uri)] for uri in batch["video_uri"]]
        return {
            "video_uri": batch["video_uri"],
            "video_emb": self.model.embed_video(video).float().cpu().numpy(),  # (B, E)
            "text_emb": self.model.embed_text(texts).float().cpu().numpy(),  # (B, E)
        }


def split_captions(records_uri: str, storage: Storage) -> dict[str, str]:
    """video_uri -> its caption, for the videos of a split's records (the last caption wins)."""
    return {
        r["video_uri"]: r["answer"]
        for r in read_records(records_uri, storage).to_pylist()
        if r["task"] == "caption"
    }


def retrieval(
    checkpoint_uri: str,
    features_uri: str,
    records_uri: str,
    storage: Storage,
    feature_hash: str,
    settings: EvalSettings | None = None,
) -> dict | None:
    """Stage-1 text->video retrieval among the split's videos: each video's caption is a query.

    Only the split's videos (their current feature rows) are read and embedded, in an actor
    pool; the driver only ranks the (N, N) similarities."""
    import ray

    settings = settings or EvalSettings()
    captions = split_captions(records_uri, storage)
    selection = select_feature_rows(features_uri, storage, feature_hash, set(captions))
    if len(selection.chosen) < 2:
        return None
    embedded = feature_dataset(selection, feature_hash).map_batches(
        EmbedVideos,
        fn_constructor_args=(checkpoint_uri, storage.s3, captions),
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=settings.actors),
        num_cpus=1,
        num_gpus=settings.gpus_per_actor,
    )
    rows = sorted(embedded.take_all(), key=lambda r: r["video_uri"])
    video_emb = np.stack([r["video_emb"] for r in rows])  # (N, E)
    text_emb = np.stack([r["text_emb"] for r in rows])  # (N, E)
    similarity = text_emb @ video_emb.T  # (queries, candidates)
    rng = np.random.default_rng(0)
    return {
        "model": retrieval_metrics(similarity),
        "baseline_random": retrieval_metrics(rng.normal(size=similarity.shape)),
    }


# ---- the whole run -------------------------------------------------------------------------
def evaluate_checkpoint(
    cfg: DamoConfig,
    checkpoint_uri: str,
    features_uri: str,
    records_uri: str,
    out_uri: str,
    settings: EvalSettings | None = None,
    storage: Storage | None = None,
) -> dict:
    """Answer, score and report one split; returns the metrics (also in metrics.json)."""
    from damo.eval.report import write_report

    settings = settings or EvalSettings()
    storage = storage or Storage(cfg.storage.s3)
    started = time.monotonic()
    rows, join_report = predict(cfg, checkpoint_uri, features_uri, records_uri, settings, storage)
    metrics, rows = score_rows(rows, settings.seed)
    ranked = retrieval(
        checkpoint_uri, features_uri, records_uri, storage, feature_config_hash(cfg), settings
    )
    if ranked is not None:
        metrics["retrieval"] = ranked
    run = {
        "checkpoint": checkpoint_uri,
        "features": features_uri,
        "records": records_uri,
        "records_without_features": join_report.unmatched,
        "frames": cfg.data.decode.num_frames,
        "audio_segments": cfg.data.decode.num_segments,
        "decoding": {"greedy": True, "max_new_tokens": settings.max_new_tokens},
        "audio": settings.audio,
        "prompt": "the record's question, as the user turn of the LLM's chat template with "
        "<video> where the checkpoint's model.llm.video_placement puts it "
        "(damo.model.llm.PromptBuilder)",
        "parser": "damo.eval.parse.parse_span",
        "code_version": code_version(),
        "seconds": round(time.monotonic() - started, 1),
        **settings.notes,
    }
    result = {"run": run, "metrics": metrics}
    storage.ensure_bucket(out_uri)
    storage.write_bytes(join(out_uri, "metrics.json"), json.dumps(result, indent=2).encode())
    lines = "".join(json.dumps({k: v for k, v in r.items()}, default=str) + "\n" for r in rows)
    storage.write_bytes(join(out_uri, "predictions.jsonl"), lines.encode())
    qvh = [r for r in rows if r["task"] == "grounding" and "qid" in json.loads(r["extra"])]
    if qvh:
        write_qvhighlights_submission(
            [
                {
                    "qid": json.loads(r["extra"])["qid"],
                    "query": r["query"],
                    "vid": r["video_uri"],
                    "pred_relevant_windows": [[*r["pred_span"], 1.0]]
                    if r.get("pred_span")
                    else [[0.0, 0.0, 0.0]],
                }
                for r in qvh
            ],
            join(out_uri, "qvhighlights_submission.jsonl"),
            storage,
        )
    write_report(result, rows, out_uri, storage, settings.plots)
    return result
