"""End to end through the real Serve app: ZeroMQ in, Ray Serve replicas, OME-Zarr out, results and metrics.

One Ray instance and one Serve application for the whole module (Ray takes ~15 s to start here).
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import tifffile
import zmq
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.protocol import AcquisitionSummary, FrameResult
from acquisition.zarr_layout import table_name
from acquisition.zarr_sink import open_position
from cellsam_core.cells import CELL_COLUMNS
from cellsam_core.checkpoint import load_model, save_model
from cellsam_core.inference import segment
from cellsam_core.io import decode_image_bytes, encode_labels_bytes
from cellsam_core.synthetic import synthetic_frame
from serving.runner import free_port
from tests.conftest import make_smoke_model
from tests.segmenter_conformance import SegmenterConformance
from tests.serve_util import collect_results

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


class Service:
    def __init__(self, http: str, endpoints: dict, output: Path, weights: Path):
        self.http = http
        self.ingest = endpoints["ingest"]
        self.results = endpoints["results"]
        self.metrics_port = endpoints["metrics_port"]
        self.output = output
        self.weights = weights

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.http + path, timeout=120) as r:
            return r.read()

    def post(self, path: str, body: bytes) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(self.http + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    weights = root / "smoke.pt"
    save_model(make_smoke_model(), weights)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from serving.app import build_app

    config = {
        "model": {"name": "tiny", "weights": str(weights)},
        "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 4, "max_frame_pixels": 1 << 20},
        "results": {"endpoint": "tcp://127.0.0.1:*"},
        "output": {"directory": str(root / "out")},
        "metrics": {"port": 0},
        "encoder": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "retries": {"max_attempts": 4, "backoff_s": 0.5},
    }
    serve.run(build_app(config), name="cellsam", route_prefix="/")
    http = f"http://127.0.0.1:{port}"
    endpoints = json.loads(urllib.request.urlopen(http + "/endpoints", timeout=60).read())
    yield Service(http, endpoints, root / "out", weights)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_model(service):
    return load_model(service.weights, "tiny")


def _stored(output: Path, acquisition: str, t: int, p: int = 0, z: int = 0):
    """(done, labels, image) of one frame, read from the OME-Zarr on disk with plain zarr."""
    series = open_position(output / f"{acquisition}.ome.zarr", p)
    done = bool(series["cellsam/done"][t, z] & 1)  # bit 1: labels and cell table written
    return done, series["labels/cells/0"][t, z], series["0"][t, :, z]


def _frames(n: int, seed: int = 0, shape=(96, 112)) -> list[np.ndarray]:
    return [synthetic_frame(shape, seed=seed + i, n_cells=12)[0] for i in range(n)]


def _stored_cells(output: Path, acquisition: str, t: int, p: int = 0, z: int = 0) -> dict[str, np.ndarray]:
    """The stored cell table of one frame as column name -> values, read with plain zarr."""
    table = open_position(output / f"{acquisition}.ome.zarr", p)[f"cellsam/cells/{table_name(t, z)}"]
    names = table.attrs["cellsam"]["columns"]
    rows = np.asarray(table[...])
    return {name: rows[:, i] for i, name in enumerate(names)}


def _stream(
    service: Service,
    acquisition: str,
    frames: list[np.ndarray],
    *,
    labels: bool = False,
    metadata: dict[str, Any] | None = None,
):
    with ResultSubscriber(endpoint=service.results, acquisitions=[acquisition], labels=labels) as sub:
        sub.wait_ready(30)
        with FrameSender(endpoint=service.ingest, acquisition=acquisition) as tx:
            tx.start(sizes={"t": len(frames), "p": 1, "z": 1}, metadata=metadata or {})
            for t, frame in enumerate(frames):
                tx.send(frame, t=t)
        return collect_results(sub, acquisition)


def test_labels_in_store_equal_segment_on_the_same_frames(service, reference_model):
    frames = _frames(6)
    results, summary = _stream(service, "equal-run", frames, labels=True, metadata={"pixel_size_um": 0.5})
    assert summary.frames_ok == 6 and summary.frames_failed == 0
    assert sorted(r.payload.index.t for r in results) == list(range(6))
    for t, frame in enumerate(frames):
        expected = segment(frame, reference_model)
        done, stored, image = _stored(service.output, "equal-run", t)
        assert done
        np.testing.assert_array_equal(stored, expected.labels)
        np.testing.assert_array_equal(image[0], frame)
        published = next(r for r in results if r.payload.index.t == t)
        assert published.payload.n_cells == expected.n_cells
        np.testing.assert_array_equal(published.labels, expected.labels)
        # One cell record end to end: the stored table, column by column, is segment()'s table (with
        # the declared pixel size), and the published result carries the same table.
        stored_cells = _stored_cells(service.output, "equal-run", t)
        table = expected.cells.with_pixel_size(0.5).with_intensities(expected.labels, frame, ["c0"])
        want = table.columns()
        assert list(stored_cells) == list(want) == [*CELL_COLUMNS, "intensity_mean_c0", "intensity_sum_c0"]
        assert expected.n_cells > 0
        for name, values in want.items():
            np.testing.assert_allclose(stored_cells[name], values, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(stored_cells["area_um2"], stored_cells["area"] * 0.25)
        assert published.payload.centroids == list(
            zip(stored_cells["centroid_y"], stored_cells["centroid_x"], strict=True)
        )
        assert published.payload.cell_table().with_pixel_size(0.5).equals(table)
        # (y, x) is array axis order: each cell's stored bbox is where its pixels are in the labels.
        for label, y0, x0, y1, x1 in zip(
            *(stored_cells[c].astype(int) for c in ("label", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")),
            strict=True,
        ):
            mask = stored == label
            ys, xs = np.nonzero(mask)
            assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)
        # Feedback first (the default): the result leaves before the write, which the summary covers.
        assert set(published.payload.latency) >= {"queue", "encode", "dispatch", "decode", "end_to_end"}


def test_http_segment_matches_cli_path_and_health(service, reference_model):
    frame = _frames(1, seed=40)[0]
    status, body, headers = service.post("/segment?format=npy", encode_labels_bytes(frame, "npy"))
    assert status == 200, body
    labels = decode_image_bytes(body)
    np.testing.assert_array_equal(labels, segment(frame, reference_model).labels)
    assert int(headers["x-cell-count"]) == segment(frame, reference_model).n_cells
    status, body, _ = service.post("/segment", b"definitely not an image")
    assert status == 415
    # Refused before decoding: a few KB of zlib TIFF declaring 1025 x 1024 pixels (over the limit).
    bomb = io.BytesIO()
    tifffile.imwrite(bomb, np.zeros((1025, 1024), np.uint8), compression="zlib")
    status, body, _ = service.post("/segment", bomb.getvalue())
    assert status == 413 and b"ingest.max_frame_pixels" in body and b"1049600 pixels" in body, body
    # The dtype rules of the ZeroMQ path: a bool NPY is refused as it would be on the wire.
    status, body, _ = service.post("/segment", encode_labels_bytes(frame > frame.mean(), "npy"))
    assert status == 415 and b"bool" in body, body
    health = json.loads(service.get("/healthz"))
    assert health["status"] == "ok"
    from cellsam_core.select import file_sha256

    info = service.metrics()
    key = next(k for k in info if k[0] == "cellsam_model_info")
    assert dict(key[1])["sha256"] == file_sha256(service.weights)[:16]
    assert dict(key[1])["source"] == str(service.weights)


def test_rejections_are_counted_reported_and_the_service_keeps_going(service):
    before = service.metrics()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(service.ingest)
    with ResultSubscriber(endpoint=service.results, acquisitions=["rej-run"]) as sub:
        sub.wait_ready(30)
        header = {"type": "frame", "v": 1, "acquisition": "rej-run", "index": {"t": 0}, "shape": [4, 4]}
        push.send_multipart([b"{not json", b"\x00" * 32])
        push.send_multipart([json.dumps({**header, "dtype": "uint16"}).encode(), b"\x00" * 31])
        push.send_multipart([json.dumps({**header, "dtype": "complex64"}).encode(), b"\x00" * 128])
        rejected = [sub.recv(timeout=30).payload for _ in range(2)]
        assert {r.reason for r in rejected} == {"size_mismatch", "bad_dtype"}
        assert all(isinstance(r, FrameResult) and r.status == "rejected" for r in rejected)
    push.close(linger=0)
    frames = _frames(2, seed=60)
    _, summary = _stream(service, "after-rejections", frames)
    assert summary.frames_ok == 2
    after = service.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("cellsam_frames_rejected_total", reason="bad_json") == 1
    assert delta("cellsam_frames_rejected_total", reason="size_mismatch") == 1
    assert delta("cellsam_frames_rejected_total", reason="bad_dtype") == 1
    assert delta("cellsam_frames_received_total") == 5
    assert delta("cellsam_frames_accepted_total") == 2
    assert delta("cellsam_frames_written_total") == 2
    assert delta("cellsam_end_to_end_seconds_count") == 2
    assert delta("cellsam_stage_seconds_count", stage="encode") == 2


def test_poison_frame_fails_alone(service):
    # Frames that do not fit their acquisition are rejected on arrival; a frame that fits but makes the
    # model raise (four channels without roles: no model input for that) fails alone, mid-stream.
    good = _frames(3, seed=80)
    poison = np.zeros((64, 64, 4), np.uint16)
    with ResultSubscriber(endpoint=service.results, acquisitions=["poison-run", "poison-one"]) as sub:
        sub.wait_ready(30)
        with FrameSender(endpoint=service.ingest, acquisition="poison-run") as tx:
            tx.start(sizes={"t": 3})
            tx.send(good[0], t=0)
            tx.send(poison, acquisition="poison-one", t=0)
            tx.send(good[1], t=1)
            tx.send(good[2], t=2)
            tx.end("poison-one", frames=1)
        messages: dict[str, list] = {"poison-run": [], "poison-one": []}
        summaries: dict[str, AcquisitionSummary] = {}
        while len(summaries) < 2:
            msg = sub.recv(timeout=240)
            if isinstance(msg.payload, AcquisitionSummary):
                summaries[msg.acquisition] = msg.payload
            else:
                messages[msg.acquisition].append(msg)
    summary, poison_summary, poisoned = (
        summaries["poison-run"],
        summaries["poison-one"],
        messages["poison-one"],
    )
    assert summary.frames_ok == 3 and summary.frames_failed == 0
    assert poison_summary.frames_received == 1 and poison_summary.frames_failed == 1
    failed = [r.payload for r in poisoned if r.payload.status == "failed"]
    assert len(failed) == 1 and failed[0].index.t == 0 and failed[0].reason == "model_error"
    assert "channel" in (failed[0].detail or "")
    progress = json.loads(service.get("/acquisitions"))
    entry = next(a for a in progress["acquisitions"] if a["acquisition"] == "poison-one")
    assert entry["failed"] == 1 and entry["ok"] == 0 and entry["pending"] == 0
    entry = next(a for a in progress["acquisitions"] if a["acquisition"] == "poison-run")
    assert entry["failed"] == 0 and entry["ok"] == 3 and entry["pending"] == 0


def _replica_actors(deployment: str) -> list:
    from ray.util import list_named_actors

    names = [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    ]
    return [ray.get_actor(n, namespace="serve") for n in names]


def test_killed_replicas_mid_stream_lose_no_frame(service, reference_model):
    frames = _frames(12, seed=100, shape=(192, 192))
    acquisition = "kill-run"

    def retries() -> dict[str, float]:
        return {
            labels[0][1]: value
            for (name, labels), value in service.metrics().items()
            if name == "cellsam_retries_total"
        }

    retries_before = retries()
    with ResultSubscriber(endpoint=service.results, acquisitions=[acquisition]) as sub:
        sub.wait_ready(30)
        with FrameSender(endpoint=service.ingest, acquisition=acquisition) as tx:
            tx.start(sizes={"t": len(frames)})
            for t, frame in enumerate(frames):
                tx.send(frame, t=t)
            first = sub.recv(timeout=120)
            # max_concurrent frames are now awaiting the encoder or the decoder: kill both deployments'
            # replicas so that some of those requests are lost with their replica.
            killed = _replica_actors("Encoder") + _replica_actors("Decoder")
            for actor in killed:
                ray.kill(actor, no_restart=False)
        results, summary = collect_results(sub, acquisition, timeout=300)
    results.append(first)
    assert killed
    assert summary.frames_ok == len(frames), summary
    assert sorted(r.payload.index.t for r in results) == list(range(len(frames)))
    for t, frame in enumerate(frames):
        done, stored, _ = _stored(service.output, acquisition, t)
        assert done
        np.testing.assert_array_equal(stored, segment(frame, reference_model).labels)
    # Retries are counted per deployment whose replica died (Ray names the dead actor's class).
    grown = {d: n - retries_before.get(d, 0) for d, n in retries().items() if n > retries_before.get(d, 0)}
    assert grown and set(grown) <= {"encoder", "decoder"}, retries()


class TestServeSegmenter(SegmenterConformance):
    """The Ray Serve segmenter (encoder → decoder deployments) against the `Segmenter` contract."""

    @pytest.fixture
    def model(self, reference_model):
        return reference_model

    @pytest.fixture
    def segmenter(self, service):
        from serving.app import ServeSegmenter

        return ServeSegmenter(
            encoder=serve.get_deployment_handle("Encoder", app_name="cellsam"),
            decoder=serve.get_deployment_handle("Decoder", app_name="cellsam"),
        )

    def retryable_example(self) -> BaseException:
        from ray.exceptions import RayActorError

        return RayActorError()
