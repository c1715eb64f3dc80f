"""A `ray start` hook for clusters whose nodes are all this one machine, on 127.0.0.1 only.

Ray keeps a node on loopback (its servers bind 127.0.0.1, not every interface) only when its node IP is
127.0.0.1 and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. But `ray start --address` (a worker node) then refuses
to run ("Multi-node Ray clusters are not supported on Windows and OSX"), and with the variable at 1 it
rewrites 127.0.0.1, in --address and --node-ip-address, to the machine's routable address, where the
loopback-bound head does not answer. Ray calls the function named by RAY_START_HOOK inside `ray start`
after it parsed its flags and before that check; on a worker this one lets the check pass and keeps
127.0.0.1 as given. The processes the worker starts inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and bind
loopback like the head's.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=tests RAY_START_HOOK=_ray_loopback.join_on_loopback \\
        ray start --address 127.0.0.1:PORT --node-ip-address 127.0.0.1 ...

Test scaffolding only: a real cluster's nodes have routable addresses and need none of this.
"""
from __future__ import annotations

from typing import Any


def join_on_loopback(ray_params: Any, head: bool) -> None:
    if head:
        return
    from ray._private import ray_constants, services

    services.resolve_ip_for_localhost = lambda host: host  # 127.0.0.1 is the head: it is this machine
    ray_params.node_ip_address = "127.0.0.1"
    ray_constants.ENABLE_RAY_CLUSTER = True  # the check that refuses a worker node; read after this hook
