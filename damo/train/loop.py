"""The Ray Train `train_loop_per_worker` for one stage, and its checkpoints.

A Ray checkpoint directory holds
  model/           a DaMO checkpoint (damo.model.checkpoint: safetensors + PEFT adapter + JSON)
  train_state.pt   optimiser, scheduler and position, for resuming (tensors and numbers only:
                   read back with `torch.load(weights_only=True)`, never unpickled)
Every rank calls `ray.train.report` the same number of times (it is a barrier): the shards are
split equally, so all ranks see the same number of batches.

The position inside an epoch is kept in global rows (`epoch_rows`, over all workers), so a stage
resumes on more or fewer workers: each of W workers skips `epoch_rows // W` rows of its shard.
Each epoch reads its own seeded, globally shuffled dataset in a fixed order, so on the same
number of workers a resumed epoch trains exactly the rows the checkpoint had not seen (rows
trained after the last checkpoint are trained again, once; none is skipped). On another number
of workers the shards are cut differently and that exactness holds only for the row count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from damo.config import DamoConfig
from damo.config.model import HeadsConfig
from damo.data.synthetic import place_negative, shape_negative
from damo.data.training import StageCollator, video_tensors
from damo.eval.metrics import grounding_metrics
from damo.eval.parse import parse_span
from damo.model.checkpoint import load_weights, save_checkpoint
from damo.model.damo import DamoModel
from damo.storage import Storage, join
from damo.storage.s3server import pid_alive
from damo.train.stages import StageSpec, stage_spec

MODEL_DIR = "model"
TRAIN_STATE = "train_state.pt"
RANDOM_STATE = "random_state_rank{rank}.pt"  # one per rank: Ray merges the ranks' files
ANCHOR_DATASET = "anchor"  # stage 1's captions, for an anchored LM stage
GROUNDING_ANSWER_TOKENS = 24  # as `damo eval run`'s default --max-new-tokens


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier per optimiser step: linear warm-up, then cosine down to min_lr_ratio."""
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def optimizer_steps(rows: int, workers: int, spec: StageSpec) -> tuple[int, int]:
    """(batches per epoch per worker, optimiser steps in the whole stage)."""
    batches = math.ceil((rows // workers) / spec.batch_size)
    per_epoch = math.ceil(batches / spec.grad_accum)
    total = per_epoch * spec.epochs
    return batches, min(total, spec.max_steps) if spec.max_steps else total


def save_train_checkpoint(
    model, optimizer, scheduler, position: dict, directory: Path, stage: int, rank: int
) -> None:
    """Rank 0 writes the model and the optimiser; every rank writes its random state, so that
    a resumed stage draws the same random numbers (audio dropped at random, dropout) as one
    never stopped, and ends with the same weights."""
    if rank == 0:
        save_checkpoint(model, directory / MODEL_DIR, stage=stage, extra=position)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **position},
            directory / TRAIN_STATE,
        )
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save(
        {"cpu": torch.get_rng_state(), "cuda": cuda},
        directory / RANDOM_STATE.format(rank=rank),
    )


def restore_random_state(directory: Path, rank: int) -> None:
    """This rank's random state from a checkpoint. A checkpoint without one (a rank added by a
    resize, or a checkpoint from before the state was kept) keeps the seeded stream."""
    path = directory / RANDOM_STATE.format(rank=rank)
    if not path.exists():
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def skip_rows(batches: Iterator[dict], rows: int) -> Iterator[dict]:
    """numpy batches without their first `rows` rows (the first one kept may be partial)."""
    for batch in batches:
        size = len(next(iter(batch.values())))
        if rows >= size:
            rows -= size
            continue
        if rows:
            batch = {key: value[rows:] for key, value in batch.items()}
            rows = 0
        yield batch


def anchor_batches(shard, batch_size: int, seed: int, position: dict) -> Iterator[dict]:
    """Caption batches for an anchored LM stage: pass after pass over this rank's shard, each
    pass in its own seeded order, full batches only (VTC and VTM learn from the others in the
    batch). `position` counts the passes and the rows taken from the current one, so a stage
    resumed from a checkpoint carries on with the batch it would have drawn next."""
    while True:
        skip, drawn = position["anchor_rows"], 0
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=8 * batch_size,
            local_shuffle_seed=seed + position["anchor_pass"],
        )
        for rows in skip_rows(batches, skip):
            position["anchor_rows"] += len(rows["record_id"])
            drawn += 1
            yield rows
        if not drawn and not skip:
            raise RuntimeError(f"the anchor's shard holds less than one batch of {batch_size}")
        position["anchor_pass"] += 1
        position["anchor_rows"] = 0


