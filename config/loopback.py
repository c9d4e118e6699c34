"""Keep a local cluster's Serve replicas off the network.

Ray Serve 2.60 starts, in every replica, the gRPC server that handle calls between deployments
use (RAY_SERVE_THROUGHPUT_OPTIMIZED sends them over it), bound to `[::]:0`, hard-coded in
`ray/serve/_private/replica.py`. On a single-node cluster (the launcher's, whose node address is
127.0.0.1) callers reach it at 127.0.0.1 only, so listening on every interface merely exposes
it. Each deployment calls `serve_grpc_on_loopback()` in its constructor, which runs before the
replica binds that server; on a multi-node cluster (KubeRay) it changes nothing.
"""

from __future__ import annotations

from typing import Any

_ANY = "[::]:"


def serve_grpc_on_loopback() -> None:
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(
        replica.add_port_to_grpc_server, "_loopback", False
    ):
        return
    bind = replica.add_port_to_grpc_server

    def on_loopback(server: Any, address: str) -> int:
        if address.startswith(_ANY):
            address = "127.0.0.1:" + address[len(_ANY) :]
        return int(bind(server, address))

    on_loopback._loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback
