"""The per-node cache of fetched directories (backbones, checkpoints): one download per object
per node however many workers ask at once, and a changed object (new etag) fetched again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from damo.storage import Storage

FILES = {"config.json": b"{}", "weights.bin": os.urandom(3 * 1024 * 1024), "sub/tok.txt": b"t"}


def counted_storage(s3_server) -> tuple[Storage, list[int]]:
    """A fresh Storage (own client) and a counter of its GetObject requests."""
    storage = Storage(s3_server.s3_config())
    gets = [0]
    lock = threading.Lock()

    def count(**_):
        with lock:
            gets[0] += 1

    storage.client.meta.events.register("before-call.s3.GetObject", count)
    return storage, gets


def put_model(storage: Storage, root: str) -> None:
    for name, data in FILES.items():
        storage.write_bytes(f"{root}/{name}", data)


def test_concurrent_fetches_download_each_object_once(s3_server, s3_storage, tmp_path):
    root = f"s3://damo-test/{uuid.uuid4().hex}/backbone"
    put_model(s3_storage, root)
    cache = tmp_path / "node-cache"
    workers = [counted_storage(s3_server) for _ in range(4)]
    start = threading.Barrier(len(workers))

    def fetch(worker):
        storage, _ = worker
        start.wait()  # all four ask at the same moment
        return storage.fetch_dir(root, cache_root=cache)

    with ThreadPoolExecutor(len(workers)) as pool:
        paths = list(pool.map(fetch, workers))
    assert len(set(paths)) == 1
    assert sum(gets[0] for _, gets in workers) == len(FILES)  # one GET per object, in all
    for name, data in FILES.items():
        assert (paths[0] / name).read_bytes() == data
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".staging")]

    # a new version of one object: only that one is downloaded; the rest are linked
    s3_storage.write_bytes(f"{root}/weights.bin", b"new weights")
    storage, gets = counted_storage(s3_server)
    updated = storage.fetch_dir(root, cache_root=cache)
    assert updated != paths[0] and gets[0] == 1
    assert (updated / "weights.bin").read_bytes() == b"new weights"
    assert (paths[0] / "weights.bin").read_bytes() == FILES["weights.bin"]  # old one intact
    assert os.path.samefile(updated / "config.json", paths[0] / "config.json")
    assert storage.fetch_dir(root, cache_root=cache) == updated and gets[0] == 1


FETCH_IN_A_PROCESS = """
import json, sys, threading
from damo.storage import Storage
storage = Storage()
gets = [0]
storage.client.meta.events.register(
    "before-call.s3.GetObject", lambda **_: gets.__setitem__(0, gets[0] + 1)
)
sys.stdin.readline()  # start together
path = storage.fetch_dir(sys.argv[1], cache_root=sys.argv[2])
print(json.dumps({"path": str(path), "gets": gets[0]}))
"""


def test_processes_on_a_node_share_one_copy(s3_server, s3_storage, tmp_path):
    """Separate worker processes, credentials from the environment as on a cluster node."""
    root = f"s3://damo-test/{uuid.uuid4().hex}/backbone"
    put_model(s3_storage, root)
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_IN_A_PROCESS, root, str(tmp_path / "cache")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    try:
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert len({r["path"] for r in results}) == 1
    assert sum(r["gets"] for r in results) == len(FILES)
