"""Benchmark 1: sampling N frames by seeking vs decoding every frame vs the ffmpeg CLI.

Generates 720p H.264 + AAC clips of 1, 5 and 10 minutes (cached under DAMO_BENCH_CACHE,
default /tmp/damo-bench), then times, per clip:

- damo: `decode_clip(num_frames=24, with_audio=False)`: seek to the keyframe before each
  target and decode forward (what the pipeline does), plus the audio track as a separate row;
- full decode: PyAV decodes every frame and keeps the 24 on screen at the same targets;
- ffmpeg CLI: one `ffmpeg -ss T -i clip -frames:v 1` per target (input seeking), 24 runs;
  and the same seeks as 24 inputs of one ffmpeg process (no per-process start-up).

Each number is the best of `--repeats` interleaved rounds. Everything runs single-threaded
(`threads=1`, `-threads 1`), so the comparison is about the work done, not about cores.
Needs the `ffmpeg` binary (apt-get install -y ffmpeg).

    .venv/bin/python benchmarks/bench_decode.py [--minutes 1 5 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np

from damo.media.decode import decode_clip, uniform_times
from damo.media.encode import encode_mp4

WIDTH, HEIGHT, FPS, GOP_SECONDS = 1280, 720, 10, 2.0


def _frames(seconds: int):
    """Moving content that compresses like video (a drifting pattern plus a moving block)."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(xs * 255 // WIDTH), (ys * 255 // HEIGHT), ((xs + ys) % 256)], axis=-1)
    base = base.astype(np.uint8)
    for i in range(seconds * FPS):
        frame = np.roll(base, shift=(i * 3) % WIDTH, axis=1)
        x = (i * 7) % (WIDTH - 120)
        frame[300:420, x : x + 120] = (i * 5) % 256
        yield frame


def make_clip(path: Path, minutes: int) -> Path:
    if path.exists():
        return path
    seconds = minutes * 60
    t = np.arange(seconds * 16000) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    started = time.perf_counter()
    data = encode_mp4(
        _frames(seconds), FPS, audio=audio, gop_seconds=GOP_SECONDS, crf=30, preset="ultrafast"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(
        f"generated {path.name}: {len(data) / 1e6:.1f} MB in {time.perf_counter() - started:.0f}s"
    )
    return path


def bench_damo(path: Path, num_frames: int) -> float:
    started = time.perf_counter()
    clip = decode_clip(str(path), num_frames=num_frames, with_audio=False, threads=1)
    elapsed = time.perf_counter() - started
    assert clip.frames.shape[0] == num_frames, clip
    return elapsed


def bench_damo_audio(path: Path) -> float:
    started = time.perf_counter()
    clip = decode_clip(str(path), num_frames=1, num_segments=8, threads=1)
    elapsed = time.perf_counter() - started
    assert clip.has_audio
    return elapsed


def bench_full_decode(path: Path, num_frames: int) -> float:
    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        duration = container.duration / av.time_base
        targets = list(uniform_times(duration, num_frames))
        kept, previous = [], None
        for frame in container.decode(stream):
            while targets and frame.time > targets[0]:
                kept.append(previous.to_ndarray(format="rgb24", width=224, height=224))
                targets.pop(0)
            previous = frame
        kept.extend(previous.to_ndarray(format="rgb24", width=224, height=224) for _ in targets)
    elapsed = time.perf_counter() - started
    assert len(kept) == num_frames
    return elapsed


def bench_ffmpeg(path: Path, num_frames: int) -> float:
    with av.open(str(path)) as container:
        duration = container.duration / av.time_base
    started = time.perf_counter()
    for target in uniform_times(duration, num_frames):
        out = subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-threads",
                "1",
                "-ss",
                f"{target:.3f}",
                "-i",
                str(path),
                "-frames:v",
                "1",
                "-vf",
                "scale=224:224",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ],  # fmt: skip
            check=True,
            capture_output=True,
        ).stdout
        assert len(out) == 224 * 224 * 3
    return time.perf_counter() - started


def bench_ffmpeg_one_process(path: Path, num_frames: int) -> float:
    """One ffmpeg process with one input-seeked input (`-ss T -i clip`) per target."""
    import tempfile

    with av.open(str(path)) as container:
        duration = container.duration / av.time_base
    targets = uniform_times(duration, num_frames)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        command = ["ffmpeg", "-v", "error", "-threads", "1"]
        for target in targets:
            command += ["-ss", f"{target:.3f}", "-i", str(path)]
        for i in range(len(targets)):
            command += ["-map", f"{i}:v:0", "-frames:v", "1", "-vf", "scale=224:224",
                        "-f", "rawvideo", "-pix_fmt", "rgb24", f"{tmp}/{i}.raw"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        assert all(Path(tmp, f"{i}.raw").stat().st_size == 224 * 224 * 3 for i in range(num_frames))
    return time.perf_counter() - started


def best_of(repeats: int, benches: dict) -> dict[str, float]:
    """Minimum time of each bench over `repeats` rounds, the benches interleaved round-robin so
    that load from other processes on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(repeats):
        for name, (fn, *args) in benches.items():
            times[name].append(fn(*args))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results_decode.json")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("the ffmpeg binary is needed: apt-get install -y ffmpeg")
    cache = Path(os.environ.get("DAMO_BENCH_CACHE", "/tmp/damo-bench"))
    results = []
    for minutes in args.minutes:
        path = make_clip(cache / f"clip_{minutes}min_720p.mp4", minutes)
        row = {"minutes": minutes, "size_mb": round(path.stat().st_size / 1e6, 1)}
        row |= best_of(
            args.repeats,
            {
                "damo_s": (bench_damo, path, args.frames),
                "full_decode_s": (bench_full_decode, path, args.frames),
                "ffmpeg_cli_s": (bench_ffmpeg, path, args.frames),
                "ffmpeg_one_process_s": (bench_ffmpeg_one_process, path, args.frames),
                "damo_audio_s": (bench_damo_audio, path),
                "damo_8_frames_s": (bench_damo, path, 8),
                "damo_48_frames_s": (bench_damo, path, 48),
            },
        )
        row["full_over_damo"] = row["full_decode_s"] / row["damo_s"]
        row["ffmpeg_over_damo"] = row["ffmpeg_cli_s"] / row["damo_s"]
        row["ffmpeg_one_process_over_damo"] = row["ffmpeg_one_process_s"] / row["damo_s"]
        results.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        "| clip | damo, 24 frames | full decode | ffmpeg CLI, 24 runs | ffmpeg, 1 run |"
        " full / damo | ffmpeg 24 runs / damo | ffmpeg 1 run / damo |"
    )
    for r in results:
        print(
            f"| {r['minutes']} min | {r['damo_s']:.2f} s | {r['full_decode_s']:.2f} s | "
            f"{r['ffmpeg_cli_s']:.2f} s | {r['ffmpeg_one_process_s']:.2f} s | "
            f"{r['full_over_damo']:.1f}x | {r['ffmpeg_over_damo']:.1f}x | "
            f"{r['ffmpeg_one_process_over_damo']:.1f}x |"
        )


if __name__ == "__main__":
    main()
