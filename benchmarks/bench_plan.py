"""Benchmark 6: planning an extraction over N objects, from the listing vs a HEAD per object.

Starts the embedded SeaweedFS S3 server (`weed mini`, loopback), puts N small objects under
one prefix (a thread pool of PUTs), then times, side by side:

- listing: `video_uris` (one paginated ListObjectsV2, 1,000 keys a page, carrying size and
  etag) + `plan`, over all N objects: what `damo extract --videos PREFIX` does now;
- HEAD per object: `plan` over plain URI strings, which costs one HeadObject each (what it did
  before). Timed on a sample of `--head-sample` objects and extrapolated linearly to N, since
  the HEADs are sequential and independent; the table says which numbers are extrapolated.

Both plans write nothing (the output prefix is empty), so only identification is timed.
Best of `--repeats` interleaved rounds.

    .venv/bin/python benchmarks/bench_plan.py [--objects 100000] [--head-sample 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from damo.data.extract import plan, video_uris
from damo.storage import Storage
from damo.storage.s3server import EmbeddedS3Server

BUCKET = "bench-plan"


def put_objects(state, key_prefix: str, count: int, threads: int) -> float:
    """`count` objects of 64 bytes under `key_prefix`; returns the seconds it took."""
    import boto3
    from botocore.config import Config

    client = boto3.client(  # setup only: a pool as wide as the threads
        "s3",
        endpoint_url=state.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=state.access_key_id,
        aws_secret_access_key=state.secret_access_key,
        config=Config(max_pool_connections=threads, s3={"addressing_style": "path"}),
    )
    body = b"v" * 64

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{key_prefix}/clip-{i:07d}.mp4", Body=body)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, range(count), chunksize=256):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--head-sample", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=16, help="parallel PUTs for the setup")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results_plan.json")))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as data_dir:
        server = EmbeddedS3Server(data_dir=data_dir)
        state = server.start()
        try:
            storage = Storage(state.s3_config())
            storage.ensure_bucket(f"s3://{BUCKET}")
            videos = f"s3://{BUCKET}/videos"
            put_s = put_objects(state, "videos", args.objects, args.threads)
            print(f"put {args.objects} objects in {put_s:.1f} s ({args.objects / put_s:.0f}/s)")
            out = f"s3://{BUCKET}/out"
            listing_s, head_s, pages = [], [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                uris = video_uris(storage, videos)
                to_decode, errors, skipped = plan(storage, uris, out, "bench")
                listing_s.append(time.perf_counter() - start)
                assert len(to_decode) == args.objects and not errors and not skipped
                pages = -(-len(uris) // 1000)
                sample = [str(u) for u in uris[: args.head_sample]]
                start = time.perf_counter()
                by_head, errors, _ = plan(storage, sample, out, "bench")
                head_s.append(time.perf_counter() - start)
                assert [r["key"] for r in by_head] == [r["key"] for r in to_decode[: len(sample)]]
                print(
                    f"listing+plan {listing_s[-1]:.2f} s for {args.objects}; "
                    f"HEAD plan {head_s[-1]:.2f} s for {len(sample)}"
                )
        finally:
            server.stop()

    best_listing, best_head = min(listing_s), min(head_s)
    per_head_ms = 1000 * best_head / args.head_sample
    head_extrapolated = best_head / args.head_sample * args.objects
    result = {
        "objects": args.objects,
        "list_pages": pages,
        "put_seconds": round(put_s, 1),
        "listing_plan_seconds": round(best_listing, 2),
        "listing_plan_per_object_us": round(1e6 * best_listing / args.objects, 1),
        "head_sample": args.head_sample,
        "head_plan_sample_seconds": round(best_head, 2),
        "head_per_object_ms": round(per_head_ms, 2),
        "head_plan_extrapolated_seconds": round(head_extrapolated, 1),
        "speedup_listing_vs_head": round(head_extrapolated / best_listing, 1),
        "repeats": args.repeats,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