class RecordIdLog:
    """Debug (`train.record_ids`): the record ids one rank trains, per batch, with the step
    they count towards; written at every checkpoint, so a killed worker leaves what the
    checkpoint saw."""

    def __init__(self, storage: Storage, run_uri: str, stage: int, rank: int, attempt: int):
        self.storage = storage
        name = f"rank{rank}-attempt{attempt}.jsonl"
        self.uri = join(run_uri, "record_ids", f"stage{stage}", name)
        self.lines: list[str] = []

    def add(self, epoch: int, step: int, record_ids) -> None:
        row = {"epoch": epoch, "step": step, "ids": [str(r) for r in record_ids]}
        self.lines.append(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.storage.write_bytes(self.uri, "".join(self.lines).encode())


class StageLogger:
    """Rank 0's record of a stage: metrics JSONL and TensorBoard events in the run directory."""

    def __init__(self, storage: Storage, run_uri: str, stage: int, enabled: bool):
        self.enabled = enabled
        self.storage = storage
        self.metrics_uri = join(run_uri, "metrics", f"stage{stage}.jsonl")
        self.tensorboard_uri = join(run_uri, "tensorboard", f"stage{stage}")
        self.rows: list[dict] = []
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if storage.exists(self.metrics_uri):  # a resumed stage continues its history
                text = storage.read_bytes(self.metrics_uri).decode()
                self.rows = [json.loads(line) for line in text.splitlines() if line]
            self.local_tb = tempfile.mkdtemp(prefix=staging_prefix(TENSORBOARD_STAGING))
            self.writer = SummaryWriter(self.local_tb)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        for key, value in row.items():
            if isinstance(value, float):
                self.writer.add_scalar(key, value, row["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        self.writer.flush()
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        self.storage.write_bytes(self.metrics_uri, text.encode())
        self.storage.put_dir(self.local_tb, self.tensorboard_uri)

    def close(self) -> None:
        """Every event is in the run directory by now; the node keeps no copy."""
        if not self.enabled:
            return
        self.writer.close()
        shutil.rmtree(self.local_tb, ignore_errors=True)


# A worker stages checkpoints and TensorBoard files in its node's temp dir, in directories named
# after its PID, and removes them when done. A worker killed in the middle leaves them behind, so
# each new worker removes those whose process is gone.
CHECKPOINT_STAGING = "damo-ckpt-"
TENSORBOARD_STAGING = "damo-tb-"


def staging_prefix(kind: str) -> str:
    return f"{kind}{os.getpid()}-"


def remove_orphaned_staging_dirs(root: str | None = None) -> list[Path]:
    """Remove the staging dirs of dead workers under `root` (the temp dir); returns them."""
    removed = []
    for kind in (CHECKPOINT_STAGING, TENSORBOARD_STAGING):
        for path in Path(root or tempfile.gettempdir()).glob(f"{kind}*"):
            pid = path.name.removeprefix(kind).split("-", 1)[0]
            if path.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def rank_share(dataset, batch_size: int, rank: int, world: int) -> Iterator[dict]:
    """This rank's share of a split that every rank reads whole: batch i goes to rank
    i % world. The order is fixed (the ingest options preserve it), so the ranks' shares cover
    every row once, with none dropped to even them out, and a split smaller than the workers
    still counts every row."""
    batches = dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
    for index, rows in enumerate(batches):
        if index % world == rank:
            yield rows


def caption_negatives_for(heads: HeadsConfig, anchor: bool) -> Callable[[str], str | None] | None:
    """caption -> its hard negative, for a stage's own batches or for its anchor's batches, as
    `model.heads.place_negatives` and `shape_negatives` ask (true: both; "anchor": the
    anchor's alone). With both, a caption's checksum picks which one it gets (the other when
    that one has none), so each attribute is needed on about half the captions."""
    wanted = [
        negative
        for setting, negative in (
            (heads.place_negatives, place_negative),
            (heads.shape_negatives, shape_negative),
        )
        if setting is True or (anchor and setting == "anchor")
    ]
    if len(wanted) < 2:
        return wanted[0] if wanted else None

    def place_or_shape(caption: str) -> str | None:
        first = zlib.crc32(caption.encode()) % 2
        return wanted[first](caption) or wanted[1 - first](caption)

    return place_or_shape


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    remove_orphaned_staging_dirs()
    cfg = DamoConfig.model_validate(config["cfg"])
    stage = int(config["stage"])
    spec = stage_spec(cfg, stage)
    storage = Storage(cfg.storage.s3)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    # where each rank runs, for operators (and the multi-node test): one small JSON per rank
    storage.write_bytes(
        join(config["run_uri"], "workers", f"stage{stage}", f"rank{rank}.json"),
        json.dumps(
            {
                "rank": rank,
                "world_size": world,
                "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(device),
            }
        ).encode(),
    )

    # the alignment objective never calls the LLM: it is not even loaded
    model = DamoModel.from_config(
        cfg.model, resolve=storage.fetch_dir, with_llm=spec.objective != "alignment"
    )
    if config.get("init_checkpoint"):
        load_weights(model, storage.fetch_dir(config["init_checkpoint"]) / MODEL_DIR)
    params = model.set_stage(stage, anchored=spec.anchored)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameter_groups(
            stage, spec.optimizer.lr, spec.optimizer.lr_scale, anchored=spec.anchored
        ),
        lr=spec.optimizer.lr,
        weight_decay=spec.optimizer.weight_decay,
        betas=spec.optimizer.betas,
    )
    total_steps = int(config["total_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(total_steps, spec.schedule.warmup_ratio, spec.schedule.min_lr_ratio),
    )
    position = {"epoch": 0, "step": 0, "epoch_rows": 0, "restarts": 0, "workers": world}
    if spec.anchored:
        position.update(anchor_pass=0, anchor_rows=0)
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as directory:
            load_weights(model, Path(directory) / MODEL_DIR)
            state = torch.load(Path(directory) / TRAIN_STATE, weights_only=True)
            restore_random_state(Path(directory), rank)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position = {k: int(state.get(k, 0)) for k in position}
        position["restarts"] += 1
        position["workers"] = world

    ddp = ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    collate = StageCollator(
        spec.objective,
        model.conversation_inputs,
        model.tokenize_text,
        caption_negatives_for(cfg.model.heads, anchor=False),
    )
    anchor = None
    if spec.anchored:
        anchor_collate = StageCollator(
            "alignment",
            tokenize_text=model.tokenize_text,
            negative_caption=caption_negatives_for(cfg.model.heads, anchor=True),
        )
        anchor = anchor_batches(
            ray.train.get_dataset_shard(ANCHOR_DATASET),
            config["anchor_batch_size"],  # the config's, or fewer on a small split
            cfg.seed,
            position,
        )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    epoch_datasets = list(config["train_datasets"])
    val_shard = ray.train.get_dataset_shard("val")
    grounding_shard = ray.train.get_dataset_shard("val_grounding") if spec.val_grounding else None
    batches_per_epoch = int(config["batches_per_epoch"])
    logger = StageLogger(storage, config["run_uri"], stage, enabled=rank == 0)
    ids_log = None
    if cfg.train.record_ids:
        ids_log = RecordIdLog(storage, config["run_uri"], stage, rank, position["restarts"])
    label = f"[stage {stage} {spec.name}]"

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    def validate() -> float:
        """Mean loss per answer token (LM) or per example (alignment) over the whole split.

        Weighting makes it independent of how rows fall into batches and onto workers; a mean
        of batch means lets a last batch of 2 count as much as a full one. Each rank computes
        its share of the batches with the plain model (no collective op per batch, so ranks
        with more batches than others do not stall), and the sums are all-reduced.
        """
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for rows in rank_share(val_shard, spec.batch_size, rank, world):
                batch = to_device(collate(rows))
                if spec.objective == "lm":  # the loss averages over the shifted answer tokens
                    weight = (batch["labels"][:, 1:] != -100).sum()
                else:
                    weight = torch.tensor(batch["visual"].shape[0], device=device)
                total += model(batch, stage)["loss"].float() * weight
                count += weight
        if world > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        model.train()
        return float(total / count.clamp(min=1))

    def validate_grounding() -> float:
        """mIoU (%) of greedy answers to the validation split's grounding records, scored as
        `damo eval run` scores them. Each rank answers its share of the batches (generating
        needs no collective op); the IoU sums and counts are all-reduced."""
        from damo.model.video import VideoFeatures

        model.eval()
        predicted, truth = [], []
        with torch.no_grad(), autocast:
            for rows in rank_share(grounding_shard, spec.batch_size, rank, world):
                video = VideoFeatures.from_batch(video_tensors(rows))
                prompts = [json.loads(str(c))[0]["content"] for c in rows["conversation"]]
                answers = model.generate(video, prompts, GROUNDING_ANSWER_TOKENS)
                durations = [float(d) for d in rows["duration"]]
                predicted += [parse_span(a, d) for a, d in zip(answers, durations, strict=True)]
                truth += [tuple(json.loads(str(s))[0]) for s in rows["spans"]]
        model.train()
        count = torch.tensor(float(len(truth)), device=device)
        # the mean IoU times the count: a sum that adds up over ranks
        miou_sum = count * (grounding_metrics(predicted, truth)["mIoU"] if truth else 0.0)
        if world > 1:
            torch.distributed.all_reduce(miou_sum)
            torch.distributed.all_reduce(count)
        return float(miou_sum / count.clamp(min=1))

    def report(metrics: dict, with_checkpoint: bool) -> None:
        metrics = {"stage": stage, **position, **metrics}
        logger.log(metrics)
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        logger.flush()
        if ids_log is not None:
            ids_log.flush()
        with tempfile.TemporaryDirectory(prefix=staging_prefix(CHECKPOINT_STAGING)) as directory:
            save_train_checkpoint(
                model, optimizer, scheduler, position, Path(directory), stage, rank
            )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    if resumed is None:
        report({"val_loss": validate(), "lr": scheduler.get_last_lr()[0]}, with_checkpoint=False)
    model.train()
    running, seen, window_start = 0.0, 0, time.monotonic()
    anchor_running, anchor_seen = 0.0, 0
    done = spec.max_steps is not None and position["step"] >= total_steps
    while position["epoch"] < spec.epochs and not done:
        shard = ray.train.get_dataset_shard(epoch_datasets[position["epoch"]])
        # resumed mid-epoch: the rows trained before the checkpoint, this worker's share
        skip = position["epoch_rows"] // world
        batches = skip_rows(
            shard.iter_batches(
                batch_size=spec.batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                local_shuffle_seed=cfg.seed + position["epoch"]
                if cfg.train.shuffle_buffer
                else None,
            ),
            skip,
        )
        first = skip // spec.batch_size  # the index (in this epoch) of the next batch
        for index, rows in enumerate(batches, start=first):
            batch = collate(rows)
            # the anchor rides on the first micro-batch of every `anchor.every`-th step
            anchored = (
                anchor is not None
                and index % spec.grad_accum == 0
                and position["step"] % spec.anchor.every == 0
            )
            captions = to_device(anchor_collate(next(anchor))) if anchored else None
            with autocast:
                losses = ddp(to_device(batch), stage, captions, spec.anchor.losses)
            objective = losses["loss"] / spec.grad_accum
            if anchored:
                objective = objective + spec.anchor.weight * losses["anchor"]
                anchor_running += float(losses["anchor"].detach())
                anchor_seen += 1
            objective.backward()
            running += float(losses["loss"].detach())
            seen += 1
            position["epoch_rows"] += len(rows["record_id"]) * world  # equal shards
            if ids_log is not None:
                ids_log.add(position["epoch"], position["step"] + 1, rows["record_id"])
            if (index + 1) % spec.grad_accum and index + 1 < batches_per_epoch:
                continue
            if spec.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, spec.optimizer.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
            step = position["step"]
            # only a step budget ends a stage mid-epoch: after a resume on another number of
            # workers the step count of the epochs differs from `total_steps`
            done = spec.max_steps is not None and step >= total_steps
            last = done or index + 1 >= batches_per_epoch  # the epoch's end reports instead
            if step % spec.log_every == 0 and not last:
                rate = seen * spec.batch_size * world / (time.monotonic() - window_start)
                metrics = {
                    "train_loss": running / seen,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": rate,
                }
                if anchor_seen:
                    metrics["train_anchor_loss"] = anchor_running / anchor_seen
                if rank == 0:
                    anchor_note = (
                        f" anchor {metrics['train_anchor_loss']:.4f}" if anchor_seen else ""
                    )
                    print(
                        f"{label} epoch {position['epoch'] + 1}/{spec.epochs} step "
                        f"{step}/{total_steps} loss {metrics['train_loss']:.4f}{anchor_note} "
                        f"lr {metrics['lr']:.2e} {rate:.1f} samples/s",
                        flush=True,
                    )
                checkpoint_now = bool(spec.checkpoint_every) and step % spec.checkpoint_every == 0
                report(metrics, with_checkpoint=checkpoint_now)
                running, seen, window_start = 0.0, 0, time.monotonic()
                anchor_running, anchor_seen = 0.0, 0
            elif spec.checkpoint_every and step % spec.checkpoint_every == 0 and not last:
                report({"lr": scheduler.get_last_lr()[0]}, with_checkpoint=True)
            if done:
                break
        # the epoch is over, or the step budget ran out and the stage with it
        position["epoch"] += 1
        position["epoch_rows"] = 0
        metrics = {"val_loss": validate(), "lr": scheduler.get_last_lr()[0]}
        if spec.val_grounding:
            metrics["val_grounding_miou"] = validate_grounding()
        if rank == 0:
            miou = metrics.get("val_grounding_miou")
            print(
                f"{label} epoch {position['epoch']}/{spec.epochs} step {position['step']}/"
                f"{total_steps} val_loss {metrics['val_loss']:.4f}"
                + (f" val_grounding_miou {miou:.2f}" if miou is not None else ""),
                flush=True,
            )
        if seen:
            metrics["train_loss"] = running / seen
        if anchor_seen:
            metrics["train_anchor_loss"] = anchor_running / anchor_seen
        report(metrics, with_checkpoint=True)
        running, seen, window_start = 0.0, 0, time.monotonic()
        anchor_running, anchor_seen = 0.0, 0
    logger.close()
