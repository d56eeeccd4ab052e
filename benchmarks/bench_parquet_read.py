"""Benchmark 10: one small Parquet read through Ray Data on 2 CPUs, by Parquet reader setting.

Ray 2.60 reads Parquet through DataSourceV2 by default, whose listing step starts a pool of
`FooterReader` actors (32 unless RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise) for every
execution of a dataset. A training stage executes its datasets several times (the validation
split at every epoch end, a shuffled train split per epoch), so this cost recurs. Side by side,
each variant in its own process with its own local Ray cluster (start-up not timed):

- `v2-default`: DataSourceV2 as shipped;
- `v2-footer1`: DataSourceV2 with one footer actor (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1);
- `v1`: the V1 Parquet reader (`DataContext.use_datasource_v2 = False`).

Each round builds `read_parquet(shards) -> filter -> map_batches` over `--shards` feature-like
shards in the embedded S3 server and iterates every row (what `iter_batches` on a Train
dataset shard does); the table gives the median and the best of `--repeats` rounds.

    .venv/bin/python benchmarks/bench_parquet_read.py [--shards 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BUCKET = "bench-parquet"
VARIANTS = {
    "v2-default": {},
    "v2-footer1": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"},
    "v1": {"RAY_DATA_USE_DATASOURCE_V2": "0"},
}


def write_shards(storage, shards: int, rows: int) -> list[str]:
    """Feature-like shards: a key, a config hash and a (16, 5, 64) float32 tensor per row."""
    fs, root = storage.pyarrow_filesystem(f"s3://{BUCKET}/features")
    paths = []
    rng = np.random.default_rng(0)
    for shard in range(shards):
        visual = rng.standard_normal((rows, 16 * 5 * 64), dtype=np.float32)
        table = pa.table(
            {
                "key": [f"clip-{shard}-{i}" for i in range(rows)],
                "config_hash": ["current"] * rows,
                "visual": pa.FixedSizeListArray.from_arrays(pa.array(visual.ravel()), 16 * 5 * 64),
            }
        )
        path = f"{root}/shard-{shard:03d}.parquet"
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        paths.append(path)
    return paths


def run_variant(endpoint_env: dict, paths: list[str], repeats: int) -> list[float]:
    """Inside the variant's process: seconds per full read of the dataset."""
    import ray
    import ray.data
    from ray.data.expressions import col

    from damo.config.schema import S3Config
    from damo.storage import Storage

    ray.init(
        num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, _ = Storage(S3Config(**endpoint_env)).pyarrow_filesystem(f"s3://{BUCKET}/features")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dataset = (
            ray.data.read_parquet(paths, filesystem=fs, columns=["key", "visual", "config_hash"])
            .filter(expr=col("config_hash") == "current")
            .map_batches(lambda batch: batch, batch_format="numpy")
        )
        rows = sum(len(b["key"]) for b in dataset.iter_batches(batch_size=8))
        seconds.append(time.perf_counter() - start)
        assert rows > 0
    ray.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=10, help="rows per shard")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results_parquet_read.json")
    )
    parser.add_argument("--variant-json", help=argparse.SUPPRESS)  # internal: one variant's run
    args = parser.parse_args()
    if args.variant_json:
        spec = json.loads(args.variant_json)
        print(json.dumps(run_variant(spec["s3"], spec["paths"], args.repeats)))
        return

    from damo.storage import Storage
    from damo.storage.s3server import EmbeddedS3Server

    results = {}
    with tempfile.TemporaryDirectory() as data_dir, EmbeddedS3Server(data_dir=data_dir) as state:
        s3 = state.s3_config()
        storage = Storage(s3)
        storage.ensure_bucket(f"s3://{BUCKET}")
        paths = write_shards(storage, args.shards, args.rows)
        credentials = {  # by value: a dump of the config would mask the secret
            "endpoint_url": state.endpoint_url,
            "access_key_id": state.access_key_id,
            "secret_access_key": state.secret_access_key,
        }
        spec = json.dumps({"s3": credentials, "paths": paths})
        for name, env in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--variant-json", spec],
                env={**os.environ, **env, "RAY_AUTH_MODE": "disabled"},
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = json.loads(out.stdout.strip().splitlines()[-1])
            results[name] = {
                "median_s": round(statistics.median(seconds), 2),
                "best_s": round(min(seconds), 2),
                "rounds_s": [round(s, 2) for s in seconds],
            }
            print(
                f"{name:12s} median {results[name]['median_s']:6.2f} s  best "
                f"{results[name]['best_s']:6.2f} s  rounds {results[name]['rounds_s']}",
                flush=True,
            )
    base = results["v2-default"]["median_s"]
    for row in results.values():
        row["vs_default"] = round(row["median_s"] / base, 3)
    args.out.write_text(
        json.dumps(
            {
                "shards": args.shards,
                "rows_per_shard": args.rows,
                "repeats": args.repeats,
                "variants": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
