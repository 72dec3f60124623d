"""``cellsam-stream demo``: the whole system on one machine, with a simulated microscope.

Starts the service in-process (embedded Ray, loopback sockets), plays a synthetic live-cell time-lapse (or a
file) through the simulator, shows live progress, then prints where the OME-Zarr is, the per-stage timing
and writes a PNG montage of raw frames and label overlays next to the store.
"""

import logging
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from acquisition.protocol import AcquisitionSummary, FrameResult
from serving.config import ServiceConfig

__all__ = ["DemoOptions", "DemoReport", "choose_model", "run_demo", "write_montage", "write_track_plots"]

log = logging.getLogger(__name__)

STAGES = ("queue", "encode", "dispatch", "decode", "measure", "write", "end_to_end")


@dataclass(frozen=True)
class DemoOptions:
    """What the demo plays and where it writes (the CLI flags of ``cellsam-stream demo``)."""

    frames: int = 12
    positions: int = 2
    fps: float | None = None
    shape: tuple[int, int] = (256, 256)
    source: Path | None = None
    output: Path = Path("cellsam-demo")
    model: str | None = None
    weights: Path | None = None
    random_weights: bool = False
    acquisition: str = "demo"
    keep_serving: bool = False
    view: bool = False
    seed: int = 0
    verbose: bool = False  # Ray's own log lines in the terminal


@dataclass
class DemoReport:
    """What happened: frames sent and their outcome, timings, where the results are."""

    frames_sent: int = 0
    results: list[FrameResult] = field(default_factory=list)
    summary: AcquisitionSummary | None = None
    store: Path | None = None
    montage: Path | None = None
    plots: Path | None = None
    metrics_url: str = ""
    model_line: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        """Frames segmented and stored (the summary's count; results go out before the write)."""
        if self.summary is not None:
            return self.summary.frames_ok
        return sum(1 for r in self.results if r.status == "ok")

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.status != "ok")

    @property
    def complete(self) -> bool:
        """Every frame sent was written (and nothing failed or went missing)."""
        return self.frames_sent > 0 and self.ok == self.frames_sent and self.failed == 0

    def percentile(self, stage: str, q: float) -> float:
        values = sorted(r.latency[stage] for r in self.results if stage in r.latency)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def choose_model(options: DemoOptions) -> tuple[dict[str, Any], str]:
    """Model settings for the demo and a line saying which model runs and what that means.

    Order: explicit ``--weights``; the official weights (``$CELLSAM_WEIGHTS``, the cache); the bundled
    cellsam-nano model; if none of them exists, the random ``tiny`` model, said plainly.
    """
    from cellsam_core.errors import WeightsNotFoundError
    from cellsam_core.select import resolve_model_weights

    if options.random_weights:
        name = options.model or "tiny"
        return {"name": name, "random_weights": True}, (
            f"model: {name} with RANDOM weights (asked for): labels only exercise the pipeline"
        )
    try:
        path, bundled = resolve_model_weights(options.weights)
    except WeightsNotFoundError:
        return {"name": "tiny", "random_weights": True}, (
            "model: no official weights found and no bundled model in this installation: running the "
            "tiny model with RANDOM weights, so the labels only exercise the pipeline (get real weights "
            "with `cellsam-stream weights fetch`)"
        )
    if bundled:
        return {"name": options.model, "weights": str(path)}, (
            "model: cellsam-nano, the bundled default trained by this project on synthetic images "
            "(F1 at IoU 0.5: 0.91-0.96 on held-out synthetic frames of most kinds, 0.88 on a real "
            "nuclei image; see README 'Default model quality'); for the published "
            "CellSAM accuracy get the official weights (`cellsam-stream weights fetch`)"
        )
    return {"name": options.model, "weights": str(path)}, (
        f"model: CellSAM weights {path}: labels of the quality these weights give"
    )


