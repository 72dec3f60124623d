"""The simulator's command line: ``cellsam-stream simulate`` and ``python -m acquisition.simulate_command``.

Plays a synthetic live-cell movie (one or two channels, with ground truth) or a file through a
:class:`~acquisition.client.FrameSender`, as a microscope would (:mod:`acquisition.simulator`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from acquisition.client import FrameSender
from acquisition.errors import AcquisitionError, NotConnectedError, SourceError
from acquisition.protocol import DEFAULT_FRAME_ENDPOINT
from acquisition.security import ClientKeys
from acquisition.simulator import ArraySource, ImageSource, SimulatedMicroscope, SyntheticSource
from cellsam_core.synthetic import MODALITIES

__all__ = ["add_simulate_arguments", "main", "run_simulate_command"]


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``simulate`` options to ``parser`` (shared by the CLI and ``python -m``)."""
    parser.add_argument("--to", default=DEFAULT_FRAME_ENDPOINT, help="listener endpoint")
    parser.add_argument("--source", default="synthetic", help="'synthetic' or FILE.tif|FILE.npy|DIR.zarr")
    parser.add_argument(
        "--axes", default=None, help="axes of a file source, e.g. TYX, TPZYX (default by rank)"
    )
    parser.add_argument("--acquisition", default="simulated", help="acquisition id")
    parser.add_argument("--frames", type=int, default=10, help="time points")
    parser.add_argument("--positions", type=int, default=1, help="stage positions")
    parser.add_argument("--z", type=int, default=1, help="z slices (synthetic source)")
    parser.add_argument("--fps", type=float, default=None, help="target frames/s (default: as fast as taken)")
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--dtype", default="uint16", choices=["uint8", "uint16", "float32"])
    parser.add_argument("--modality", default="nuclear", choices=list(MODALITIES))
    parser.add_argument("--cells", type=int, default=60, help="cells per field at t=0 (synthetic)")
    parser.add_argument(
        "--per-channel",
        action="store_true",
        help="send each channel as its own frame (index c), as microscope software does; with "
        "--modality multiplexed: a two-channel (nuclei + membrane) acquisition",
    )
    parser.add_argument("--pixel-size", type=float, default=0.65, help="declared pixel size, µm (0.65)")
    parser.add_argument("--interval", type=float, default=60.0, help="declared time interval, s (60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracks",
        type=Path,
        metavar="DIR",
        help="synthetic source: play movies with known tracks (cells also enter and leave the field) and "
        "write each position's ground truth in Cell Tracking Challenge form to DIR/p<P>/",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the service to accept the connection, and for each send",
    )
    parser.add_argument("--client-key", type=Path, help="CURVE: this client's NAME.key_secret")
    parser.add_argument("--server-key", type=Path, help="CURVE: the service's public key (server.key)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_simulate_command(args: argparse.Namespace) -> int:
    """Run the simulator from parsed arguments; returns a process exit code.

    Fails (1, one line on stderr) when nothing accepts the connection within ``--timeout``: frames sent
    before that would only wait in the sender's queue.
    """
    try:
        return _simulate(args)
    except (AcquisitionError, FileNotFoundError) as exc:  # SourceError, CurveKeyError, timeouts
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, SourceError) else 1


def _simulate(args: argparse.Namespace) -> int:
    if (args.client_key is None) != (args.server_key is None):
        raise SourceError(
            "CURVE needs both --client-key (yours, .key_secret) and --server-key (the service's)"
        )
    curve = ClientKeys.from_files(args.client_key, args.server_key) if args.client_key else None
    if args.frames < 1 or args.positions < 1:
        raise SourceError(f"--frames and --positions must be at least 1, got {args.frames}, {args.positions}")
    source: ImageSource
    if args.source == "synthetic":
        source = SyntheticSource(
            shape=tuple(args.shape),
            frames=args.frames,
            positions=args.positions,
            z=args.z,
            seed=args.seed,
            modality=args.modality,
            n_cells=args.cells,
            dtype=np.dtype(args.dtype),
            pixel_size_um=args.pixel_size,
            time_interval_s=args.interval,
            tracked=args.tracks is not None,
        )
        if args.tracks is not None:
            for p in range(args.positions):
                source.write_ctc(args.tracks / f"p{p}", p=p)
    else:
        if args.tracks is not None:
            raise SourceError("--tracks needs the synthetic source (a file has no ground-truth tracks)")
        source = ArraySource.from_path(
            args.source, axes=args.axes, positions=args.positions, frames=args.frames
        )
    with FrameSender(endpoint=args.to, timeout=args.timeout, curve=curve, linger=args.timeout) as sender:
        try:
            sender.wait_connected(args.timeout)
        except NotConnectedError:
            sender.close(linger=0)
            raise
        report = SimulatedMicroscope(
            sender=sender,
            source=source,
            acquisition=args.acquisition,
            fps=args.fps,
            progress=not args.no_progress,
            per_channel=args.per_channel,
        ).run()
    print(f"sent {report.frames_sent} frames of {report.acquisition!r} in {report.seconds:.2f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m acquisition.simulate_command ...``"""
    parser = add_simulate_arguments(argparse.ArgumentParser(prog="simulate", description=__doc__))
    return run_simulate_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
