"""Keeping an embedded Ray on loopback.

Ray binds most of its servers (GCS, raylet, workers' gRPC, agents, the metrics exporter) on the node's
network address or on all interfaces. Ray has one switch that makes a node local-only: the environment
variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, with which ``ray.init`` takes 127.0.0.1 as the node
address (Ray's default on macOS and Windows) and every process it starts binds loopback. One server it
leaves out: Ray Serve starts an inter-deployment gRPC server in each replica on ``[::]``, whatever the node
address; :func:`keep_replica_servers_on_loopback` moves it to 127.0.0.1 on such a node.

``tests/test_exposure.py`` lists the listening sockets of the whole process tree and checks the result.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["LOCAL_ONLY_ENV", "confine_embedded_ray_to_loopback", "keep_replica_servers_on_loopback"]

#: Ray's switch for local-only nodes ("0": clusters off, node address 127.0.0.1).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def confine_embedded_ray_to_loopback() -> None:
    """Before ``ray.init`` starts a local Ray: make it, and every process it starts, bind loopback only.

    Set in this process's environment, so Ray's processes (which inherit it) see it too.
    """
    os.environ[LOCAL_ONLY_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray read the variable when it was imported
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def keep_replica_servers_on_loopback() -> None:
    """In a Serve replica of a local-only node: bind its inter-deployment gRPC server to 127.0.0.1.

    Serve starts that server after the deployment's constructor; this must run before (it is called when
    ``serving.deployments`` is imported, which every replica of the app does first). No effect elsewhere.
    """
    if os.environ.get(LOCAL_ONLY_ENV) != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = replica.add_port_to_grpc_server
    if getattr(original, "_cellsam_loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return int(original(server, address))

    add_port._cellsam_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
