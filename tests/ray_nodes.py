"""A multi-node Ray cluster on one machine, for tests: `python tests/ray_nodes.py SPEC.json`.

Each node is a separate raylet with its own HOME, TMPDIR and DAMO_CACHE (from the spec), so a
path that one node writes and another expects to read is simply not there. The script prints
one JSON line ({"address", "nodes": [{"node_id", "home"}]}) once every node is up, then keeps
the cluster alive until its stdin closes, and shuts it down.

Run it with RAY_TMPDIR set to a private directory: the head writes Ray's "current cluster"
file there, where no other `ray.init()` on the machine will find it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_node(cluster, node: dict, attempts: int = 3):
    """Ray gives a raylet a fixed 30 s to register; on a loaded 2-core machine that is not
    always enough, so a node that timed out is started again."""
    for attempt in range(1, attempts + 1):
        try:
            return cluster.add_node(
                num_cpus=node["num_cpus"],
                object_store_memory=node["object_store_mb"] * 1024 * 1024,
                env_vars=node["env"],
                include_dashboard=False,
                node_ip_address="127.0.0.1",
            )
        except Exception as err:  # Ray raises a bare Exception for the startup timeout
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            print(f"node start timed out (attempt {attempt}), retrying", file=sys.stderr)


def main(spec_path: str) -> None:
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    cluster = Cluster(shutdown_at_exit=True)
    nodes = []
    try:
        for node in spec["nodes"]:
            started = add_node(cluster, node)
            nodes.append({"node_id": started.node_id, "home": node["env"]["HOME"]})
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        sys.stdin.read()  # the test closes our stdin when it is done with the cluster
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
