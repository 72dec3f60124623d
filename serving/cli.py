"""The ``cellsam-stream`` command line: parses arguments, loads configuration, calls library functions.

Exit codes: 0 success, 1 the work failed (no weights, unreadable image, frames lost), 2 usage errors
(argparse's convention).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cellsam_core import __version__

log = logging.getLogger("cellsam_stream")

_EPILOG = "Run `cellsam-stream COMMAND --help` for the options of a command."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=Path,
        help="weights file (official cellsam_general.pt / cellsam_extra.pt or our own); default: "
        "$CELLSAM_WEIGHTS, then the official cache ~/.deepcell/models/cellsam_v{version}/",
    )
    p.add_argument("--model", help="architecture name (cellsam_vit_b, tiny); inferred from the weights")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the model (bfloat16 is meant for GPUs)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="TESTING ONLY: run a randomly initialised model (default architecture: tiny); "
        "the labels are not a segmentation",
    )


def _cmd_sample(args: argparse.Namespace) -> int:
    from cellsam_core.io import write_labels
    from cellsam_core.synthetic import synthetic_frame

    image, labels = synthetic_frame(
        (args.size, args.size), seed=args.seed, modality=args.modality, n_cells=args.cells
    )
    out = Path(args.output)
    import tifffile

    out.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out, image)
    print(f"wrote sample image {out} ({image.shape}, {image.dtype}, {int(labels.max())} cells)")
    if args.labels:
        write_labels(args.labels, labels)
        print(f"wrote ground-truth labels {args.labels}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from cellsam_core.errors import CellSAMError
    from cellsam_core.inference import DecodeOptions, EncodeOptions, segment
    from cellsam_core.io import read_image, write_labels
    from cellsam_core.select import select_model

    try:
        image = read_image(args.image)
        t0 = time.perf_counter()
        model, info = select_model(
            weights=args.weights,
            model=args.model,
            random_weights=args.random_weights,
            device=args.device,
            dtype=args.dtype,
        )
        t_load = time.perf_counter() - t0
        print(info.describe())
        t0 = time.perf_counter()
        result = segment(
            image,
            model,
            encode_options=EncodeOptions(tile=args.tile),
            decode_options=DecodeOptions(bbox_threshold=args.bbox_threshold),
        )
        t_seg = time.perf_counter() - t0
    except (CellSAMError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = (
        Path(args.output)
        if args.output
        else Path(args.image).with_name(Path(args.image).stem + "_labels.tif")
    )
    write_labels(out, result.labels)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    print(f"{result.n_cells} cells in {args.image} -> {out}")
    print(f"timing: model load {t_load:.2f} s, segment {t_seg:.2f} s ({steps})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellsam-stream",
        description="Live CellSAM cell segmentation for streaming microscopy.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("segment", help="segment one image file and write its label image")
    p.add_argument("image", type=Path, help="input image: .tif/.tiff, .png or .npy")
    p.add_argument("-o", "--output", type=Path, help="label image to write (.tif or .npy)")
    _add_model_options(p)
    p.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whole-slide tiling (default: automatic for frames much larger than the model input)",
    )
    p.add_argument("--bbox-threshold", type=float, default=0.4, help="CellFinder box threshold (0.4)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("sample", help="write a synthetic cell image (and its ground truth)")
    p.add_argument("output", type=Path, help="TIFF file to write")
    p.add_argument("--labels", type=Path, help="also write the ground-truth labels here")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    p.add_argument("--cells", type=int, default=40, help="number of cells (40)")
    p.add_argument(
        "--modality",
        default="nuclear",
        choices=["nuclear", "whole_cell", "multiplexed", "phase"],
        help="imaging modality to simulate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)

    from cellsam_core._cli_weights import add_weights_commands

    add_weights_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
