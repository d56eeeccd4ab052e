"""The model replica's generation queue: questions that arrive while the model generates go
into the next `generate` together (Ray Serve 2.60's `@serve.batch` alone would queue them as
batches of one or two; benchmarks/README section 7a)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from damo.serve.answer import GenerationQueue


class SlowModel:
    """Answers each item with (item, size of the batch it was in), taking `seconds` a call."""

    def __init__(self, seconds: float = 0.2, fail_on: object = None):
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list] = []
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append(list(items))
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        if self.fail_on in items:
            raise RuntimeError("generation failed")
        return [(item, len(items)) for item in items]


def test_questions_that_arrive_during_a_generation_share_the_next_one():
    model = SlowModel()

    async def scenario():
        queue = GenerationQueue(model, max_batch_size=16)
        first = asyncio.create_task(queue.submit(["a"]))
        await asyncio.sleep(0.05)  # the model is busy with "a"
        later = [asyncio.create_task(queue.submit([f"q{i}"])) for i in range(5)]
        return await first, [await t for t in later]

    first, later = asyncio.run(scenario())
    assert first == [("a", 1)]
    assert [answer for [answer] in later] == [(f"q{i}", 5) for i in range(5)]  # in order
    assert model.batches == [["a"], ["q0", "q1", "q2", "q3", "q4"]]
    assert model.most_at_once == 1  # one generate at a time


def test_a_batch_never_exceeds_the_maximum_and_one_means_no_batching():
    for max_batch_size, expected in ((3, [["a"], ["b", "c", "d"], ["e", "f"]]), (1, None)):
        model = SlowModel(seconds=0.1)

        async def scenario(size=max_batch_size, model=model):
            queue = GenerationQueue(model, max_batch_size=size)
            first = asyncio.create_task(queue.submit(["a"]))
            await asyncio.sleep(0.03)
            rest = [asyncio.create_task(queue.submit([x])) for x in "bcdef"]
            await asyncio.gather(first, *rest)

        asyncio.run(scenario())
        if expected is None:
            assert model.batches == [[x] for x in "abcdef"]
        else:
            assert model.batches == expected


def test_a_failed_generation_fails_its_own_requests_only():
    model = SlowModel(seconds=0.1, fail_on="bad")

    async def scenario():
        queue = GenerationQueue(model, max_batch_size=2)
        first = asyncio.create_task(queue.submit(["a"]))
        await asyncio.sleep(0.03)
        bad = asyncio.create_task(queue.submit(["bad", "b"]))
        after = asyncio.create_task(queue.submit(["c"]))
        results = await asyncio.gather(first, bad, after, return_exceptions=True)
        return results

    first, bad, after = asyncio.run(scenario())
    assert first == [("a", 1)]
    assert isinstance(bad, RuntimeError)
    assert after == [("c", 1)]  # the queue goes on after a failure


async def closed_loop(queue: GenerationQueue, callers: int, rounds: int, think_s: float) -> None:
    """`callers` clients that each ask, wait for the answer, take `think_s`, and ask again;
    caller 0 starts first, alone, the way a load run's first request does."""

    async def caller(name: int) -> None:
        if name:
            await asyncio.sleep(0.03)
        for round_ in range(rounds):
            await queue.submit([(name, round_)])
            await asyncio.sleep(think_s)

    await asyncio.gather(*(caller(i) for i in range(callers)))


def test_under_load_the_next_batch_waits_for_the_callers_just_answered():
    sizes = {}
    for refill_wait_s in (0.0, 0.5):
        model = SlowModel(seconds=0.1)
        queue = GenerationQueue(model, max_batch_size=4, refill_wait_s=refill_wait_s)
        asyncio.run(closed_loop(queue, callers=4, rounds=6, think_s=0.02))
        sizes[refill_wait_s] = [len(batch) for batch in model.batches]
    # without the wait the callers settle into halves that take turns with the model
    assert sizes[0.0][:3] == [1, 3, 1] and max(sizes[0.0]) < 4
    # with it the first batch runs alone, the second takes the 3 that queued meanwhile, and
    # from then on every batch is full: it started as soon as the 4th caller was back
    assert sizes[0.5][:2] == [1, 3]
    assert sizes[0.5][2:] == [4] * 5, sizes[0.5]


