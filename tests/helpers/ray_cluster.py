"""A Ray cluster of two nodes on this machine, held by this process (`python -m
tests.helpers.ray_cluster HEAD_CPUS OTHER_CPUS`): prints one JSON line {"address", "head",
"other"} (the node ids) once both nodes are up, then holds the cluster until its stdin closes
and shuts it down. The tests run it as a child: Ray's gRPC client threads live and die here,
never in the pytest process (after `Cluster.shutdown()` one of them was left polling a closed
descriptor there, printing an error line per poll)."""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster

STORE_BYTES = 80 * 1024 * 1024  # object store per node: the tests carry no data through Ray


def main(head_cpus: int, other_cpus: int) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "object_store_memory": STORE_BYTES,
            "include_dashboard": False,
        },
    )
    try:
        other = cluster.add_node(num_cpus=other_cpus, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        head = cluster.head_node
        assert head is not None and cluster.address is not None
        print(
            json.dumps({"address": cluster.address, "head": head.node_id, "other": other.node_id})
        )
        sys.stdout.flush()
        sys.stdin.read()  # until the test closes it
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
