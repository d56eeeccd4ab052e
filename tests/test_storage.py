"""The storage contract, against plain paths and against a real SeaweedFS S3 server."""

from __future__ import annotations

import io
import os
import uuid

import pytest

from damo.config.schema import S3Config
from damo.storage import (
    MULTIPART_THRESHOLD,
    Reason,
    Storage,
    StorageError,
    is_allowed,
    join,
    parse_uri,
)


@pytest.fixture(params=["local", "file_uri", "s3"])
def store(request, tmp_path):
    """(storage, a fresh root URI) for each backend."""
    if request.param == "s3":
        storage = request.getfixturevalue("s3_storage")
        return storage, f"s3://damo-test/{uuid.uuid4().hex}"
    root = tmp_path / "store"
    return Storage(), str(root) if request.param == "local" else f"file://{root}"


def test_put_get_exists_stat(store):
    storage, root = store
    uri = join(root, "a", "hello.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello world")
    assert storage.read_bytes(uri) == b"hello world"
    assert storage.exists(uri)
    stat = storage.stat(uri)
    assert stat["size"] == 11 and stat["etag"]


def test_large_multipart_write_and_range_reads(store):
    storage, root = store
    payload = os.urandom(MULTIPART_THRESHOLD + 3 * 1024 * 1024)  # 11 MiB: two parts on S3
    uri = join(root, "big.bin")
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    assert storage.read_bytes(uri, 1000, 1100) == payload[1000:1100]
    assert storage.read_bytes(uri, len(payload) - 10) == payload[-10:]
    assert storage.read_bytes(uri, 5, 5) == b""
    if root.startswith("s3://"):  # a multipart upload's ETag is "<md5 of md5s>-<parts>"
        assert storage.stat(uri)["etag"].endswith("-2")


def test_list_is_recursive_and_sorted(store):
    storage, root = store
    for name in ("b/2.txt", "a/1.txt", "b/c/3.txt"):
        storage.write_bytes(join(root, name), name.encode())
    listed = storage.list(root + "/")
    assert [uri[len(root) + 1 :] for uri in listed] == ["a/1.txt", "b/2.txt", "b/c/3.txt"]
    assert storage.list(join(root, "nothing-here") + "/") == []


def test_delete_then_missing(store):
    storage, root = store
    uri = join(root, "gone.txt")
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    assert not storage.exists(uri)
    for operation in (storage.read_bytes, storage.stat, storage.delete):
        with pytest.raises(StorageError) as err:
            operation(uri)
        assert err.value.reason is Reason.NOT_FOUND
        assert uri in str(err.value)


class Exploding(io.RawIOBase):
    """Yields `fail_after` bytes then fails, as a dropped upload would."""

    def __init__(self, fail_after: int):
        self.sent = 0
        self.fail_after = fail_after

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.sent >= self.fail_after:
            raise OSError("connection lost")
        n = min(len(buffer), 1024 * 1024)
        buffer[:n] = b"\1" * n
        self.sent += n
        return n


def raw_objects(storage: Storage, root: str) -> list[str]:
    """Everything stored under `root`, temp objects and unfinished uploads included
    (`Storage.list` hides `.tmp-` files, so it cannot be the judge here)."""
    loc = parse_uri(root)
    if loc.scheme == "file":
        return sorted(
            os.path.relpath(os.path.join(d, f), loc.path)
            for d, _, files in os.walk(loc.path)
            for f in files
        )
    prefix = loc.key + "/"
    listed = storage.client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix)
    keys = [o["Key"][len(prefix) :] for o in listed.get("Contents", [])]
    uploads = storage.client.list_multipart_uploads(Bucket=loc.bucket, Prefix=prefix)
    keys += [f"(unfinished upload) {u['Key']}" for u in uploads.get("Uploads", [])]
    return sorted(keys)


@pytest.mark.parametrize("size", ["small", "multipart"])
def test_failed_write_leaves_nothing_visible(store, size):
    storage, root = store
    uri = join(root, "partial.bin")
    fail_after = 10 * 1024 * 1024 if size == "multipart" else 512 * 1024
    with pytest.raises(StorageError) as err:
        storage.write_stream(uri, io.BufferedReader(Exploding(fail_after)))
    assert uri in str(err.value)
    assert not storage.exists(uri)
    assert raw_objects(storage, root) == []


@pytest.mark.parametrize("size", ["small", "multipart"])
def test_failed_overwrite_keeps_the_old_object(store, size):
    storage, root = store
    uri = join(root, "model.bin")
    storage.write_bytes(uri, b"old version")
    fail_after = 10 * 1024 * 1024 if size == "multipart" else 512 * 1024
    with pytest.raises(StorageError):
        storage.write_stream(uri, io.BufferedReader(Exploding(fail_after)))
    assert storage.read_bytes(uri) == b"old version"
    assert raw_objects(storage, root) == ["model.bin"]


def test_local_failures_are_storage_errors(tmp_path):
    """Every operation turns an OSError into a StorageError that names the place."""
    storage = Storage()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    (tmp_path / "a-dir").mkdir()
    src = tmp_path / "src.txt"
    src.write_bytes(b"data")
    under_file = str(blocker / "below")
    operations = {
        "read a directory": lambda: storage.read_bytes(str(tmp_path / "a-dir")),
        "read a missing file": lambda: storage.read_bytes(str(tmp_path / "missing")),
        "write below a file": lambda: storage.write_bytes(under_file + "/x", b"x"),
        "write onto a directory": lambda: storage.write_bytes(str(tmp_path / "a-dir"), b"x"),
        "stat below a file": lambda: storage.stat(under_file),
        "list below a file": lambda: storage.list(under_file + "/x"),
        "delete a directory": lambda: storage.delete(str(tmp_path / "a-dir")),
        "upload a missing file": lambda: storage.upload_file(tmp_path / "nope", under_file),
        "upload below a file": lambda: storage.upload_file(src, under_file + "/x"),
        "download to below a file": lambda: storage.download_file(str(src), under_file + "/x"),
        "download a missing file": lambda: storage.download_file(
            str(tmp_path / "nope"), tmp_path / "out"
        ),
        "put a missing dir": lambda: storage.put_dir(tmp_path / "nope", under_file),
        "put a dir below a file": lambda: storage.put_dir(tmp_path / "a-dir-2", under_file),
        "fetch a missing dir": lambda: storage.fetch_dir(str(tmp_path / "nope")),
        "parquet files below a file": lambda: storage.parquet_files(under_file),
    }
    (tmp_path / "a-dir-2").mkdir()
    (tmp_path / "a-dir-2" / "f.txt").write_bytes(b"f")
    for what, operation in operations.items():
        try:
            operation()
        except StorageError as err:
            assert str(tmp_path) in str(err), what
        except Exception as err:  # noqa: BLE001 (the test is that nothing else escapes)
            pytest.fail(f"{what}: raised {type(err).__name__}, not StorageError: {err}")
        else:
            # listing a prefix that cannot exist finds nothing, which is no error
            if what not in ("list below a file", "parquet files below a file"):
                pytest.fail(f"{what}: did not fail")


