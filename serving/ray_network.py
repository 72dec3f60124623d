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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LOCAL_ONLY_ENV", "keep_replica_servers_on_loopback", "local_only_ray"]

#: Ray's switch for local-only nodes ("0": clusters off, node address 127.0.0.1).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def local_only_ray() -> Iterator[None]:
    """Around ``ray.init`` (and the first ``import ray``): the Ray it starts, and every process that Ray
    starts, binds loopback only; a driver joining a local-only Ray joins it as one.

    The switch is set in this process's environment while the block runs, so the processes Ray spawns
    inherit it (the raylet passes it on to the workers it starts later); afterwards this process is as
    before, and a later Ray started here (another test, a notebook) is not affected.
    """
    previous = os.environ.get(LOCAL_ONLY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOCAL_ONLY_ENV] = "0"
    if constants is not None:  # Ray read the variable when it was imported
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = previous
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            default = not getattr(constants, "IS_WINDOWS_OR_OSX", False)
            if before is None:  # Ray was first imported inside the block: what it would have read
                before = default if previous is None else previous.lower() in ("1", "true")
            constants.ENABLE_RAY_CLUSTER = before  # type: ignore[attr-defined]


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
