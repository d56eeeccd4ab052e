"""Feature extraction's object-store peak for N clips: bounded, whatever N is.

Runs `extract_features` on N synthetic clips (tiny backbones) on a fresh local Ray cluster
and samples the cluster's object-store usage (the raylet's own accounting, as `ray memory`
prints it) every 0.1 s. Run it for two sizes; the peak must not grow with N, while the bytes
written do. `--code` points at another checkout (e.g. the revision before streaming) to
measure that one the same way.

    python benchmarks/bench_extract_memory.py --clips 20 80
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench"))
HERE = Path(__file__).resolve().parent


def object_store_sampler(period_s: float = 0.1):
    """(start, stop) of a thread that tracks the peak object-store bytes in use and spilled."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    peak = {"used_bytes": 0, "spilled_bytes": 0, "samples": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            stats = get_memory_info_reply(state).store_stats
            peak["used_bytes"] = max(peak["used_bytes"], stats.object_store_bytes_used)
            peak["spilled_bytes"] = max(peak["spilled_bytes"], stats.spilled_bytes_total)
            peak["samples"] += 1
            stop.wait(period_s)

    thread = threading.Thread(target=sample, daemon=True)

    def finish() -> dict:
        stop.set()
        thread.join()
        return peak

    return thread.start, finish


def measure(clips: int, object_store_mb: float | None = None) -> dict:
    """One run in this process (the damo on sys.path); `object_store_mb` caps extraction's
    blocks in flight (`data.extract.object_store_mb`), else Ray Data's default share."""
    import ray

    sys.path.insert(0, str(HERE))
    from bench_extract import prepare, tiny_config

    import damo
    from damo.data.extract import connect_ray, extract_features

    backbones, uris = prepare(clips, "tiny")
    settings = ["ray.num_cpus=2", "ray.object_store_memory_mb=512"]
    if object_store_mb is not None:
        settings.append(f"data.extract.object_store_mb={object_store_mb}")
    cfg = tiny_config(backbones, settings)
    out = CACHE / f"memory-out-{clips}"
    shutil.rmtree(out, ignore_errors=True)
    connect_ray(cfg)
    start_sampling, finish = object_store_sampler()
    start_sampling()
    started = time.perf_counter()
    summary = extract_features(uris, str(out), cfg, batch_size=4)
    elapsed = time.perf_counter() - started
    peak = finish()
    ray.shutdown()
    assert summary.ok == len(uris), summary
    written = sum(p.stat().st_size for p in (out / "features").rglob("*.parquet"))
    return {
        "code": str(Path(damo.__file__).parents[1]),
        "clips": len(uris),
        "object_store_cap_mib": object_store_mb,
        "seconds": elapsed,
        "peak_object_store_mib": peak["used_bytes"] / 2**20,
        "peak_spilled_mib": peak["spilled_bytes"] / 2**20,
        "feature_bytes_written_mib": written / 2**20,
        "samples": peak["samples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[20, 80])
    parser.add_argument("--code", default=None, help="checkout to import damo from")
    parser.add_argument(
        "--object-store-mb",
        type=float,
        default=None,
        help="cap on extraction's blocks in flight (data.extract.object_store_mb)",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child run
    parser.add_argument("--out", default="benchmarks/results_extract_memory.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if args.one:
        print("RESULT " + json.dumps(measure(args.clips[0], args.object_store_mb)), flush=True)
        return
    results = []
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([args.code, env.get("PYTHONPATH", "")])
    for clips in args.clips:  # a fresh process (and Ray cluster) per size
        done = subprocess.run(
            [sys.executable, __file__, "--one", "--clips", str(clips)]
            + ([f"--object-store-mb={args.object_store_mb}"] if args.object_store_mb else []),
            env=env,
            cwd=args.code,  # Ray puts the driver's directory first on the workers' path
            capture_output=True,
            text=True,
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            sys.exit(f"run with {clips} clips failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