def test_a_lone_caller_and_a_full_batch_never_wait():
    model = SlowModel(seconds=0.02)
    queue = GenerationQueue(model, max_batch_size=4, refill_wait_s=5.0)
    started = time.monotonic()
    asyncio.run(closed_loop(queue, callers=1, rounds=5, think_s=0.0))
    assert time.monotonic() - started < 2.0  # 5 answers, none waited the 5 s
    assert [len(batch) for batch in model.batches] == [1] * 5

    model = SlowModel(seconds=0.1)
    queue = GenerationQueue(model, max_batch_size=2, refill_wait_s=5.0)

    async def scenario():
        first = asyncio.create_task(queue.submit(["a", "b"]))  # a batch of 2: under load
        await asyncio.sleep(0.03)
        full = asyncio.create_task(queue.submit(["c", "d"]))  # a full batch is waiting
        await first
        started = time.monotonic()
        await full
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0
    assert model.batches == [["a", "b"], ["c", "d"]]


def test_ray_serves_warning_about_concurrent_batches_is_dropped_and_nothing_else(monkeypatch):
    """The replica's many concurrent @serve.batch batches feed the GenerationQueue, so Ray's
    warning that they keep batches small is wrong here; the real Ray queue emits it."""
    from types import SimpleNamespace

    from ray import serve
    from ray.serve import batching

    from damo.serve.answer import MergedBatchesWarningFilter, quiet_merged_batches_warning

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    serve_logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(serve_logger, "filters", [])

    async def make_queue():
        batching._BatchQueue(max_batch_size=16, batch_wait_timeout_s=0, max_concurrent_batches=64)
        serve_logger.warning("another warning")

    class Records(logging.Handler):  # Ray's serve logger does not propagate to the root
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def warnings_logged() -> list[str]:
        records = Records()
        serve_logger.addHandler(records)
        try:
            asyncio.run(make_queue())
        finally:
            serve_logger.removeHandler(records)
        return records.messages

    before = warnings_logged()
    assert any("`max_concurrent_batches`" in message for message in before)  # Ray still warns
    quiet_merged_batches_warning()
    quiet_merged_batches_warning()  # a second replica in the same process adds no second filter
    assert sum(isinstance(f, MergedBatchesWarningFilter) for f in serve_logger.filters) == 1
    assert warnings_logged() == ["another warning"]


def test_the_soft_prompt_cache_runs_the_pathway_once_per_video():
    import numpy as np
    import torch

    from damo.serve.answer import SoftPromptCache
    from damo.serve.featurizer import VideoFeaturesRow

    def row(key: str, value: float) -> VideoFeaturesRow:
        return VideoFeaturesRow(key, {"visual": np.full((2, 3), value, np.float32)}, 5.0)

    calls = []

    def pathway(rows):  # (M, K=1, H=3): stands in for the model's pathway
        calls.append([r.key for r in rows])
        return torch.tensor(np.stack([r.columns["visual"][0] for r in rows]))[:, None, :]

    cache = SoftPromptCache(capacity=2)
    a, b, c = row("a", 1.0), row("b", 2.0), row("c", 3.0)
    first = cache.soft_prompts([a, b, a], pathway)
    assert calls == [["a", "b"]]  # one pathway call, each video once
    assert first[:, 0, 0].tolist() == [1.0, 2.0, 1.0]
    assert cache.soft_prompts([b, a], pathway)[:, 0, 0].tolist() == [2.0, 1.0]
    assert calls == [["a", "b"]]  # both cached: no pathway call at all
    # c is new; the capacity keeps the 2 asked about most recently, and a batch whose cached
    # entries are evicted by its own new ones still gets them
    assert cache.soft_prompts([b, c, a], pathway)[:, 0, 0].tolist() == [2.0, 3.0, 1.0]
    assert calls == [["a", "b"], ["c"]] and len(cache) == 2 and cache.computed == 3
    cache.soft_prompts([b], pathway)
    assert calls[-1] == ["b"]  # b was the least recently used: evicted

    off = SoftPromptCache(capacity=0)  # off: nothing kept, still once per video in a batch
    off.soft_prompts([a, a], pathway)
    off.soft_prompts([a], pathway)
    assert calls[-2:] == [["a"], ["a"]] and len(off) == 0
