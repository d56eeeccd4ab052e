"""Where a request's video may come from (damo.serve.sources), without a cluster."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from damo.serve.errors import ApiError
from damo.serve.featurizer import VideoFeaturesRow
from damo.serve.lru import LruCache
from damo.serve.sources import resolve_video


def refused(video: str, prefixes=(), http_prefixes=(), limit_mb: float = 1.0) -> ApiError:
    with pytest.raises(ApiError) as err:
        resolve_video(video, list(prefixes), list(http_prefixes), limit_mb, 5.0)
    return err.value


def test_storage_uris_only_inside_the_prefixes(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    (root / "out.mp4").symlink_to(tmp_path / "secret.mp4")
    assert resolve_video(str(root / "a.mp4"), [str(root)], [], 1, 5).uri == str(root / "a.mp4")
    assert resolve_video(f"file://{root}/a.mp4", [str(root)], [], 1, 5).uri
    for video in (
        str(root / "out.mp4"),  # a symlink out of the root
        f"{root}/../secret.mp4",
        f"{root}/%2e%2e/secret.mp4",
        f"{root}x/a.mp4",  # a sibling whose name starts like the root
        "s3://bucket/a.mp4",
    ):
        assert refused(video, [str(root)]).status == 403, video
    assert refused(str(root / "a.mp4")).status == 403  # no prefixes: no storage URIs at all
    assert refused("ftp://host/a.mp4", [str(root)]).code == "bad_video_uri"
    assert refused("   ").code == "missing_video"


def test_data_urls():
    payload = base64.b64encode(b"\x00\x01video").decode()
    assert resolve_video(f"data:video/mp4;base64,{payload}", [], [], 1, 5).data == b"\x00\x01video"
    assert refused("data:video/mp4,plain").code == "bad_data_url"
    assert refused("data:video/mp4;base64,***").code == "bad_data_url"
    big = base64.b64encode(b"\0" * (2 * 2**20)).decode()
    assert refused(f"data:video/mp4;base64,{big}").status == 413


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        elif self.path.startswith("/videos/big.mp4"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * (2 * 2**20))
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"video-bytes")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_only_from_allowed_prefixes_and_never_redirected(http_origin):
    allowed = [f"{http_origin}/videos/"]
    fetched = resolve_video(f"{http_origin}/videos/a.mp4", [], allowed, 1, 5)
    assert fetched.data == b"video-bytes"
    assert refused(f"{http_origin}/videos/a.mp4").status == 403  # none allowed: refused
    assert refused(f"{http_origin}/other/a.mp4", http_prefixes=allowed).status == 403
    assert refused(f"{http_origin}/videos/../redirect", http_prefixes=allowed).status == 403
    host = http_origin.removeprefix("http://")
    tricks = (f"http://{host}@169.254.169.254/videos/a.mp4", f"http://user@{host}/videos/a.mp4")
    for trick in tricks:
        assert refused(trick, http_prefixes=allowed).status == 403, trick
    redirecting = [f"{http_origin}/redirect"]
    error = refused(f"{http_origin}/redirect/a.mp4", http_prefixes=redirecting)
    assert error.code == "video_redirect"
    assert refused(f"{http_origin}/videos/big.mp4", http_prefixes=allowed).status == 413


def test_feature_cache_keeps_the_most_recent():
    cache = LruCache(2)
    for key in ("a", "b"):
        cache.put(key, VideoFeaturesRow(key, {}, 1.0))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", VideoFeaturesRow("c", {}, 1.0))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    off = LruCache(0)  # capacity 0 keeps nothing
    off.put("x", VideoFeaturesRow("x", {}, 1.0))
    assert len(off) == 0 and off.get("x") is None
