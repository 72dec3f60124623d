"""Cost of channel assembly: 2-channel acquisitions sent one frame per channel vs one (H, W, 2) buffer.

Both arms send the same pixels through the real path in front of the model: FrameSender → ZeroMQ →
FrameListener (layout checks) → StreamPipeline (assembly, model input from the channel roles, per-channel
intensities, stored-form checks) → a label sink that checks and drops each frame. The model is replaced by
a constant segmentation (the same labels for every frame, ~200 cells), so what is measured is everything
but the model. Rounds alternate A B A B; the ratio is per-channel / single-buffer frame sets per second.

    python benchmarks/bench_assembly.py --size 2048 --sets 20 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

import numpy as np

from acquisition.client import FrameSender
from acquisition.frames import FrameId
from acquisition.listener import FrameListener
from acquisition.results import MemoryResultSink
from acquisition.sink import prepare_frame
from acquisition.spec import AcquisitionSpec
from cellsam_core.cells import CellTable
from cellsam_core.inference import Segmentation
from cellsam_core.synthetic import synthetic_frame
from serving.config import ServiceConfig
from serving.pipeline import StreamPipeline
from serving.segmenter import DecodedFrame


class ConstantSegmenter:
    """Answers every frame with the same segmentation (no model time)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.segmentation = Segmentation(labels=labels, cells=CellTable.from_labels(labels), timings={})

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        return DecodedFrame(self.segmentation, 0.0, 0.0, 1, 0)

    def is_retryable(self, exc: BaseException) -> bool:
        return False


class CheckingSink:
    """A label sink that checks each frame as a real one does (prepare_frame), then drops it."""

    def __init__(self) -> None:
        self.specs: dict[str, AcquisitionSpec] = {}
        self.written = 0

    def open_acquisition(self, spec: AcquisitionSpec) -> None:
        self.specs[spec.acquisition] = spec

    def write(self, frame_id: FrameId, labels: Any, image: Any = None, cells: Any = None) -> None:
        prepare_frame(self.specs[frame_id.acquisition], frame_id, labels, image, cells)
        self.written += 1

    def close_acquisition(self, acquisition: str, summary: Any = None) -> None:
        pass


async def one_round(
    per_channel: bool, images: list[np.ndarray], segmenter: ConstantSegmenter, tag: str
) -> float:
    """Frame sets per second of one acquisition of ``len(images)`` two-channel sets."""
    config = ServiceConfig.model_validate(
        {"ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 4, "max_queued": 8}}
    )
    results = MemoryResultSink()
    sink = CheckingSink()
    pipeline = StreamPipeline(
        source=FrameListener(endpoint=config.ingest.endpoint, max_queued=8),
        segmenter=segmenter,
        labels=sink,  # type: ignore[arg-type]  # the parts of LabelSink the pipeline uses
        results=results,
        config=config,
    )
    await pipeline.start()
    acquisition = f"{tag}-{'per-channel' if per_channel else 'buffer'}"
    done = threading.Event()

    def send() -> None:
        with FrameSender(endpoint=pipeline.endpoints["ingest"], acquisition=acquisition, timeout=60) as tx:
            tx.start(
                sizes={"t": len(images), **({"c": 2} if per_channel else {})},
                channels={"names": ["nuclei", "membrane"], "roles": ["nuclear", "whole_cell"]},
                pixel_size_um=0.65,
            )
            for t, image in enumerate(images):
                if per_channel:
                    tx.send(np.ascontiguousarray(image[..., 0]), t=t, c=0)
                    tx.send(np.ascontiguousarray(image[..., 1]), t=t, c=1)
                else:
                    tx.send(image, t=t)
        done.set()

    begin = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    while not results.summaries:
        await asyncio.sleep(0.001)
    seconds = time.perf_counter() - begin
    sender.join()
    await pipeline.stop()
    summary = results.summaries[0]
    expected = len(images) * (2 if per_channel else 1)
    if summary.frames_ok != expected or sink.written != len(images):
        raise RuntimeError(f"{acquisition}: {summary} ({sink.written} sets written)")
    return len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="frame side in pixels")
    parser.add_argument("--sets", type=int, default=20, help="two-channel frame sets per round")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (A B, then B A, ...)")
    parser.add_argument("--cells", type=int, default=200)
    args = parser.parse_args()
    shape = (args.size, args.size)
    nuclei, labels = synthetic_frame(shape, seed=0, n_cells=args.cells)
    membrane = synthetic_frame(shape, seed=1, n_cells=args.cells, modality="whole_cell")[0]
    image = np.stack([nuclei, membrane], axis=-1).astype(np.uint16)
    images = [image] * args.sets
    segmenter = ConstantSegmenter(np.asarray(labels, dtype=np.uint32))
    print(
        f"channel assembly: {args.sets} sets of 2 x {args.size}² uint16 per round, "
        f"{len(segmenter.segmentation.cells)} cells per frame, constant segmentation (no model)"
    )
    ratios, per_channel_fps, buffer_fps = [], [], []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        fps = {mode: asyncio.run(one_round(mode, images, segmenter, f"r{r}")) for mode in order}
        per_channel_fps.append(fps[True])
        buffer_fps.append(fps[False])
        ratios.append(fps[True] / fps[False])
        print(
            f"  round {r}: per-channel {fps[True]:.2f} sets/s, one buffer {fps[False]:.2f} sets/s, "
            f"ratio {ratios[-1]:.2f}"
        )
    print(
        f"median: per-channel {statistics.median(per_channel_fps):.2f} sets/s "
        f"({2 * statistics.median(per_channel_fps):.1f} frames/s), one buffer "
        f"{statistics.median(buffer_fps):.2f} sets/s; "
        f"per-channel / one buffer {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
