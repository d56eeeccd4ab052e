"""Serving: throughput and latency of the Ray Serve app on 127.0.0.1, side by side.

  1. /v1/qa at concurrency 1, 4 and 16, batched (@serve.batch, max 16) and unbatched (max 1),
     one model replica each, features cached (the model is what is measured);
  2. the same request at concurrency 1 in-process (featurizer cache + Answerer, no HTTP, no Ray)
     against Serve: the overhead of HTTP + proxy + ingress + two handle calls;
  3. the first question about a video against the second (decoding + encoding skipped);
  4. a model replica killed by PID (SIGKILL) during a load run on two replicas: failed requests
     and whether the replica comes back.

Tiny preset, a random checkpoint (answers are nonsense; their cost is real), greedy decoding
of at most --max-new-tokens tokens. `--size tiny` keeps the tiny backbones; `--size base-llm`
gives them real sizes at random weights (ViT-B/16 on 24 frames of 224 px, a Whisper-base
encoder on 8 segments, a 12-layer 768-wide LLM), so that decoding + encoding a video and
generating an answer cost what they cost with real checkpoints. Results go to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import requests
from bench_extract import CACHE, SIZES, prepare
from learning_bar import add_overrides_option

QUESTION = "when is a high tone heard?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """POST every body to /v1/qa with `concurrency` clients; throughput and latency."""

    def one(body):
        started = time.perf_counter()
        response = requests.post(url + "v1/qa", json=body, timeout=120)
        return response.status_code, time.perf_counter() - started, response

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latencies = [seconds for status, seconds, _ in results if status == 200]
    timings = [r.json()["timings"] for status, _, r in results if status == 200]
    batches = [t["batch_size"] for t in timings]
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "ok": len(latencies),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "mean_batch": round(statistics.mean(batches), 2) if batches else 0,
        # the model's own time for the batch a request was in: what is left of the latency
        # is queueing, the featurizer's cache lookup, the handles and HTTP
        "mean_generate_ms": (
            round(1000 * statistics.mean(t["generate_s"] for t in timings), 1) if timings else 0
        ),
    }


def serve_config(
    backbones: Path,
    videos: list[str],
    max_batch: int,
    replicas: int,
    tokens: int,
    size: str,
    overrides: tuple[str, ...] = (),
):
    from damo.config import load_config

    cfg = load_config(
        "tiny",
        [
            *SIZES[size],
            f"storage.allowed_prefixes=[{Path(videos[0]).parent}]",
            "serve.port=0",
            "serve.model.autoscaling=null",
            f"serve.model.num_replicas={replicas}",
            "serve.model.num_cpus=0.5",
            "serve.model.max_ongoing_requests=32",
            "serve.model.max_queued_requests=-1",
            "serve.featurizer.num_cpus=0.25",
            "serve.ingress.num_cpus=0.25",
            f"serve.batching.max_batch_size={max_batch}",
            "serve.batching.batch_wait_timeout_s=0.01",
            f"serve.limits.max_new_tokens={tokens}",
            # base-size encoders take seconds per video on a quarter of a core
            "serve.limits.decode_timeout_s=120",
            "serve.limits.generate_timeout_s=120",
            *overrides,
        ],
    )
    return cfg.model_copy(update={"model": cfg.model.with_backbones_at(str(backbones))})


def random_checkpoint(backbones: Path, size: str) -> Path:
    from damo.config import load_config
    from damo.model.checkpoint import save_checkpoint
    from damo.model.damo import DamoModel

    out = CACHE / f"serve-random-checkpoint-{size}"
    if not (out / "config.json").exists():
        import torch

        torch.manual_seed(0)
        cfg = load_config("tiny", SIZES[size]).model.with_backbones_at(str(backbones))
        save_checkpoint(DamoModel.from_config(cfg), out, stage=4)
    return out


def deploy(cfg, checkpoint: Path) -> str:
    from damo.serve.local import start

    url = start(cfg, str(checkpoint))
    for _ in range(600):
        if requests.get(url + "healthz", timeout=5).status_code == 200:
            return url
        time.sleep(0.5)
    raise RuntimeError("the app did not come up")


def bodies_for(videos: list[str], count: int, tokens: int) -> list[dict]:
    return [
        {"video": videos[i % len(videos)], "question": QUESTION, "max_new_tokens": tokens}
        for i in range(count)
    ]


def bench_levels(url: str, videos: list[str], args) -> list[dict]:
    load(url, bodies_for(videos, len(videos), args.max_new_tokens), 1)  # warm-up, fills cache
    return [
        load(url, bodies_for(videos, args.requests * max(1, c // 2), args.max_new_tokens), c)
        for c in (1, 4, 16)
    ]


def in_process_p50(cfg, checkpoint: Path, videos: list[str], args) -> float:
    """The same work without Serve: a cached featurizer lookup and one generate call."""
    from damo.serve.answer import Answerer, Question
    from damo.serve.featurizer import Featurizer
    from damo.serve.sources import VideoSource

    featurizer = Featurizer(cfg)
    answerer = Answerer(cfg, str(checkpoint))
    for video in videos:
        featurizer.features(VideoSource(uri=video))
    latencies = []
    for i in range(args.requests):
        started = time.perf_counter()
        row = featurizer.features(VideoSource(uri=videos[i % len(videos)]))
        answerer.answer_batch([Question(row, QUESTION, args.max_new_tokens)])
        latencies.append(time.perf_counter() - started)
    return percentile(latencies, 50)


def in_process_batching(cfg, checkpoint: Path, videos: list[str], tokens: int) -> dict:
    """One `generate` for 16 questions against one for 1: what @serve.batch can buy."""
    from damo.serve.answer import Answerer, Question
    from damo.serve.featurizer import Featurizer
    from damo.serve.sources import VideoSource

    featurizer = Featurizer(cfg)
    answerer = Answerer(cfg, str(checkpoint))
    rows = [featurizer.features(VideoSource(uri=v)) for v in videos]
    out = {}
    for size in (1, 16):
        questions = [Question(rows[i % len(rows)], QUESTION, tokens) for i in range(size)]
        answerer.answer_batch(questions)  # warm-up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            answerer.answer_batch(questions)
            times.append(time.perf_counter() - started)
        out[f"batch_{size}_ms"] = round(1000 * statistics.median(times), 1)
    out["throughput_ratio_16_over_1"] = round(16 * out["batch_1_ms"] / out["batch_16_ms"], 2)
    return out


def first_and_second(url: str, videos: list[str], tokens: int) -> dict:
    """Whole-request latency, and the featurize stage alone (decode + encode, or a cache hit)."""
    firsts, seconds, first_featurize, second_featurize = [], [], [], []
    for video in videos:
        body = {"video": video, "question": QUESTION, "max_new_tokens": tokens}
        for into, featurize in ((firsts, first_featurize), (seconds, second_featurize)):
            started = time.perf_counter()
            response = requests.post(url + "v1/qa", json=body, timeout=120)
            response.raise_for_status()
            into.append(time.perf_counter() - started)
            featurize.append(response.json()["timings"]["featurize_s"])
    return {
        "videos": len(videos),
        "first_p50_ms": round(1000 * statistics.median(firsts), 1),
        "second_p50_ms": round(1000 * statistics.median(seconds), 1),
        "ratio": round(statistics.median(seconds) / statistics.median(firsts), 3),
        "first_featurize_p50_ms": round(1000 * statistics.median(first_featurize), 1),
        "second_featurize_p50_ms": round(1000 * statistics.median(second_featurize), 1),
        "featurize_ratio": round(
            statistics.median(second_featurize) / statistics.median(first_featurize), 3
        ),
    }


def kill_during_load(url: str, videos: list[str], args) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("model", app_name="damo")
    pids = {handle.pid.remote().result() for _ in range(20)}
    victim = sorted(pids)[0]
    statuses: list[int] = []
    stop = threading.Event()

    def client(index: int):
        body = {"video": videos[index % len(videos)], "question": QUESTION}
        body["max_new_tokens"] = args.max_new_tokens
        while not stop.is_set():
            try:
                statuses.append(requests.post(url + "v1/qa", json=body, timeout=120).status_code)
            except requests.RequestException:
                statuses.append(-1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(args.kill_after_s)
    os.kill(victim, signal.SIGKILL)
    killed_at = len(statuses)
    time.sleep(args.kill_load_s)
    stop.set()
    for thread in threads:
        thread.join()
    back = False
    for _ in range(240):
        states = serve.status().applications["damo"].deployments["model"].replica_states
        if states.get("RUNNING", 0) == 2:
            back = True
            break
        time.sleep(0.5)
    failed = sum(1 for s in statuses if s != 200)
    return {
        "replicas": len(pids),
        "requests": len(statuses),
        "requests_before_kill": killed_at,
        "failed": failed,
        "failed_pct": round(100 * failed / max(1, len(statuses)), 3),
        "failed_statuses": sorted({s for s in statuses if s != 200}),
        "replica_back": back,
    }


def main() -> None:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--requests", type=int, default=24, help="Requests at concurrency 1.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kill-after-s", type=float, default=5.0)
    parser.add_argument("--kill-load-s", type=float, default=20.0)
    parser.add_argument(
        "--batching-only", action="store_true", help="Only batched vs unbatched (parts 1)."
    )
    parser.add_argument(
        "--in-process-only", action="store_true", help="Only generate(16) vs generate(1)."
    )
    parser.add_argument("--size", choices=["tiny", "base-llm"], default="tiny")
    add_overrides_option(
        parser,
        help="config overrides for every deployment, e.g. serve.batching.refill_wait_s=0.3",
        metavar="KEY=VALUE",
    )
    parser.add_argument("--out", default="benchmarks/results_serve.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    backbones, videos = prepare(args.clips, args.size)
    checkpoint = random_checkpoint(backbones, args.size)
    cached, fresh = videos[: len(videos) // 2], videos[len(videos) // 2 :]
    if args.in_process_only:
        cfg = serve_config(backbones, videos, 16, 1, args.max_new_tokens, args.size, args.set)
        result = in_process_batching(cfg, checkpoint, cached, args.max_new_tokens)
        result["max_new_tokens"] = args.max_new_tokens
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False)
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "size": args.size, "set": args.set}
    try:
        tokens = args.max_new_tokens
        batched = serve_config(backbones, videos, 16, 1, tokens, args.size, args.set)
        url = deploy(batched, checkpoint)
        results["batched"] = bench_levels(url, cached, args)
        if not args.batching_only:
            results["first_vs_second"] = first_and_second(url, fresh, tokens)
        serve.shutdown()
        if not args.batching_only:
            results["in_process_p50_ms"] = round(
                1000 * in_process_p50(batched, checkpoint, cached, args), 1
            )
        url = deploy(serve_config(backbones, videos, 1, 1, tokens, args.size, args.set), checkpoint)
        results["unbatched"] = bench_levels(url, cached, args)
        serve.shutdown()
        if not args.batching_only:
            url = deploy(
                serve_config(backbones, videos, 16, 2, tokens, args.size, args.set), checkpoint
            )
            load(url, bodies_for(cached, len(cached), tokens), 1)
            results["replica_kill"] = kill_during_load(url, cached, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    ratios = {
        "batched_over_unbatched_throughput_c16": round(
            results["batched"][2]["throughput_rps"] / results["unbatched"][2]["throughput_rps"], 2
        )
    }
    if not args.batching_only:
        ratios["serve_over_in_process_p50_c1"] = round(
            results["batched"][0]["p50_ms"] / results["in_process_p50_ms"], 2
        )
        ratios["second_over_first_question"] = results["first_vs_second"]["ratio"]
        ratios["second_over_first_featurize"] = results["first_vs_second"]["featurize_ratio"]
    results["ratios"] = ratios
    results["max_new_tokens"] = args.max_new_tokens
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
