"""One small storage API over plain paths, `file://` URIs and `s3://bucket/key` URIs.

Every failure raises `StorageError`, whose message names the URI and the cause and whose
`reason` is machine-readable (see `Reason`). Writes are atomic: a local write goes to a temp
file that is renamed into place; an S3 object (single or multipart upload) only becomes visible
when the upload completes.
"""

from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

from damo.config.schema import S3Config

if TYPE_CHECKING:
    import pyarrow.fs

MULTIPART_THRESHOLD = 8 * 1024 * 1024


class Reason(enum.StrEnum):
    UNKNOWN_SCHEME = "unknown_scheme"
    INVALID_URI = "invalid_uri"
    NOT_FOUND = "not_found"
    NO_BUCKET = "no_bucket"
    AUTH = "bad_credentials"
    PERMISSION = "permission_denied"
    UNREACHABLE = "unreachable"
    IO = "io_error"


class StorageError(Exception):
    """A storage operation failed. `uri` and `reason` say where and why."""

    def __init__(self, uri: str, reason: Reason, detail: str):
        self.uri = uri
        self.reason = reason
        self.detail = detail
        super().__init__(f"{uri}: {reason.value}: {detail}")


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "file" or "s3"; for file, `path` is absolute."""

    uri: str
    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""


def parse_uri(uri: str | os.PathLike) -> Location:
    text = os.fspath(uri)
    if not text:
        raise StorageError(text, Reason.INVALID_URI, "empty URI")
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        if scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(text, Reason.INVALID_URI, "file:// URIs must be local")
            path = unquote(parsed.path)
        else:
            path = text
        return Location(uri=text, scheme="file", path=os.path.abspath(path))
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(text, Reason.INVALID_URI, "s3:// URI has no bucket")
        return Location(uri=text, scheme="s3", bucket=parsed.netloc, key=parsed.path.lstrip("/"))
    raise StorageError(
        text,
        Reason.UNKNOWN_SCHEME,
        f"unsupported scheme '{scheme}://' (supported: plain paths, file://, s3://)",
    )


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with single slashes."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def s3_config_from_env(base: S3Config | None = None) -> S3Config:
    """Fill unset S3 fields from the environment (AWS_* and DAMO_S3_ENDPOINT)."""
    cfg = base or S3Config()
    return cfg.model_copy(
        update={
            "endpoint_url": cfg.endpoint_url
            or os.environ.get("DAMO_S3_ENDPOINT")
            or os.environ.get("AWS_ENDPOINT_URL"),
            "region": os.environ.get("AWS_DEFAULT_REGION", cfg.region)
            if cfg.region == S3Config().region
            else cfg.region,
            "access_key_id": cfg.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
            "secret_access_key": cfg.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        }
    )


_S3_CODES = {
    "NoSuchKey": Reason.NOT_FOUND,
    "404": Reason.NOT_FOUND,
    "NotFound": Reason.NOT_FOUND,
    "NoSuchBucket": Reason.NO_BUCKET,
    "SignatureDoesNotMatch": Reason.AUTH,
    "InvalidAccessKeyId": Reason.AUTH,
    "InvalidToken": Reason.AUTH,
    "ExpiredToken": Reason.AUTH,
    "AuthorizationHeaderMalformed": Reason.AUTH,
    "AccessDenied": Reason.PERMISSION,
    "403": Reason.PERMISSION,
    "Forbidden": Reason.PERMISSION,
    "InvalidRange": Reason.IO,
}


class Storage:
    """Read, write, list and delete objects by URI. Holds one boto3 client per store."""

    def __init__(self, s3: S3Config | None = None):
        self.s3 = s3_config_from_env(s3)
        self._client = None

    # ---- S3 plumbing -------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.s3.endpoint_url,
                region_name=self.s3.region,
                aws_access_key_id=self.s3.access_key_id,
                aws_secret_access_key=self.s3.secret_access_key,
                config=Config(
                    connect_timeout=self.s3.connect_timeout_s,
                    read_timeout=self.s3.read_timeout_s,
                    retries={"max_attempts": self.s3.max_attempts, "mode": "standard"},
                    s3={"addressing_style": self.s3.addressing_style},
                    signature_version="s3v4",
                ),
            )
        return self._client

    def _s3_error(self, loc: Location, err: Exception) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            message = err.response.get("Error", {}).get("Message") or str(err)
            reason = _S3_CODES.get(code, Reason.IO)
            if reason is Reason.NOT_FOUND and not loc.key:
                reason = Reason.NO_BUCKET
            if reason is Reason.NOT_FOUND and not self._bucket_exists(loc):
                reason = Reason.NO_BUCKET
            if reason is Reason.NO_BUCKET:
                message = f"bucket '{loc.bucket}' does not exist"
            return StorageError(loc.uri, reason, f"{message} (S3 code {code})")
        if isinstance(err, NoCredentialsError):
            return StorageError(loc.uri, Reason.AUTH, "no S3 credentials configured")
        if isinstance(err, (EndpointConnectionError, BotoConnectionError)):
            return StorageError(
                loc.uri,
                Reason.UNREACHABLE,
                f"cannot reach {self.s3.endpoint_url or 'AWS S3'}: {err}",
            )
        return StorageError(loc.uri, Reason.IO, f"{type(err).__name__}: {err}")

    def _bucket_exists(self, loc: Location) -> bool:
        try:
            self.client.head_bucket(Bucket=loc.bucket)
            return True
        except Exception:  # any failure here means we cannot prove the bucket is there
            return False

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an s3:// URI if it does not exist (no-op for local paths)."""
        loc = parse_uri(uri)
        if loc.scheme != "s3" or self._bucket_exists(loc):
            return
        try:
            self.client.create_bucket(Bucket=loc.bucket)
        except Exception as err:
            code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._s3_error(loc, err) from err

    @staticmethod
    def _local_error(loc: Location, err: OSError) -> StorageError:
        if isinstance(err, FileNotFoundError):
            return StorageError(loc.uri, Reason.NOT_FOUND, f"no such file: {loc.path}")
        if isinstance(err, PermissionError):
            return StorageError(loc.uri, Reason.PERMISSION, f"permission denied: {loc.path}")
        if isinstance(err, IsADirectoryError):
            return StorageError(loc.uri, Reason.IO, f"is a directory: {loc.path}")
        return StorageError(loc.uri, Reason.IO, f"{type(err).__name__}: {err}")

    # ---- the API -------------------------------------------------------------------------
    def read_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """The whole object, or bytes [start, end) of it."""
        loc = parse_uri(uri)
        if start is not None and start < 0 or end is not None and start is not None and end < start:
            raise StorageError(uri, Reason.INVALID_URI, f"bad byte range [{start}, {end})")
        if loc.scheme == "file":
            try:
                with open(loc.path, "rb") as f:
                    if start:
                        f.seek(start)
                    return f.read() if end is None else f.read(end - (start or 0))
            except OSError as err:
                raise self._local_error(loc, err) from err
        kwargs = {}
        if start is not None or end is not None:
            if end is not None and end == (start or 0):
                return b""
            kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        try:
            response = self.client.get_object(Bucket=loc.bucket, Key=loc.key, **kwargs)
            return response["Body"].read()
        except Exception as err:
            raise self._s3_error(loc, err) from err

    def write_bytes(self, uri: str, data: bytes) -> None:
        import io

        self.write_stream(uri, io.BytesIO(data))

    def write_stream(self, uri: str, stream: BinaryIO) -> None:
        """Write a file-like object. Large S3 writes go multipart; nothing partial is visible."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                os.makedirs(os.path.dirname(loc.path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(
                    dir=os.path.dirname(loc.path), prefix=f".{os.path.basename(loc.path)}.tmp-"
                )
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := stream.read(1 << 20):
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, loc.path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            except OSError as err:
                raise self._local_error(loc, err) from err
            return
        from boto3.s3.transfer import TransferConfig

        try:
            self.client.upload_fileobj(
                stream,
                loc.bucket,
                loc.key,
                Config=TransferConfig(
                    multipart_threshold=MULTIPART_THRESHOLD,
                    multipart_chunksize=MULTIPART_THRESHOLD,
                    use_threads=False,
                ),
            )
        except Exception as err:
            cause = getattr(err, "last_exception", None) or getattr(err, "__cause__", None) or err
            raise self._s3_error(loc, cause if isinstance(cause, Exception) else err) from err

    def upload_file(self, local_path: str | os.PathLike, uri: str) -> None:
        with open(local_path, "rb") as f:
            self.write_stream(uri, f)

    def download_file(self, uri: str, local_path: str | os.PathLike) -> None:
        """Copy an object to a local file, atomically."""
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        loc = parse_uri(uri)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
        os.close(fd)
        try:
            if loc.scheme == "file":
                import shutil

                try:
                    shutil.copyfile(loc.path, tmp)
                except OSError as err:
                    raise self._local_error(loc, err) from err
            else:
                try:
                    self.client.download_file(loc.bucket, loc.key, tmp)
                except Exception as err:
                    raise self._s3_error(loc, err) from err
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def stat(self, uri: str) -> dict:
        """{"size": bytes, "etag": str}: what identifies a version of an object."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                st = os.stat(loc.path)
            except OSError as err:
                raise self._local_error(loc, err) from err
            if not os.path.isfile(loc.path):
                raise StorageError(uri, Reason.NOT_FOUND, f"not a file: {loc.path}")
            return {"size": st.st_size, "etag": f"{st.st_size:x}-{st.st_mtime_ns:x}"}
        try:
            head = self.client.head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as err:
            raise self._s3_error(loc, err) from err
        return {"size": head["ContentLength"], "etag": head["ETag"].strip('"')}

    def exists(self, uri: str) -> bool:
        try:
            self.stat(uri)
            return True
        except StorageError as err:
            if err.reason is Reason.NOT_FOUND:
                return False
            raise

    def list(self, prefix_uri: str) -> list[str]:
        """Every object under a prefix (recursively), as URIs in sorted order."""
        loc = parse_uri(prefix_uri)
        if loc.scheme == "file":
            root = Path(loc.path)
            form = "file://{}" if prefix_uri.startswith("file://") else "{}"
            if root.is_file():
                return [form.format(root)]
            if not root.exists():
                return []
            return sorted(
                form.format(p) for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name
            )
        out: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                out.extend(
                    f"s3://{loc.bucket}/{obj['Key']}"
                    for obj in page.get("Contents", [])
                    # zero-byte "directory" markers (pyarrow's create_dir writes them) are no files
                    if not obj["Key"].endswith("/")
                )
        except Exception as err:
            raise self._s3_error(loc, err) from err
        return sorted(out)

    def delete(self, uri: str) -> None:
        """Delete one object. Deleting something that is not there is an error."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                os.remove(loc.path)
            except OSError as err:
                raise self._local_error(loc, err) from err
            return
        self.stat(uri)  # S3 deletes of missing keys succeed silently; we say so instead
        try:
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as err:
            raise self._s3_error(loc, err) from err

    def put_dir(self, local_dir: str | os.PathLike, uri: str) -> list[str]:
        """Upload every file under a local directory to `uri/<relative path>`."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(str(root), Reason.NOT_FOUND, "not a directory")
        written = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            target = join(uri, path.relative_to(root).as_posix())
            self.upload_file(path, target)
            written.append(target)
        return written

    def fetch_dir(self, uri: str, cache_root: str | os.PathLike | None = None) -> Path:
        """A local directory holding everything under `uri` (a model dir, say).

        Local URIs are returned as they are. Remote ones are downloaded into a cache keyed by
        the URI and the objects' etags, so an unchanged directory is fetched once and a changed
        one is fetched again.
        """
        import hashlib

        loc = parse_uri(uri)
        if loc.scheme == "file":
            if not os.path.isdir(loc.path):
                raise StorageError(uri, Reason.NOT_FOUND, f"no such directory: {loc.path}")
            return Path(loc.path)
        prefix = uri.rstrip("/") + "/"
        objects = self.list(prefix)
        if not objects:
            raise StorageError(uri, Reason.NOT_FOUND, "no objects under this prefix")
        etags = "".join(f"{o}={self.stat(o)['etag']};" for o in objects)
        digest = hashlib.sha256(etags.encode()).hexdigest()[:16]
        cache = Path(cache_root or os.environ.get("DAMO_CACHE", Path.home() / ".cache" / "damo"))
        target = cache / "dirs" / f"{loc.bucket}-{loc.key.strip('/').replace('/', '_')}-{digest}"
        if (target / ".complete").exists():
            return target
        for obj in objects:
            self.download_file(obj, target / obj[len(prefix) :])
        (target / ".complete").touch()
        return target

    def pyarrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, path) for pyarrow / Ray Data. The filesystem pickles to workers."""
        import pyarrow.fs as pafs

        loc = parse_uri(uri)
        if loc.scheme == "file":
            return pafs.LocalFileSystem(), loc.path
        endpoint = urlparse(self.s3.endpoint_url) if self.s3.endpoint_url else None
        fs = pafs.S3FileSystem(
            access_key=self.s3.access_key_id,
            secret_key=self.s3.secret_access_key,
            region=self.s3.region,
            endpoint_override=endpoint.netloc if endpoint else None,
            scheme=endpoint.scheme if endpoint else "https",
            connect_timeout=self.s3.connect_timeout_s,
            request_timeout=self.s3.read_timeout_s,
        )
        return fs, fs_path(uri)

    def parquet_files(self, prefix_uri: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
        """(filesystem, paths in it) of every Parquet file under a prefix; no paths if none.

        One filesystem serves all the files, for `pyarrow.dataset` and `ray.data.read_parquet`.
        """
        fs, _ = self.pyarrow_filesystem(prefix_uri)
        prefix = prefix_uri.rstrip("/") + "/"
        paths = [fs_path(uri) for uri in self.list(prefix) if uri.endswith(".parquet")]
        return fs, paths


def fs_path(uri: str) -> str:
    """A URI as a path in its pyarrow filesystem: local paths as they are, "bucket/key" on S3."""
    loc = parse_uri(uri)
    return loc.path if loc.scheme == "file" else f"{loc.bucket}/{loc.key}".rstrip("/")


def is_allowed(uri: str, prefixes: list[str]) -> bool:
    """True only when `uri` lies inside one of the allowed prefixes.

    Local paths are compared after resolving symlinks, so a link inside an allowed root that
    points outside it is refused. Any `..` segment is refused outright, for S3 keys too (S3
    does not normalise them, but proxies and downstream local caches might).
    """
    try:
        loc = parse_uri(uri)
    except StorageError:
        return False
    raw_path = urlparse(uri).path if "://" in uri else uri
    if ".." in Path(unquote(raw_path)).parts or ".." in loc.key.split("/"):
        return False
    for prefix in prefixes:
        try:
            allowed = parse_uri(prefix)
        except StorageError:
            continue
        if allowed.scheme != loc.scheme:
            continue
        if loc.scheme == "s3":
            if loc.bucket != allowed.bucket:
                continue
            root = allowed.key.rstrip("/")
            if not root or loc.key == root or loc.key.startswith(root + "/"):
                return True
        else:
            real = os.path.realpath(loc.path)
            root = os.path.realpath(allowed.path)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return True
    return False
