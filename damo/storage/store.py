"""One small storage API over plain paths, `file://` URIs and `s3://bucket/key` URIs.

Every failure raises `StorageError`, whose message names the URI and the cause and whose
`reason` is machine-readable (see `Reason`). Writes are atomic: a local write goes to a temp
file that is renamed into place; an S3 object (single or multipart upload) only becomes visible
when the upload completes.
"""

from __future__ import annotations

import datetime
import enum
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

from pydantic import SecretStr

from damo.config.schema import S3Config, StorageConfig

if TYPE_CHECKING:
    import pyarrow.fs

MULTIPART_THRESHOLD = 8 * 1024 * 1024
COMPLETE_MARKER = ".complete"  # in a fetched directory: every object is there
ETAGS_FILE = ".etags.json"  # in a fetched directory: relative key -> etag


class Reason(enum.StrEnum):
    UNKNOWN_SCHEME = "unknown_scheme"
    INVALID_URI = "invalid_uri"
    NOT_FOUND = "not_found"
    NO_BUCKET = "no_bucket"
    AUTH = "bad_credentials"
    PERMISSION = "permission_denied"
    UNREACHABLE = "unreachable"
    NOT_ALLOWED = "not_allowed"
    IO = "io_error"


class StorageError(Exception):
    """A storage operation failed. `uri` and `reason` say where and why."""

    def __init__(self, uri: str, reason: Reason, detail: str):
        self.uri = uri
        self.reason = reason
        self.detail = detail
        super().__init__(f"{uri}: {reason.value}: {detail}")

    def __reduce__(self):  # a worker's error reaches the driver through pickle intact
        return StorageError, (self.uri, self.reason, self.detail)


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
    """Fill an unset endpoint (DAMO_S3_ENDPOINT, AWS_ENDPOINT_URL) and region (AWS_REGION,
    AWS_DEFAULT_REGION) from the environment.

    Credentials are deliberately not copied: with no key configured, boto3 and pyarrow each
    use the default AWS credential chain, which knows session tokens, profiles, SSO and
    instance roles and refreshes temporary credentials on long runs.
    """
    cfg = base or S3Config()
    return cfg.model_copy(
        update={
            "endpoint_url": cfg.endpoint_url
            or os.environ.get("DAMO_S3_ENDPOINT")
            or os.environ.get("AWS_ENDPOINT_URL"),
            "region": cfg.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION"),
        }
    )


@dataclass(frozen=True)
class Credentials:
    """Explicit keys, or all None for the default credential chain. Kept in memory only."""

    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def explicit_credentials(s3: S3Config) -> Credentials:
    """The configured keys (with their session token), or empty ones meaning "use the chain"."""
    if not s3.access_key_id and s3.secret_access_key is None:
        return Credentials()
    if not s3.access_key_id or s3.secret_access_key is None:
        missing = "secret_access_key" if s3.access_key_id else "access_key_id"
        raise StorageError(
            "storage.s3",
            Reason.AUTH,
            f"storage.s3.{missing} is not set while the other key is (a redacted config dump "
            "read back has no secret); set both, or neither to use the AWS credential chain",
        )
    token = _reveal(s3.session_token)
    if token is None and os.environ.get("AWS_ACCESS_KEY_ID") == s3.access_key_id:
        token = os.environ.get("AWS_SESSION_TOKEN")  # the env's token belongs to the env's key
    return Credentials(s3.access_key_id, _reveal(s3.secret_access_key), token)


