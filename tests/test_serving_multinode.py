"""The Serve app on a three-node Ray cluster: replicas land on the nodes their custom resources name.

``ray.cluster_utils.Cluster`` starts three raylets on this machine: a head (``ingress_node``), an encoder
node (``encoder_node``) and a decoder node (``decoder_node``). The app is deployed with
``encoder.resources={"encoder_node": 1}`` and ``decoder.resources={"decoder_node": 1}``; a stream of frames
must come out of the OME-Zarr equal to in-process ``segment()``, with each replica on its node. The
ingress has no resources setting in ``ServiceConfig`` and is left free to run on any node.

One cluster and one application for the whole module (starting three raylets takes tens of seconds).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.zarr_sink import open_position
from cellsam_core.checkpoint import load_model, save_model
from cellsam_core.inference import segment
from cellsam_core.synthetic import synthetic_frame
from serving.runner import free_port
from tests.conftest import make_smoke_model
from tests.serve_util import collect_results

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@dataclass
class MultiNodeService:
    ingest: str
    results: str
    output: Path
    weights: Path
    node_ids: dict[str, str]  # role ("head", "encoder", "decoder") -> Ray node id (hex)


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[MultiNodeService]:
    root = tmp_path_factory.mktemp("serving-multinode")
    weights = root / "smoke.pt"
    save_model(make_smoke_model(), weights)
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        # The dashboard serves the state API (``ray.util.state``) that tells on which node an actor runs.
        head_node_args={
            "num_cpus": 2,
            "resources": {"ingress_node": 10},
            "include_dashboard": True,
            "dashboard_port": free_port(),
        },
    )
    try:
        encoder_node = cluster.add_node(num_cpus=2, resources={"encoder_node": 10})
        decoder_node = cluster.add_node(num_cpus=2, resources={"decoder_node": 10})
        cluster.wait_for_nodes()
        node_ids = {
            "head": cluster.head_node.node_id,
            "encoder": encoder_node.node_id,
            "decoder": decoder_node.node_id,
        }
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        # All raylets share 127.0.0.1: one HTTP proxy (on the head) or the proxies' ports would collide.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        from serving.app import build_app

        config = {
            "model": {"name": "tiny", "weights": str(weights)},
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 4},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "output": {"directory": str(root / "out")},
            "metrics": {"port": 0},
            "encoder": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05, "resources": {"encoder_node": 1}},
            "decoder": {"resources": {"decoder_node": 1}},
        }
        serve.run(build_app(config), name="cellsam", route_prefix="/")
        url = f"http://127.0.0.1:{port}/endpoints"
        with urllib.request.urlopen(url, timeout=60) as r:
            endpoints = json.loads(r.read())
        yield MultiNodeService(endpoints["ingest"], endpoints["results"], root / "out", weights, node_ids)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


def _replica_nodes(deployment: str) -> list[str]:
    """Node ids (hex) of the live replica actors of ``deployment``."""
    from ray.util import list_named_actors
    from ray.util.state import list_actors

    names = [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]
    nodes = []
    for name in names:
        for actor in list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")]):
            nodes.append(actor.node_id)
    return nodes


def test_replicas_run_on_the_nodes_their_resources_name(service):
    encoder_nodes = _replica_nodes("Encoder")
    decoder_nodes = _replica_nodes("Decoder")
    assert encoder_nodes == [service.node_ids["encoder"]]
    assert decoder_nodes == [service.node_ids["decoder"]]
    assert len(set(service.node_ids.values())) == 3


def test_stream_across_nodes_equals_segment_on_the_same_frames(service):
    frames = [synthetic_frame((96, 112), seed=i, n_cells=12)[0] for i in range(6)]
    acquisition = "multinode-run"
    with ResultSubscriber(endpoint=service.results, acquisitions=[acquisition]) as sub:
        sub.wait_ready(30)
        with FrameSender(endpoint=service.ingest, acquisition=acquisition) as tx:
            tx.start(sizes={"t": len(frames), "p": 1, "z": 1})
            for t, frame in enumerate(frames):
                tx.send(frame, t=t)
        results, summary = collect_results(sub, acquisition)
    assert summary.frames_ok == len(frames) and summary.frames_failed == 0, summary
    assert sorted(r.payload.index.t for r in results) == list(range(len(frames)))
    reference = load_model(service.weights, "tiny")
    series = open_position(service.output / f"{acquisition}.ome.zarr", 0)
    for t, frame in enumerate(frames):
        assert bool(series["cellsam/done"][t, 0] & 1)
        np.testing.assert_array_equal(series["labels/cells/0"][t, 0], segment(frame, reference).labels)
        np.testing.assert_array_equal(series["0"][t, 0, 0], frame)
