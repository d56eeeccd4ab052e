"""Extraction planning identifies inputs by the listing's size and etag: no HEAD per input."""

from __future__ import annotations

import uuid

from damo.data.extract import ListedUri, plan, video_uris
from damo.storage import Storage, join


def count_requests(storage: Storage, operation: str) -> list[int]:
    """A one-item list counting the S3 `operation` requests the storage makes from now on."""
    calls = [0]

    def count(**_):
        calls[0] += 1

    storage.client.meta.events.register(f"before-call.s3.{operation}", count)
    return calls


def test_plan_from_a_listing_needs_no_head(s3_storage, tmp_path):
    root = f"s3://damo-test/{uuid.uuid4().hex}"
    for i in range(30):
        s3_storage.write_bytes(join(root, "videos", f"{i:02d}.mp4"), b"x" * (i + 1))
    s3_storage.write_bytes(join(root, "videos", ".hidden"), b"x")
    heads = count_requests(s3_storage, "HeadObject")
    listings = count_requests(s3_storage, "ListObjectsV2")
    uris = video_uris(s3_storage, join(root, "videos"))
    assert len(uris) == 30 and all(isinstance(u, ListedUri) for u in uris)
    to_decode, errors, skipped = plan(s3_storage, uris, join(root, "out"), "cfg")
    assert (len(to_decode), errors, skipped) == (30, [], 0)
    assert heads[0] == 0
    assert listings[0] <= 3  # the inputs' listing and the (empty) output's shard listings
    # the keys equal those from a HEAD per URI, so runs planned either way skip each other's work
    by_head, _, _ = plan(s3_storage, [str(u) for u in uris], join(root, "out"), "cfg")
    assert heads[0] == 30
    assert [r["key"] for r in by_head] == [r["key"] for r in to_decode]
    assert [r["size"] for r in to_decode] == list(range(1, 31))


def test_plan_mixes_listed_and_single_uris(tmp_path):
    storage = Storage()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "videos").mkdir(exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(b"abc")
    listed = video_uris(storage, str(tmp_path / "videos"))
    single = [str(tmp_path / "videos" / "a.mp4"), str(tmp_path / "missing.mp4")]
    to_decode, errors, _ = plan(storage, [*listed, *single], str(tmp_path / "out"), "cfg")
    assert [r["video_uri"] for r in to_decode] == [str(u) for u in listed]  # a.mp4 once
    assert [e["reason"] for e in errors] == ["not_found"]
    assert all(type(r["video_uri"]) is str for r in to_decode)


def test_listed_uris_pickle_with_their_listing():
    import pickle

    from damo.storage import ObjectInfo

    listed = ListedUri(ObjectInfo("s3://b/k.mp4", 3, "abc"))
    copy = pickle.loads(pickle.dumps(listed))
    assert (type(copy), copy, copy.size, copy.etag) == (ListedUri, listed, 3, "abc")
    assert copy == "s3://b/k.mp4" and hash(copy) == hash("s3://b/k.mp4")