def _reveal(secret: SecretStr | str | None) -> str | None:
    # `model_copy(update=...)` skips validation, so a plain str may sit where a SecretStr goes
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what a listing already says, so nobody has to HEAD it again."""

    uri: str
    size: int
    etag: str


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
    "PreconditionFailed": Reason.IO,  # a pinned download: the object changed since listed
}


def _fast_timestamp(value: str) -> datetime.datetime:
    """ISO 8601 timestamps (a listing has one per object) via the C parser; anything else
    (HTTP dates) via botocore's own. botocore's default, dateutil, takes ~75% of the time of
    listing 1,000 objects."""
    from botocore.utils import parse_timestamp

    try:
        return datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)


def _botocore_session():
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_fast_timestamp
    )
    return session


# A bucket's region is fixed for its life: resolve it once per process (endpoint, bucket).
_BUCKET_REGIONS: dict[tuple[str | None, str], str] = {}
_BUCKET_REGIONS_LOCK = threading.Lock()


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

            creds = explicit_credentials(self.s3)
            self._client = boto3.session.Session(botocore_session=_botocore_session()).client(
                "s3",
                endpoint_url=self.s3.endpoint_url,
                region_name=self.s3.region,  # None: the profile's region, else us-east-1
                aws_access_key_id=creds.access_key_id,
                aws_secret_access_key=creds.secret_access_key,
                aws_session_token=creds.session_token,
                config=Config(
                    connect_timeout=self.s3.connect_timeout_s,
                    read_timeout=self.s3.read_timeout_s,
                    retries={"max_attempts": self.s3.max_attempts, "mode": "standard"},
                    s3={"addressing_style": self.s3.addressing_style},
                    signature_version="s3v4",
                ),
            )
        return self._client

    def bucket_region(self, bucket: str) -> str:
        """The region a bucket lives in (its `x-amz-bucket-region`), else the configured one.

        boto3 follows S3's region redirects by itself; pyarrow does not, and a bucket in
        another region then fails with a 301. Resolved once per process and bucket.
        """
        cache_key = (self.s3.endpoint_url, bucket)
        if cache_key in _BUCKET_REGIONS:
            return _BUCKET_REGIONS[cache_key]
        from botocore.exceptions import ClientError

        region = None
        try:
            head = self.client.head_bucket(Bucket=bucket)
            region = head["ResponseMetadata"]["HTTPHeaders"].get("x-amz-bucket-region")
            known = True  # the bucket answered: whatever it said (or not) holds from now on
        except ClientError as err:  # a 301 or 403 still names the region
            headers = err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            region = headers.get("x-amz-bucket-region")
            known = region is not None
        except StorageError:
            raise
        except Exception:  # unreachable, no credentials, ...: the operation itself will say
            known = False
        region = region or self.s3.region or "us-east-1"
        if known:
            with _BUCKET_REGIONS_LOCK:
                _BUCKET_REGIONS[cache_key] = region
        return region

    def _s3_error(self, loc: Location, err: Exception) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        if isinstance(err, StorageError):  # ours already (e.g. half-configured keys)
            return StorageError(err.uri, err.reason, err.detail)
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
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                loc.uri,
                Reason.AUTH,
                f"no usable S3 credentials (storage.s3 keys or the AWS credential chain): {err}",
            )
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
        region = self.s3.region
        try:
            if region and region != "us-east-1":  # S3 wants other regions spelled out
                self.client.create_bucket(
                    Bucket=loc.bucket, CreateBucketConfiguration={"LocationConstraint": region}
                )
            else:
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
        try:
            with open(local_path, "rb") as f:
                self.write_stream(uri, f)
        except OSError as err:  # opening or reading the local file
            raise self._local_error(parse_uri(os.fspath(local_path)), err) from err

    def download_file(
        self, uri: str, local_path: str | os.PathLike, listed: ObjectInfo | None = None
    ) -> None:
        """Copy an object to a local file, atomically.

        With `listed` (from `list_objects`) no HEAD request is made, and the download is
        pinned to the listed version: if the object changed since, it fails rather than mix.
        """
        target = Path(local_path)
        loc = parse_uri(uri)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
            os.close(fd)
        except OSError as err:
            raise self._local_error(parse_uri(str(target)), err) from err
        try:
            if loc.scheme == "file":
                import shutil

                try:
                    shutil.copyfile(loc.path, tmp)
                except OSError as err:
                    raise self._local_error(loc, err) from err
            else:
                try:
                    self._s3_download(loc, tmp, listed)
                except Exception as err:
                    raise self._s3_error(loc, err) from err
            try:
                os.replace(tmp, target)
            except OSError as err:
                raise self._local_error(parse_uri(str(target)), err) from err
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _s3_download(self, loc: Location, tmp: str, listed: ObjectInfo | None) -> None:
        from boto3.s3.transfer import TransferConfig
        from s3transfer.manager import TransferManager
        from s3transfer.subscribers import BaseSubscriber

        class KnownObject(BaseSubscriber):
            """The size and etag are known: no HEAD, and the etag is every GET's IfMatch."""

            def on_queued(self, future, **_):
                future.meta.provide_transfer_size(listed.size)
                future.meta.provide_object_etag(f'"{listed.etag}"')

        subscribers = [KnownObject()] if listed is not None else None
        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=4,
        )
        with TransferManager(self.client, config) as manager:
            manager.download(loc.bucket, loc.key, tmp, subscribers=subscribers).result()

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
        return [info.uri for info in self.list_objects(prefix_uri)]

    def list_objects(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object under a prefix with its size and etag, sorted by URI.

        One paginated listing (1,000 objects a request on S3), no request per object. Temp
        files of unfinished local writes and S3 "directory" markers are left out. A local
        file's etag is its size and mtime, the same as `stat` gives.
        """
        loc = parse_uri(prefix_uri)
        if loc.scheme == "file":
            form = "file://{}" if prefix_uri.startswith("file://") else "{}"
            try:
                root = Path(loc.path)
                if root.is_file():
                    paths = [root]
                elif not root.exists():
                    return []
                else:
                    paths = [p for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name]
                out = []
                for path in paths:
                    try:
                        st = path.stat()
                    except FileNotFoundError:  # removed since the walk saw it
                        continue
                    etag = f"{st.st_size:x}-{st.st_mtime_ns:x}"
                    out.append(ObjectInfo(form.format(path), st.st_size, etag))
            except OSError as err:
                raise self._local_error(loc, err) from err
            return sorted(out, key=lambda info: info.uri)
        out = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                out.extend(
                    ObjectInfo(
                        f"s3://{loc.bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"')
                    )
                    for obj in page.get("Contents", [])
                    # zero-byte "directory" markers (pyarrow's create_dir writes them) are no files
                    if not obj["Key"].endswith("/")
                )
        except Exception as err:
            raise self._s3_error(loc, err) from err
        return sorted(out, key=lambda info: info.uri)

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
        try:
            paths = sorted(p for p in root.rglob("*") if p.is_file())
        except OSError as err:
            raise self._local_error(parse_uri(str(root)), err) from err
        written = []
        for path in paths:
            target = join(uri, path.relative_to(root).as_posix())
            self.upload_file(path, target)
            written.append(target)
        return written

    def fetch_dir(self, uri: str, cache_root: str | os.PathLike | None = None) -> Path:
        """A local directory holding everything under `uri` (a model dir, say).

        Local URIs are returned as they are. Remote ones go to a per-node cache (`cache_root`,
        else $DAMO_CACHE, else ~/.cache/damo) shared by every process on the node: a file lock
        lets one process download while the others wait, and each version of the directory
        (keyed by the listed etags) is a complete, never-modified folder. An object whose etag
        is unchanged since an older version is hard-linked, not downloaded again.

        Keys that would land outside the folder (`..`, empty or absolute segments) are refused.
        """
        import hashlib
        import json

        from filelock import FileLock

        loc = parse_uri(uri)
        if loc.scheme == "file":
            if not os.path.isdir(loc.path):
                raise StorageError(uri, Reason.NOT_FOUND, f"no such directory: {loc.path}")
            return Path(loc.path)
        prefix = uri.rstrip("/") + "/"
        objects = self.list_objects(prefix)
        if not objects:
            raise StorageError(uri, Reason.NOT_FOUND, "no objects under this prefix")
        etags = {_relative_key(prefix, info.uri): info.etag for info in objects}
        digest = hashlib.sha256(json.dumps(etags, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_root or os.environ.get("DAMO_CACHE") or Path.home() / ".cache" / "damo")
        name = f"{loc.bucket}-{loc.key.strip('/').replace('/', '_')}"[:80]
        home = cache / "dirs" / f"{name}-{hashlib.sha256(prefix.encode()).hexdigest()[:8]}"
        target = home / digest
        if (target / COMPLETE_MARKER).exists():  # versions never change once complete
            return target
        try:
            home.mkdir(parents=True, exist_ok=True)
            with FileLock(str(home) + ".lock"):
                if (target / COMPLETE_MARKER).exists():
                    return target
                self._fill_version(home, target, prefix, objects, etags)
        except OSError as err:
            raise StorageError(
                uri, Reason.IO, f"cache {home}: {type(err).__name__}: {err}"
            ) from err
        return target

    def _fill_version(
        self, home: Path, target: Path, prefix: str, objects: list[ObjectInfo], etags: dict
    ) -> None:
        """Build `target` in a staging folder (links to unchanged files, downloads for the
        rest), then rename it into place. Runs under the directory's lock."""
        import json
        import shutil

        reusable: dict[tuple[str, str], Path] = {}  # (relative key, etag) -> a cached copy
        for version in home.iterdir():
            manifest = version / ETAGS_FILE
            if version.name.startswith(".") or not (version / COMPLETE_MARKER).exists():
                continue
            for rel, etag in json.loads(manifest.read_text()).items():
                reusable.setdefault((rel, etag), version / rel)
        staging = home / f".staging-{target.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._stage(staging, prefix, objects, reusable)
            (staging / ETAGS_FILE).write_text(json.dumps(etags, sort_keys=True))
            (staging / COMPLETE_MARKER).touch()
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of a crash
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, staging: Path, prefix: str, objects: list[ObjectInfo], reusable: dict) -> None:
        root = staging.resolve()
        for info in objects:
            rel = _relative_key(prefix, info.uri)
            dest = (staging / rel).resolve()
            if not dest.is_relative_to(root):  # belt and braces after _relative_key
                raise StorageError(info.uri, Reason.INVALID_URI, f"key escapes {staging}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            cached = reusable.get((rel, info.etag))
            if cached is not None:
                try:
                    os.link(cached, dest)
                    continue
                except OSError:  # another filesystem, or links not allowed: download
                    pass
            self.download_file(info.uri, dest, listed=info)

    def pyarrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, path) for pyarrow / Ray Data. The filesystem pickles to workers."""
        import pyarrow.fs as pafs

        loc = parse_uri(uri)
        if loc.scheme == "file":
            return pafs.LocalFileSystem(), loc.path
        endpoint = urlparse(self.s3.endpoint_url) if self.s3.endpoint_url else None
        creds = explicit_credentials(self.s3)
        try:
            fs = pafs.S3FileSystem(
                # all None: pyarrow's own default AWS chain on whichever node unpickles it
                access_key=creds.access_key_id,
                secret_key=creds.secret_access_key,
                session_token=creds.session_token,
                region=self.bucket_region(loc.bucket),
                endpoint_override=endpoint.netloc if endpoint else None,
                scheme=endpoint.scheme if endpoint else "https",
                connect_timeout=self.s3.connect_timeout_s,
                request_timeout=self.s3.read_timeout_s,
            )
        except (OSError, ValueError) as err:
            raise StorageError(
                uri, Reason.IO, f"cannot open pyarrow's S3 filesystem: {err}"
            ) from err
        return fs, fs_path(uri)

    def parquet_files(self, prefix_uri: str) -> tuple[pyarrow.fs.FileSystem, list[str]]:
        """(filesystem, paths in it) of every Parquet file under a prefix; no paths if none.

        One filesystem serves all the files, for `pyarrow.dataset` and `ray.data.read_parquet`.
        """
        fs, _ = self.pyarrow_filesystem(prefix_uri)
        prefix = prefix_uri.rstrip("/") + "/"
        paths = [fs_path(uri) for uri in self.list(prefix) if uri.endswith(".parquet")]
        return fs, paths


def _relative_key(prefix: str, uri: str) -> str:
    """The part of `uri` below `prefix`, refused when it could leave a local folder."""
    rel = uri[len(prefix) :]
    segments = rel.split("/")
    bad = [seg for seg in segments if seg in ("", ".", "..") or "\\" in seg]
    if not rel or bad or rel.startswith("/"):
        raise StorageError(
            uri,
            Reason.INVALID_URI,
            f"key '{rel}' has an empty, '.', '..' or backslash segment and could be written "
            "outside the target folder",
        )
    return rel


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


def require_allowed(uri: str, allowed: StorageConfig | list[str], what: str = "URI") -> str:
    """`uri` itself if it lies under `storage.allowed_prefixes`, else a StorageError with
    reason `not_allowed`. An empty list means no restriction (the default), so the setting
    only takes effect once a deployment lists its prefixes. Call it wherever a user-supplied
    URI enters: CLI options, job arguments, evaluation inputs, Serve requests."""
    prefixes = allowed.allowed_prefixes if isinstance(allowed, StorageConfig) else allowed
    if prefixes and not is_allowed(uri, prefixes):
        raise StorageError(
            uri,
            Reason.NOT_ALLOWED,
            f"{what} is outside storage.allowed_prefixes ({', '.join(prefixes)})",
        )
    return uri
