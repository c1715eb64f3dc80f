"""ray_cluster.yaml's node types as a config for Ray's fake multi-node provider: the autoscaler on one machine.

    python cluster/fake_cluster.py ray_cluster.yaml fake_cluster.yaml --port 6399
    RAY_FAKE_CLUSTER=1 ray start --head --port 6399 --num-cpus 0 --autoscaling-config fake_cluster.yaml ...

Ray's `fake_multinode` provider (ray/autoscaler/_private/fake_multi_node) launches each "node" the
autoscaler asks for as one more raylet on this machine, inside the head's autoscaler process, so the
real autoscaler (its demand-based node-type choice, min/max workers, idle timeout) runs against the real
node types. In Ray 2.60 it works through `ray start --head --autoscaling-config FILE` (not `ray up`),
with RAY_FAKE_CLUSTER=1 in the head's environment.

What is kept from ray_cluster.yaml: every worker node type by name, its GPU count (GPUs here are resource
counts, nothing touches a device), min_workers, max_workers (capped), upscaling_speed, and the head's
CPU 0 (no trial on the head). What is scaled down to fit a laptop: every worker type gets `--cpus` CPUs
(default 1) and a small object store, the cluster at most `--max-workers` nodes at once (default 2), and
`--idle-timeout-minutes` (default 0.1) replaces the 10 minutes a cloud GPU node waits before it goes.
The head type is renamed `ray.head.default`: the fake provider tags its head with that name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

FAKE_HEAD_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_TYPE
OBJECT_STORE_BYTES = 100 * 2**20

# Keys the autoscaler reads from its config file as they are (ray start --autoscaling-config does not fill
# defaults in); the values Ray's own fake_multi_node/example.yaml gives them.
EMPTY = {
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def fake_config(cluster: dict[str, Any], *, gcs_address: str = "127.0.0.1:6379", cpus: float = 1,
                max_workers: int = 2, idle_timeout_minutes: float = 0.1) -> dict[str, Any]:
    """The fake-provider config for a `ray up` cluster config (a dict of ray_cluster.yaml)."""
    types = cluster["available_node_types"]
    head_type = cluster["head_node_type"]
    head_resources = dict(types[head_type].get("resources", {}))
    node_types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": head_resources, "node_config": {}, "max_workers": 0},
    }
    for name, spec in types.items():
        if name == head_type:
            continue
        resources = {k: v for k, v in spec.get("resources", {}).items() if k != "CPU"}
        resources["CPU"] = cpus
        resources["object_store_memory"] = OBJECT_STORE_BYTES
        node_types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": min(int(spec.get("min_workers", 0)), max_workers),
            "max_workers": min(int(spec.get("max_workers", max_workers)), max_workers),
        }
    return {
        "cluster_name": f"{cluster.get('cluster_name', 'ray')}-fake",
        "max_workers": min(int(cluster.get("max_workers", max_workers)), max_workers),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # the provider's nodes join this head (its default is port 6379)
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        **EMPTY,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cluster_yaml", type=Path, help="a `ray up` config, e.g. ray_cluster.yaml")
    p.add_argument("out", type=Path, help="where to write the fake-provider config")
    p.add_argument("--host", default="127.0.0.1", help="the head's address [127.0.0.1]")
    p.add_argument("--port", type=int, default=6379, help="the head's GCS port (ray start --port) [6379]")
    p.add_argument("--cpus", type=float, default=1, help="CPUs of every worker node [1]")
    p.add_argument("--max-workers", type=int, default=2, help="most worker nodes at once [2]")
    p.add_argument("--idle-timeout-minutes", type=float, default=0.1, help="idle node removal [0.1]")
    args = p.parse_args(argv)
    config = fake_config(yaml.safe_load(args.cluster_yaml.read_text()), gcs_address=f"{args.host}:{args.port}",
                         cpus=args.cpus, max_workers=args.max_workers, idle_timeout_minutes=args.idle_timeout_minutes)
    args.out.write_text(f"# Generated by cluster/fake_cluster.py from {args.cluster_yaml}: Ray's fake multi-node "
                        "provider, for `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config`.\n"
                        + yaml.safe_dump(config, sort_keys=False))
    workers = [f"{k} ({v['resources'].get('CPU')} CPU, {v['resources'].get('GPU', 0)} GPU, "
               f"{v['min_workers']}-{v['max_workers']})" for k, v in config["available_node_types"].items()
               if k != FAKE_HEAD_TYPE]
    print(f"wrote {args.out}: head {FAKE_HEAD_TYPE} {config['available_node_types'][FAKE_HEAD_TYPE]['resources']}, "
          f"workers {', '.join(workers)}; idle timeout {args.idle_timeout_minutes:g} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
