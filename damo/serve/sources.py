"""Where a request's video comes from, checked before anything is read.

A video is one of
  - a storage URI (s3://, file://, an absolute path) inside `storage.allowed_prefixes`
    (`damo.storage.is_allowed`: no `..`, no symlink out of a root, nothing outside the prefixes);
  - an upload: a `data:video/...;base64,...` URL (what the OpenAI format and the web page send);
  - an http(s) URL, only when it starts with one of `serve.allow_http_prefixes`; it is fetched
    once, without following redirects, and never beyond the upload limit.
Anything else is refused with a 4xx that says why. No request can make the service read a
path or host that the config does not name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from damo.serve.errors import ApiError
from damo.storage import StorageError, is_allowed, parse_uri

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


@dataclass(frozen=True)
class VideoSource:
    """A checked video: a storage URI to read, or the bytes of an upload."""

    uri: str | None = None
    data: bytes | None = None

    @property
    def label(self) -> str:
        return self.uri if self.uri is not None else f"upload:{self.digest[:16]}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data or b"").hexdigest()


def too_large(size: int, limit_mb: float) -> ApiError:
    return ApiError(
        413,
        "video_too_large",
        f"the video is {size / 2**20:.1f} MiB; the limit is {limit_mb:g} MiB",
    )


def decode_data_url(url: str, limit_mb: float) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError(
            400, "bad_data_url", "a data URL must look like data:video/mp4;base64,<base64 bytes>"
        )
    payload = url[match.end() :]
    # base64 is 4/3 of the bytes: refuse before decoding anything big
    if len(payload) * 3 // 4 > limit_mb * 2**20:
        raise too_large(len(payload) * 3 // 4, limit_mb)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_data_url", "the data URL's payload is not valid base64") from None
    if not data:
        raise ApiError(400, "empty_video", "the uploaded video is empty (0 bytes)")
    return data


def _http_allowed(url: str, prefixes: list[str]) -> bool:
    """Same scheme, host and port as a prefix, and a path under its path (no userinfo tricks)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.username or parts.password or ".." in parts.path.split("/"):
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        same_origin = (
            parts.scheme == allowed.scheme
            and (parts.hostname or "") == (allowed.hostname or "")
            and port == allowed.port
        )
        root = allowed.path.rstrip("/")
        if same_origin and (parts.path == root or parts.path.startswith(root + "/")):
            return True
    return False


def fetch_http(url: str, limit_mb: float, timeout_s: float) -> bytes:
    """GET an allowed URL: no redirects (a redirect could lead anywhere), at most the limit."""
    import httpx

    limit = int(limit_mb * 2**20)
    try:
        with httpx.stream("GET", url, follow_redirects=False, timeout=timeout_s) as response:
            if response.is_redirect:
                raise ApiError(
                    422, "video_redirect", f"{url} redirects elsewhere; redirects are not followed"
                )
            if response.status_code != 200:
                raise ApiError(
                    422, "video_fetch_failed", f"{url} answered HTTP {response.status_code}"
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise too_large(size, limit_mb)
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise ApiError(422, "video_fetch_failed", f"cannot fetch {url}: {err}") from None
    return b"".join(chunks)


def resolve_video(
    video: str,
    allowed_prefixes: list[str],
    http_prefixes: list[str],
    limit_mb: float,
    fetch_timeout_s: float = 10.0,
) -> VideoSource:
    """Check one video reference against the config; fetch uploads and allowed URLs."""
    text = video.strip()
    if not text:
        raise ApiError(400, "missing_video", "no video given (a URI or a data: URL)")
    if "\x00" in text:
        raise ApiError(400, "bad_video_uri", "the video URI contains a NUL byte")
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "data":
        return VideoSource(data=decode_data_url(text, limit_mb))
    if scheme in ("http", "https"):
        if not _http_allowed(text, http_prefixes):
            raise ApiError(
                403,
                "video_uri_not_allowed",
                "http(s) videos are not allowed from there"
                + ("" if http_prefixes else " (this service fetches no http(s) URLs)")
                + "; send the video as a data: URL or use an allowed storage URI",
            )
        return VideoSource(data=fetch_http(text, limit_mb, fetch_timeout_s))
    try:
        parse_uri(text)
    except StorageError as err:
        raise ApiError(400, "bad_video_uri", f"{err.detail}") from None
    if not is_allowed(text, allowed_prefixes):
        raise ApiError(
            403,
            "video_uri_not_allowed",
            f"{text!r} is outside the allowed prefixes"
            + ("" if allowed_prefixes else " (none are configured: upload the video instead)"),
        )
    return VideoSource(uri=text)