def test_s3_failures_are_storage_errors(s3_server, s3_storage, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    root = f"s3://damo-test/{uuid.uuid4().hex}"
    s3_storage.write_bytes(root + "/obj", b"x")
    operations = {
        "download to below a file": lambda: s3_storage.download_file(root + "/obj", blocker / "x"),
        "download a missing object": lambda: s3_storage.download_file(
            root + "/missing", tmp_path / "out"
        ),
        "fetch into a cache below a file": lambda: s3_storage.fetch_dir(root, blocker / "c"),
        "fetch a missing prefix": lambda: s3_storage.fetch_dir(root + "/missing", tmp_path),
        "list a missing bucket": lambda: s3_storage.list("s3://no-such-bucket-here/x/"),
        "delete a missing object": lambda: s3_storage.delete(root + "/missing"),
        "put_dir with a wrong secret": lambda: Storage(
            s3_server.s3_config().model_copy(update={"secret_access_key": "wrong"})
        ).put_dir(tmp_path, root + "/dir"),
    }
    for what, operation in operations.items():
        with pytest.raises(StorageError):
            operation()
            pytest.fail(f"{what}: did not fail")
    assert not list(tmp_path.glob(".out.tmp-*"))  # a failed download leaves no temp file


def test_download_and_dirs(store, tmp_path):
    storage, root = store
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\1\2\3")
    written = storage.put_dir(src, join(root, "model"))
    assert len(written) == 2
    local = storage.fetch_dir(join(root, "model"), cache_root=tmp_path / "cache")
    assert (local / "sub" / "w.bin").read_bytes() == b"\1\2\3"
    storage.download_file(join(root, "model", "config.json"), tmp_path / "dl" / "c.json")
    assert (tmp_path / "dl" / "c.json").read_text() == "{}"


def test_pyarrow_filesystem_reads_what_storage_wrote(store):
    storage, root = store
    uri = join(root, "arrow.txt")
    storage.write_bytes(uri, b"via pyarrow")
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"via pyarrow"


# ---- S3 failure modes against the real server --------------------------------------------
def test_wrong_secret_key_is_rejected(s3_server, s3_storage):
    s3_storage.write_bytes("s3://damo-test/secret.txt", b"s")
    bad = Storage(s3_server.s3_config().model_copy(update={"secret_access_key": "wrong"}))
    for operation in (
        lambda: bad.read_bytes("s3://damo-test/secret.txt"),
        lambda: bad.write_bytes("s3://damo-test/other.txt", b"x"),
    ):
        with pytest.raises(StorageError) as err:
            operation()
        assert err.value.reason is Reason.AUTH
        assert "s3://damo-test/" in str(err.value)
    assert not s3_storage.exists("s3://damo-test/other.txt")


def test_missing_bucket(s3_storage):
    with pytest.raises(StorageError) as err:
        s3_storage.read_bytes("s3://no-such-bucket-here/x")
    assert err.value.reason is Reason.NO_BUCKET
    with pytest.raises(StorageError) as err:
        s3_storage.stat("s3://no-such-bucket-here/x")
    assert err.value.reason is Reason.NO_BUCKET
    assert "no-such-bucket-here" in str(err.value)


def test_unreachable_endpoint():
    from damo.storage.s3server import free_ports

    (port,) = free_ports(1)
    storage = Storage(
        S3Config(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="a",
            secret_access_key="b",
            connect_timeout_s=0.5,
            max_attempts=1,
        )
    )
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/key")
    assert err.value.reason is Reason.UNREACHABLE
    assert f"127.0.0.1:{port}" in str(err.value)


def test_access_denied_is_mapped_to_permission():
    from botocore.exceptions import ClientError

    denied = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject"
    )
    error = Storage()._s3_error(parse_uri("s3://b/k"), denied)
    assert error.reason is Reason.PERMISSION and "s3://b/k" in str(error)


def test_unknown_scheme_and_bad_uris():
    for uri, reason in (
        ("gs://b/k", Reason.UNKNOWN_SCHEME),
        ("http://x/y", Reason.UNKNOWN_SCHEME),
        ("s3:///key", Reason.INVALID_URI),
        ("", Reason.INVALID_URI),
        ("file://otherhost/etc", Reason.INVALID_URI),
    ):
        with pytest.raises(StorageError) as err:
            Storage().read_bytes(uri)
        assert err.value.reason is reason, uri


