"""`make demo`: what the platform can do today, end to end, on an embedded S3 server."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from damo.config import DamoConfig
from damo.media.s3server import EmbeddedS3Server
from damo.media.storage import Storage, join

SAMPLE_CLIP = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "fixtures"
    / "media"
    / "bigbuckbunny.mp4"
)


def _sample_object() -> tuple[str, bytes]:
    if SAMPLE_CLIP.is_file():
        return "media/bigbuckbunny.mp4", SAMPLE_CLIP.read_bytes()
    # No fixtures beside this checkout: a deterministic 12 MiB blob still exercises multipart.
    return "media/blob.bin", hashlib.shake_256(b"damo-demo").digest(12 * 1024 * 1024)


def run_demo(config: DamoConfig, console: Console) -> bool:
    """Start the server, round-trip a real object through it, report, stop. True on success."""
    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="damo-demo-") as data_dir:
        server = EmbeddedS3Server(config.storage.embedded, data_dir=data_dir)
        t0 = time.monotonic()
        with server as state:
            console.print(
                f"embedded S3 server up at [bold]{state.endpoint_url}[/] "
                f"in {time.monotonic() - t0:.1f}s"
            )
            storage = Storage(state.s3_config())
            bucket_uri = "s3://damo-demo"
            storage.ensure_bucket(bucket_uri)
            key, payload = _sample_object()
            uri = join(bucket_uri, key)
            storage.write_bytes(uri, payload)
            back = storage.read_bytes(uri)
            checks.append(
                (
                    "round trip (sha256)",
                    back == payload,
                    f"{len(payload) / 2**20:.2f} MiB {hashlib.sha256(back).hexdigest()[:12]}",
                )
            )
            middle = len(payload) // 2
            ranged = storage.read_bytes(uri, middle, middle + 4096)
            checks.append(("range read", ranged == payload[middle : middle + 4096], "4 KiB"))
            listed = storage.list(bucket_uri + "/media/")
            checks.append(("list", listed == [uri], ", ".join(listed)))
            storage.delete(uri)
            checks.append(("delete", not storage.exists(uri), uri))
        checks.append(("server stopped", server.running_state() is None, f"pid {state.pid}"))
    table = Table(title="DaMO demo: object storage")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for name, passed, detail in checks:
        table.add_row(name, "[green]ok[/]" if passed else "[red]FAILED[/]", detail)
    console.print(table)
    ok = all(passed for _, passed, _ in checks)
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo FAILED[/]")
    return ok
