"""Decoding in a child process: a file that crashes or hangs the native decoder costs one error
row, not a dead Ray worker or a stuck job.

`DecoderProcess` keeps one child (`python -m damo.media.isolated`) and sends it one file at a
time over a pipe. When the child dies, the file is tried again in a fresh child (`crash_retries`)
and then recorded as `decoder_crash`; when it does not answer within `timeout_s`, it is killed
and the file is recorded as `timeout`. The child is started once and reused, so the cost per
file is one pickled round trip of the decoded arrays (benchmarks/README.md, section 2).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from damo.config.schema import S3Config
from damo.media.decode import DecodedClip, MediaError, MediaReason

_HEADER = struct.Struct("<Q")
_READY = "ready"
_STARTUP_TIMEOUT_S = 120.0


class DecoderStartError(RuntimeError):
    """The child could not start at all: an environment problem, not a property of a file."""


class DecoderProcess:
    """A reusable child process that runs `decode_clip`; see the module docstring."""

    def __init__(self, timeout_s: float, crash_retries: int = 1):
        self.timeout_s = timeout_s
        self.crash_retries = crash_retries
        self._proc: subprocess.Popen | None = None

    def decode(
        self, uri: str, s3: S3Config | None, kwargs: dict[str, Any], fault: str | None = None
    ) -> DecodedClip | MediaError:
        """`decode_clip(uri, Storage(s3), **kwargs)` in the child. `fault` ("crash", "hang")
        makes the child misbehave on purpose, for rehearsals and tests."""
        request = pickle.dumps((uri, s3, kwargs, fault), protocol=pickle.HIGHEST_PROTOCOL)
        deaths = []
        for _ in range(self.crash_retries + 1):
            proc = self._ensure_started()
            try:
                _write_frame(proc.stdin, request)
                return pickle.loads(_read_frame(proc.stdout, time.monotonic() + self.timeout_s))
            except TimeoutError:
                self.close()
                return MediaError(
                    uri,
                    MediaReason.TIMEOUT,
                    f"the decoder did not answer within {self.timeout_s:g} s and was killed",
                )
            except (EOFError, BrokenPipeError):
                deaths.append(self._reap())
        how = ", then ".join(deaths)
        return MediaError(
            uri,
            MediaReason.DECODER_CRASH,
            f"the decoder process died on this file {len(deaths)} time(s) ({how})",
        )

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._reap()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self._reap()
            proc = subprocess.Popen(
                [sys.executable, "-m", "damo.media.isolated"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._proc = proc
            try:
                hello = pickle.loads(
                    _read_frame(proc.stdout, time.monotonic() + _STARTUP_TIMEOUT_S)
                )
            except (EOFError, TimeoutError) as err:
                self.close()
                raise DecoderStartError(
                    f"the decoder process ({sys.executable} -m damo.media.isolated) did not "
                    f"start: {type(err).__name__}; see its stderr in the worker log"
                ) from err
            if hello != _READY:
                self.close()
                raise DecoderStartError(f"the decoder process said {hello!r}, not ready")
        return self._proc

    def _reap(self) -> str:
        """Wait for the dead child and say how it ended."""
        proc, self._proc = self._proc, None
        if proc is None:
            return "not running"
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        code = proc.wait()
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"


def _write_frame(stream, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream, deadline: float | None) -> bytes:
    fd = stream.fileno()
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    return _read_exactly(fd, size, deadline)


# ---- the child -------------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """Exit when the parent (a Ray worker) dies, even in the middle of a hung decode: a killed
    job must not leave decoder processes behind."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _serve() -> None:
    """Answer decode requests from stdin until the parent closes it."""
    # The protocol owns the original stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _exit_with_parent()
    from damo.media.decode import decode_clip
    from damo.storage import Storage

    storages: dict[str, Storage] = {}
    _write_frame(out, pickle.dumps(_READY))
    stdin = sys.stdin.buffer
    while True:
        try:
            request = _read_frame(stdin, None)
        except EOFError:
            return
        uri, s3, kwargs, fault = pickle.loads(request)
        if fault == "crash":
            os.abort()
        if fault == "hang":
            time.sleep(10**6)
        key = s3.model_dump_json() if s3 is not None else ""
        storage = storages.setdefault(key, Storage(s3))
        result = decode_clip(uri, storage, **kwargs)
        _write_frame(out, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _serve()