# ---- allow-list --------------------------------------------------------------------------
def test_is_allowed_s3_prefixes():
    prefixes = ["s3://media/videos/"]
    assert is_allowed("s3://media/videos/a.mp4", prefixes)
    assert is_allowed("s3://media/videos/x/y/a.mp4", prefixes)
    assert not is_allowed("s3://media/videos-private/a.mp4", prefixes)
    assert not is_allowed("s3://media/videos/../secrets/a.mp4", prefixes)
    assert not is_allowed("s3://other/videos/a.mp4", prefixes)
    assert is_allowed("s3://open/anything.mp4", ["s3://open"])


def test_is_allowed_local_paths(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "clip.mp4").write_bytes(b"x")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"secret")
    (root / "escape.mp4").symlink_to(outside)
    (root / "inner.mp4").symlink_to(root / "sub" / "clip.mp4")
    prefixes = [str(root)]
    assert is_allowed(str(root / "sub" / "clip.mp4"), prefixes)
    assert is_allowed(f"file://{root}/sub/clip.mp4", prefixes)
    assert is_allowed(str(root / "inner.mp4"), prefixes)
    assert not is_allowed(str(root / "escape.mp4"), prefixes)
    assert not is_allowed(f"{root}/sub/../../outside.mp4", prefixes)
    assert not is_allowed("file:///etc/passwd", prefixes)
    assert not is_allowed("/etc/passwd", prefixes)
    assert not is_allowed(str(tmp_path / "allowed-but-not-really" / "x.mp4"), prefixes)
    assert not is_allowed("s3://bucket/x.mp4", prefixes)
    assert not is_allowed("gopher://x/y", prefixes)
    assert not is_allowed("file:///etc/passwd", [])


def test_directory_markers_are_not_listed_or_fetched(s3_storage, tmp_path):
    root = f"s3://damo-test/{uuid.uuid4().hex}"
    fs, path = s3_storage.pyarrow_filesystem(root + "/dir")
    fs.create_dir(path)  # writes the marker object "dir/"
    s3_storage.write_bytes(root + "/dir/file.txt", b"x")
    assert s3_storage.list(root + "/") == [root + "/dir/file.txt"]
    local = s3_storage.fetch_dir(root + "/dir", cache_root=tmp_path)
    assert (local / "file.txt").read_bytes() == b"x"


# ---- fetch_dir refuses keys that would leave its folder ----------------------------------
@pytest.fixture(scope="module")
def moto_storage():
    """A `Storage` on moto's in-process S3 server, which keeps keys exactly as written."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = Storage(
        S3Config(endpoint_url=f"http://{host}:{port}", access_key_id="a", secret_access_key="b")
    )
    storage.ensure_bucket("s3://traversal")
    yield storage
    server.stop()


@pytest.mark.parametrize("evil", ["/{outside}/x", "../x", "a/../../x", "a//b", "./x", "a/."])
def test_fetch_dir_refuses_keys_that_escape(moto_storage, tmp_path, evil):
    outside = tmp_path / "outside"
    root = f"ckpt-{uuid.uuid4().hex}"
    key = f"{root}/{evil.format(outside=str(outside).lstrip('/'))}"
    moto_storage.client.put_object(Bucket="traversal", Key=f"{root}/ok.txt", Body=b"ok")
    moto_storage.client.put_object(Bucket="traversal", Key=key, Body=b"evil")
    raw = [o["Key"] for o in moto_storage.client.list_objects_v2(Bucket="traversal")["Contents"]]
    assert key in raw  # the server kept the key as written: the check below is what stops it
    cache = tmp_path / "cache"
    with pytest.raises(StorageError) as err:
        moto_storage.fetch_dir(f"s3://traversal/{root}", cache_root=cache)
    assert err.value.reason is Reason.INVALID_URI and key in str(err.value)
    assert not outside.exists() and not (tmp_path / "x").exists()
    written = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert written == []  # nothing at all, not even the good object


def test_relative_key_check_rejects_absolute_and_dot_segments():
    from damo.storage.store import _relative_key

    assert _relative_key("s3://b/p/", "s3://b/p/a/b.txt") == "a/b.txt"
    for bad in ("s3://b/p//etc/passwd", "s3://b/p/../x", "s3://b/p/a\\..\\x", "s3://b/p/"):
        with pytest.raises(StorageError):
            _relative_key("s3://b/p/", bad)


def test_list_objects_gives_size_and_etag(store):
    storage, root = store
    storage.write_bytes(join(root, "d", "a.bin"), b"12345")
    storage.write_bytes(join(root, "d", "b.bin"), b"1")
    listed = storage.list_objects(join(root, "d") + "/")
    assert [(i.uri, i.size) for i in listed] == [
        (join(root, "d", "a.bin"), 5),
        (join(root, "d", "b.bin"), 1),
    ]
    assert [i.etag for i in listed] == [storage.stat(i.uri)["etag"] for i in listed]


def test_fetch_dir_lists_once_and_heads_nothing(s3_storage, tmp_path):
    root = f"s3://damo-test/{uuid.uuid4().hex}"
    for i in range(5):
        s3_storage.write_bytes(f"{root}/m/{i}.bin", bytes([i]))
    heads = [0]
    s3_storage.client.meta.events.register(
        "before-call.s3.HeadObject", lambda **_: heads.__setitem__(0, heads[0] + 1)
    )
    local = s3_storage.fetch_dir(root + "/m", cache_root=tmp_path)
    assert sorted(p.name for p in local.glob("*.bin")) == [f"{i}.bin" for i in range(5)]
    assert heads[0] == 0


def test_a_storage_error_survives_pickling():
    """Ray ships a worker's exception to the driver by pickle."""
    import pickle

    error = StorageError("s3://b/k", Reason.NOT_FOUND, "no such key")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.uri, copy.reason, copy.detail, str(copy)) == (
        error.uri,
        error.reason,
        error.detail,
        str(error),
    )


