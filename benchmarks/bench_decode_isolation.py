"""What decoding in a child process costs: `decode_clip` in process vs through `DecoderProcess`.

The same clip, the same settings (24 frames at 224 px, 8 audio segments), alternating the two
ways `--repeats` times; the child is started once beforehand (as in a Ray worker, where it is
reused across tasks) and its start-up is reported separately.

    python benchmarks/bench_decode_isolation.py --clip ../shared/fixtures/media/bigbuckbunny.mp4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    from damo.media.decode import DecodedClip, decode_clip
    from damo.media.isolated import DecoderProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results_decode_isolation.json")
    args = parser.parse_args()
    options = {"num_frames": 24, "num_segments": 8, "image_size": 224}

    decoder = DecoderProcess(timeout_s=600)
    started = time.perf_counter()
    decoder._ensure_started()
    startup_s = time.perf_counter() - started
    in_process, isolated = [], []
    try:
        for _ in range(args.repeats):
            tick = time.perf_counter()
            local = decode_clip(args.clip, **options)
            in_process.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            remote = decoder.decode(args.clip, None, options)
            isolated.append(time.perf_counter() - tick)
            assert isinstance(local, DecodedClip) and isinstance(remote, DecodedClip)
            assert (local.frames == remote.frames).all()
    finally:
        decoder.close()
    payload_mb = (remote.frames.nbytes + remote.audio.nbytes) / 2**20
    results = {
        "clip": args.clip,
        "repeats": args.repeats,
        "child_startup_s": startup_s,
        "in_process_median_s": statistics.median(in_process),
        "isolated_median_s": statistics.median(isolated),
        "isolated_over_in_process": statistics.median(isolated) / statistics.median(in_process),
        "payload_mib": payload_mb,
        "in_process_s": in_process,
        "isolated_s": isolated,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    lists = ("in_process_s", "isolated_s")
    print(json.dumps({k: v for k, v in results.items() if k not in lists}, indent=2))


if __name__ == "__main__":
    main()
