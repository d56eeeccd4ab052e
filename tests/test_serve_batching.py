"""The model replica's generation queue: questions that arrive while the model generates go
into the next `generate` together (Ray Serve 2.60's `@serve.batch` alone would queue them as
batches of one or two; benchmarks/README section 7a)."""

from __future__ import annotations

import asyncio
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