def write_montage(store: Path, path: Path, *, times: int = 4, positions: int = 2) -> Path:
    """PNG of a store: raw frame | label overlay, one row per time point (up to ``times``) and position
    (up to ``positions``), each captioned with its t and p. Multi-channel frames are drawn as a colour
    composite of their channels (first magenta, second green, then cyan, yellow)."""
    import imageio.v3 as iio
    import zarr
    from PIL import Image, ImageDraw

    from acquisition.frames import FrameId
    from acquisition.spec import AcquisitionSpec
    from acquisition.zarr_sink import ZarrLabelSink

    attrs: Any = zarr.open_group(store, mode="r").attrs
    spec = AcquisitionSpec.model_validate(attrs["cellsam"]["spec"])
    sink = ZarrLabelSink(store.parent)
    sink.open_acquisition(spec)
    done = sink.progress(spec.acquisition).done
    rows = []
    for p in range(min(positions, spec.sizes.p)):
        ts = sorted({f.t for f in done if f.p == p and f.z == 0})
        picks = (
            [ts[i] for i in np.linspace(0, len(ts) - 1, min(times, len(ts))).round().astype(int)]
            if ts
            else []
        )
        for t in picks:
            frame_id = FrameId(spec.acquisition, p, t, 0)
            raw = sink.read_image(frame_id)
            rgb_raw = _composite(np.zeros((1, *spec.frame_shape)) if raw is None else raw)
            # Tracked frames are coloured by track id, so a cell keeps its colour from row to row.
            tracked = sink.is_tracked(frame_id)
            labels = sink.read_tracks(frame_id) if tracked else sink.read_labels(frame_id)
            overlay = _overlay(labels, rgb_raw.mean(axis=2))
            gap = np.ones((rgb_raw.shape[0], 4, 3))
            row = (np.concatenate([rgb_raw, gap, overlay], axis=1) * 255).astype(np.uint8)
            canvas = Image.fromarray(row)
            ImageDraw.Draw(canvas).text((3, 2), f"t={t} p={p}", fill=(255, 255, 0))
            rows.append(np.asarray(canvas))
    if not rows:
        raise ValueError(f"no finished frame in {store} to draw")
    spacer = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([r for row in rows for r in (row, spacer)][:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return path


def _overlay(labels: np.ndarray, gray: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """(H, W, 3) float: ``gray`` with each label value in a fixed colour of its own (the same value, the
    same colour, in every frame)."""
    rng = np.random.default_rng(7)
    palette = rng.uniform(0.25, 1.0, size=(4096, 3))
    palette[0] = 0
    colors = palette[np.asarray(labels, dtype=np.int64) % len(palette)]
    base = np.repeat(gray[..., None], 3, axis=2)
    mask = (labels > 0)[..., None]
    return np.where(mask, (1 - alpha) * base + alpha * colors, base)


def write_track_plots(store: Path, path: Path, *, position: int = 0) -> Path:
    """PNG next to the montage: cells per frame (every position), and one reporter's mean intensity per
    track over time (the first channel, tracks seen in at least a third of the frames of ``position``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    from acquisition.frames import FrameId
    from acquisition.spec import AcquisitionSpec
    from acquisition.zarr_sink import ZarrLabelSink
    from cellsam_core.tracking_state import TRACK_COLUMN

    attrs: Any = zarr.open_group(store, mode="r").attrs
    spec = AcquisitionSpec.model_validate(attrs["cellsam"]["spec"])
    sink = ZarrLabelSink(store.parent)
    sink.open_acquisition(spec)
    done = sorted(sink.progress(spec.acquisition).done, key=lambda f: (f.p, f.t))
    reporter = f"intensity_mean_{spec.channels[0]}"
    fig, (counts_ax, tracks_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for p in range(spec.sizes.p):
        frames = [f for f in done if f.p == p and f.z == 0]
        counts_ax.plot(
            [f.t for f in frames], [len(sink.read_cells(f)) for f in frames], marker="o", label=f"p={p}"
        )
    per_track: dict[int, list[tuple[int, float]]] = {}
    frames = [f for f in done if f.p == position and f.z == 0 and sink.is_tracked(f)]
    for f in frames:
        cells = sink.read_cells(FrameId(f.acquisition, f.p, f.t, f.z))
        ids, values = cells.measurements.get(TRACK_COLUMN), cells.measurements.get(reporter)
        if ids is None or values is None:
            continue
        for tid, value in zip(ids, values, strict=True):
            per_track.setdefault(int(tid), []).append((f.t, float(value)))
    long = {tid: pts for tid, pts in per_track.items() if len(pts) >= max(2, len(frames) // 3)}
    for _, pts in sorted(long.items()):
        tracks_ax.plot([t for t, _ in pts], [v for _, v in pts], linewidth=1)
    counts_ax.set(xlabel="time point", ylabel="cells", title="cells per frame")
    counts_ax.legend()
    tracks_ax.set(
        xlabel="time point",
        ylabel=f"mean {spec.channels[0]} intensity",
        title=f"{len(long)} tracks of position {position}",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_COMPOSITE = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _composite(image: np.ndarray) -> np.ndarray:
    """(C, H, W) raw pixels as an (H, W, 3) float image in [0, 1], each channel contrast-stretched."""
    channels = np.asarray(image, dtype=np.float64)
    out = np.zeros((*channels.shape[1:], 3))
    for c, plane in enumerate(channels):
        lo, hi = np.percentile(plane, (1, 99.8))
        stretched = np.clip((plane - lo) / max(hi - lo, 1e-9), 0, 1)
        color = _COMPOSITE[c % len(_COMPOSITE)] if len(channels) > 1 else np.ones(3)
        out += stretched[..., None] * color
    return np.clip(out, 0, 1)


class _Progress:
    """Collects results from the PUB socket in a thread and prints one live progress line."""

    def __init__(self, endpoint: str, acquisition: str, total: int, out: TextIO, channels: int = 1) -> None:
        from acquisition.client import ResultSubscriber

        self.sub = ResultSubscriber(endpoint=endpoint, acquisitions=[acquisition])
        self.sub.wait_ready(30)
        self.total = total
        self.channels = channels  # frames per result: one result per (t, p, z) of all its channels
        self.out = out
        self.results: list[FrameResult] = []
        self.summary: AcquisitionSummary | None = None
        self.sent = 0
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                message = self.sub.recv(timeout=0.5)
            except TimeoutError:
                continue
            if isinstance(message.payload, AcquisitionSummary):
                self.summary = message.payload
                self._done.set()
            elif isinstance(message.payload, FrameResult):
                self.results.append(message.payload)

    def line(self) -> str:
        ok = [r for r in self.results if r.status == "ok"]
        elapsed = max(time.monotonic() - self.started, 1e-9)
        e2e = sorted(r.latency.get("end_to_end", 0.0) for r in ok)
        p50 = e2e[len(e2e) // 2] * 1000 if e2e else float("nan")
        p99 = e2e[min(len(e2e) - 1, round(0.99 * (len(e2e) - 1)))] * 1000 if e2e else float("nan")
        cells = statistics.fmean(r.n_cells for r in ok) if ok else 0.0
        failed = len(self.results) - len(ok)
        written = len(ok) * self.channels
        return (
            f"sent {self.sent}/{self.total}  written {written}  failed {failed}  "
            f"{len(ok) / elapsed:.2f} frame sets/s  latency p50 {p50:.0f} ms p99 {p99:.0f} ms  "
            f"{cells:.1f} cells/frame"
        )

    def wait(self, timeout: float, interactive: bool) -> None:
        deadline = time.monotonic() + timeout
        last = 0.0
        while not self._done.wait(0.25) and time.monotonic() < deadline:
            now = time.monotonic()
            if interactive:
                print("\r" + self.line(), end="", file=self.out, flush=True)
            elif now - last > 5:
                print(self.line(), file=self.out, flush=True)
                last = now
        print(("\r" if interactive else "") + self.line(), file=self.out, flush=True)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sub.close()


def _source(options: DemoOptions) -> Any:
    from acquisition.simulator import ArraySource, SyntheticSource

    if options.source is not None:
        return ArraySource.from_path(options.source, positions=options.positions, frames=options.frames)
    # Two channels (H2B nuclei, membrane), sent one frame per channel as microscope software does.
    return SyntheticSource(
        shape=options.shape,
        frames=options.frames,
        positions=options.positions,
        seed=options.seed,
        n_cells=30,
        modality="multiplexed",
        tracked=True,  # cells move, grow, divide, enter and leave: what live tracking is for
    )


def run_demo(options: DemoOptions, *, out: TextIO = sys.stdout, timeout: float = 1800) -> DemoReport:
    """Run the demo end to end; returns the report (``report.complete`` decides the exit code)."""
    from acquisition.client import FrameSender
    from acquisition.simulator import SimulatedMicroscope
    from serving.runner import free_port, start_service, wait_for_signal

    model_settings, model_line = choose_model(options)
    output = options.output.resolve()
    config = ServiceConfig.model_validate(
        {
            "model": model_settings,
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 4},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "output": {"directory": str(output)},
            "metrics": {"port": 0},
            "encoder": {"max_batch_size": 4},
        }
    )
    report = DemoReport(model_line=model_line)
    print(model_line, file=out)
    print("starting the service (embedded Ray, Serve, model replicas)...", file=out, flush=True)
    began = time.monotonic()
    service = start_service(config, http_port=free_port(), verbose=options.verbose)
    report.metrics_url = service.metrics_url
    try:
        source = _source(options)
        first = source.image(0, 0, 0)
        channels = int(first.shape[2]) if first.ndim == 3 else 1  # sent as one frame each
        total = int(np.prod(source.sizes)) * channels
        print(service.describe(), file=out)
        progress = _Progress(service.results, options.acquisition, total, out, channels=channels)
        try:
            with FrameSender(endpoint=service.ingest, timeout=60) as sender:
                microscope = SimulatedMicroscope(
                    sender=sender,
                    source=source,
                    acquisition=options.acquisition,
                    fps=options.fps,
                    per_channel=True,
                )
                errors: list[BaseException] = []

                def play() -> None:
                    try:
                        microscope.run()
                    except BaseException as exc:  # reported below, after the progress line
                        errors.append(exc)

                sim = threading.Thread(target=play, name="demo-microscope", daemon=True)
                sim.start()
                while sim.is_alive():
                    sim.join(0.25)
                    progress.sent = sender.frames_sent.get(options.acquisition, 0)
                report.frames_sent = progress.sent = sender.frames_sent.get(options.acquisition, 0)
                if errors:
                    print(f"\nthe simulated microscope stopped: {errors[0]}", file=out)
            progress.wait(timeout, interactive=out.isatty())
        finally:
            progress.close()
        report.results = list(progress.results)
        report.summary = progress.summary
        report.store = output / f"{options.acquisition}.ome.zarr"
        report.seconds = time.monotonic() - began
        if report.ok:
            report.montage = write_montage(report.store, output / f"{options.acquisition}-montage.png")
            report.plots = write_track_plots(report.store, output / f"{options.acquisition}-tracks.png")
        if options.view:
            _open_napari(report.store, out)
        if options.keep_serving:
            print(service.describe(), file=out)
            with wait_for_signal() as stopped:
                print("--keep-serving: Ctrl-C stops the service.", file=out, flush=True)
                stopped.wait()
    finally:
        service.stop()
    return report


def _open_napari(store: Path, out: TextIO) -> None:
    try:
        import napari
    except ImportError:
        print("--view: napari is not installed (pip install 'napari[all]' napari-ome-zarr)", file=out)
        return
    viewer = napari.Viewer()
    viewer.open(str(store), plugin="napari-ome-zarr")
    napari.run()


def format_report(report: DemoReport) -> str:
    """The summary printed at the end of the demo."""
    lines = [
        "",
        f"frames sent {report.frames_sent}, written {report.ok}, failed {report.failed} "
        f"in {report.seconds:.1f} s",
        report.model_line,
        f"labels: {report.store}  (OME-Zarr NGFF 0.5, see docs/zarr-layout.md)",
        "  open it: napari with napari-ome-zarr (`napari --plugin napari-ome-zarr "
        + str(report.store)
        + "`), "
        "or ome_zarr / zarr in Python",
    ]
    if report.montage:
        lines.append(f"montage (raw | labels coloured by track): {report.montage}")
    if report.plots:
        lines.append(f"plots (cells per frame, reporter intensity per track): {report.plots}")
    lines.append(f"metrics were served at {report.metrics_url}")
    lines.append("per-stage latency, ms (p50 / p99):")
    for stage in STAGES:
        p50, p99 = (report.percentile(stage, q) * 1000 for q in (0.5, 0.99))
        if p50 == p50:  # not NaN: the stage appears in the results
            lines.append(f"  {stage:<11} {p50:8.1f} / {p99:8.1f}")
    if report.percentile("write", 0.5) != report.percentile("write", 0.5):
        lines.append(
            "  (results go out before the labels are stored; the write stage is in the metrics, "
            'cellsam_stage_seconds{stage="write"})'
        )
    return "\n".join(lines)
