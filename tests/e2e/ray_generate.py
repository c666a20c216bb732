"""generate.py on a local two-node Ray cluster on 127.0.0.1, then the cluster is shut.

    python tests/e2e/ray_generate.py '<json spec>'     (the spec of generate.py)

A head node and one worker node, each its own raylet (process group) declaring one
`vllm_cpu_rank` resource (`vllm_wideep.plugin.ray_cpu`), so a TP=2 run places rank 0
on the head, where the engine runs, and rank 1 on the worker node. Every address is
127.0.0.1. The caller runs this in its own process group (`launch.generate`), so Ray's
processes go with it whatever happens.
"""

import os
import sys
from pathlib import Path


def main() -> None:
    from ray.cluster_utils import Cluster

    from vllm_wideep.plugin.ray_cpu import RAY_CPU_RESOURCE

    node = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": 1,
        "resources": {RAY_CPU_RESOURCE: 1},
        "include_dashboard": False,
    }
    cluster = Cluster()
    try:
        # One core per node: each rank is local rank 0 on its node.
        cluster.add_node(**node, env_vars={"VLLM_CPU_OMP_THREADS_BIND": "0"})  # head: rank 0
        cluster.add_node(**node, env_vars={"VLLM_CPU_OMP_THREADS_BIND": "1"})  # rank 1
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        # Ray rewrites a 127.0.0.1 address to the machine's routable one before it
        # connects (`resolve_ip_for_localhost`), where nothing listens; this keeps the
        # engine's driver on loopback. Real clusters use real addresses and need neither.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        sys.path.insert(0, str(Path(__file__).parent))
        from generate import main as generate

        generate()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
