"""A DaMO checkpoint answering batches of (video features, question) pairs.

The Serve deployment (damo.serve.app) wraps `Answerer.answer_batch` in `@serve.batch` and a
`GenerationQueue`, so concurrent requests share one `generate` call; benchmarks call it
in-process to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from damo.config import DamoConfig
from damo.data.training import video_tensors
from damo.eval.batch import load_model
from damo.serve.featurizer import VideoFeaturesRow
from damo.serve.lru import LruCache
from damo.storage import Storage


@dataclass
class Question:
    features: VideoFeaturesRow
    prompt: str
    max_new_tokens: int


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    generate_s: float


class SoftPromptCache:
    """The video pathway's output per video (an LRU keyed by the featurizer's content key).

    The soft prompt depends on the video and the checkpoint only, never on the question, so a
    further question about a video skips the pathway, and a batch runs it once per distinct
    video. Entries are (K, H) tensors on the model's device. When the bridge reads the
    question (`model.bridge.read_question`) the entries are the fusion tokens (F, D) instead,
    and only the small bridge runs per question (`DamoModel.per_video_state`)."""

    def __init__(self, capacity: int):
        self._prompts: LruCache[Any] = LruCache(capacity)
        self.computed = 0  # videos that went through the pathway

    def __len__(self) -> int:
        return len(self._prompts)

    def soft_prompts(self, rows: list[VideoFeaturesRow], pathway: Callable[[list], Any]):
        """(B, K, H) for `rows`; `pathway(rows)` computes the missing ones, each video once."""
        import torch

        by_key = {row.key: row for row in rows}
        found = {key: self._prompts.get(key) for key in by_key}
        missing = [key for key, prompt in found.items() if prompt is None]
        if missing:
            found.update(zip(missing, pathway([by_key[key] for key in missing]), strict=True))
        self.computed += len(missing)
        for key in by_key:  # most recently asked about last; the oldest go first
            self._prompts.put(key, found[key])
        return torch.stack([found[row.key] for row in rows])


class Answerer:
    def __init__(self, cfg: DamoConfig, checkpoint_uri: str, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(checkpoint_uri, Storage(cfg.storage.s3)).to(self.device)
        self.tokenizer = self.model.tokenizer
        self.soft_prompt_cache = SoftPromptCache(cfg.serve.soft_prompt_cache_items)

    def pathway(self, rows: list[VideoFeaturesRow]):
        """(M, K, H) soft prompts for M videos' encoder features, or (M, F, D) fusion tokens
        when the bridge reads the question."""
        import torch

        from damo.model.video import VideoFeatures

        batch = {name: np.stack([row.columns[name] for row in rows]) for name in rows[0].columns}
        video = VideoFeatures.from_batch(video_tensors(batch)).to(self.device)
        with torch.no_grad():
            return self.model.per_video_state(video)

    def answer_batch(self, questions: list[Question]) -> list[Answer]:
        """One greedy `generate` for the whole batch (left padding: shapes match per config)."""
        started = time.perf_counter()
        per_video = self.soft_prompt_cache.soft_prompts(
            [q.features for q in questions], self.pathway
        )  # (B, K, H), or (B, F, D) fusion tokens
        prompts = [q.prompt for q in questions]
        texts = self.model.generate(
            None,
            prompts,
            max_new_tokens=max(q.max_new_tokens for q in questions),
            video_state=per_video,
        )
        # a request that asked for fewer tokens than the batch's longest gets its own budget
        texts = [self._truncate(t, q.max_new_tokens) for t, q in zip(texts, questions, strict=True)]
        prompt_tokens = self.model.prompt_builder.prompts(prompts)["attention_mask"].sum(dim=1)
        seconds = time.perf_counter() - started
        return [
            Answer(
                text=text,
                prompt_tokens=int(prompt_tokens[i]),
                completion_tokens=len(self.tokenizer(text, add_special_tokens=False).input_ids),
                batch_size=len(questions),
                generate_s=seconds,
            )
            for i, text in enumerate(texts)
        ]

    def _truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


class GenerationQueue:
    """One `generate` at a time; the questions that arrive while it runs go into the next one
    together (up to `max_batch_size`).

    Ray Serve 2.60's `@serve.batch` forms a batch as soon as its wait window ends, and then
    queues the formed batch until the previous one is done (`max_concurrent_batches`). Under
    load the model is busy for a whole generation while batches of one or two requests pile
    up behind it, so requests wait for many generations and each runs nearly alone
    (benchmarks/README section 7a measured batches of 1.1 at concurrency 16). The replica lets
    every formed batch through at once and merges them here, where the model is.

    Under load (the last batch held more than one question) the next batch waits up to
    `refill_wait_s` after the last one ended, or until it is full. Without it, busy callers
    split into two halves that take turns: while one half's batch runs, the other half
    queues, and it starts the moment the model is free, a few milliseconds before the half
    just answered can ask again (section 7a: batches of 8.5 from 16 callers).
    """

    def __init__(
        self, generate: Callable[[list], list], max_batch_size: int, refill_wait_s: float = 0.0
    ):
        self.generate = generate
        self.max_batch_size = max_batch_size
        self.refill_wait_s = refill_wait_s
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.running: asyncio.Task | None = None
        self.full = asyncio.Event()
        self.last_batch_size = 0
        self.last_batch_ended = float("-inf")  # time.monotonic()

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.waiting.extend(zip(items, futures, strict=True))
        if len(self.waiting) >= self.max_batch_size:
            self.full.set()
        if self.running is None or self.running.done():
            self.running = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _refill(self) -> None:
        """Under load, give the next batch until `refill_wait_s` after the last one to fill."""
        if self.last_batch_size <= 1 or len(self.waiting) >= self.max_batch_size:
            return
        left = self.last_batch_ended + self.refill_wait_s - time.monotonic()
        if left > 0:
            self.full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), left)

    async def _drain(self) -> None:
        while self.waiting:
            await self._refill()
            batch = self.waiting[: self.max_batch_size]
            del self.waiting[: self.max_batch_size]
            try:
                # in a thread, so the replica keeps taking requests while the model generates
                results = await asyncio.to_thread(self.generate, [item for item, _ in batch])
            except Exception as err:  # every request of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            finally:
                self.last_batch_size, self.last_batch_ended = len(batch), time.monotonic()
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class MergedBatchesWarningFilter(logging.Filter):
    """Drops Ray Serve's warning that `max_batch_size * max_concurrent_batches` exceeds
    `max_ongoing_requests`.

    The model replica allows many concurrent `@serve.batch` batches on purpose: they are how
    requests reach the `GenerationQueue`, which merges them, so the model's batches do reach
    `max_batch_size`, which is what the warning says cannot happen. Every other record passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("`max_concurrent_batches`" in message and "`max_ongoing_requests`" in message)


def quiet_merged_batches_warning() -> None:
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, MergedBatchesWarningFilter) for f in serve_logger.filters):
        serve_logger.addFilter(MergedBatchesWarningFilter())