def test_embedded_server_bucket_capacity_is_its_volume_slots_not_free_disk(s3_server, tmp_path):
    """Every bucket takes a volume slot. weed's default (one slot per GiB free) failed CI's
    later tests with `InternalError` once a session had made a few dozen buckets."""
    import json
    import urllib.request

    from damo.config.schema import EmbeddedS3Config
    from damo.storage.s3server import EmbeddedS3Server

    master = f"http://127.0.0.1:{s3_server.ports['master.port']}/dir/status"
    with urllib.request.urlopen(master, timeout=10) as answer:
        topology = json.load(answer)["Topology"]
    assert topology["Max"] == EmbeddedS3Config().max_volumes

    server = EmbeddedS3Server(EmbeddedS3Config(max_volumes=3), data_dir=str(tmp_path / "weed"))
    storage = Storage(server.start().s3_config().model_copy(update={"max_attempts": 1}))
    try:
        for bucket in ("s3://slot-a", "s3://slot-b", "s3://slot-c"):
            storage.ensure_bucket(bucket)
            storage.write_bytes(f"{bucket}/x", b"x")
        storage.ensure_bucket("s3://slot-d")
        with pytest.raises(StorageError):
            storage.write_bytes("s3://slot-d/x", b"x")
    finally:
        server.stop(timeout_s=5)  # with every slot taken, weed ignores SIGTERM for ~20 s


def test_a_shared_embedded_server_is_stopped_only_by_whoever_started_it(s3_server, tmp_path):
    from damo.storage.s3server import EmbeddedS3Server, pid_alive

    with EmbeddedS3Server(data_dir=s3_server.data_dir).shared() as state:
        assert (state.pid, state.endpoint_url) == (s3_server.pid, s3_server.endpoint_url)
    assert pid_alive(s3_server.pid)  # the session's server is still up
    Storage(s3_server.s3_config()).ensure_bucket("s3://after-sharing")

    server = EmbeddedS3Server(data_dir=str(tmp_path / "weed"))
    with server.shared() as state:  # none runs there: this one starts it, and stops it
        assert pid_alive(state.pid)
        Storage(state.s3_config()).ensure_bucket("s3://while-shared")
    assert not pid_alive(state.pid) and server.running_state() is None
