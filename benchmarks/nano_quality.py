"""Quality of a cellsam-nano model through ``segment()``: held-out F1 per modality, false cells on frames
with no cells, border objects, and (given annotated real images) real-data F1, whole and tiled.

    python benchmarks/nano_quality.py                                  # the bundled weights
    python benchmarks/nano_quality.py --weights new.pt --baseline      # and the bundled ones, same run
    python benchmarks/nano_quality.py --real img2d.tif mask2d.tif      # + a real image and its 4x4 mosaic
    python benchmarks/nano_quality.py --min-scores 0 0.4 0.45 0.5     # calibrate the box-score floor

Held-out frames: :func:`cellsam_core.training.assess.heldout_frames` (seeds from 900,000; never used in
training), ``--frames`` per modality, half 256² with 40 cells and half 512² with 80 (tissue and
membrane: 150 and 600). ``dic``, ``stained`` and ``membrane`` are held out of training altogether.
Empty frames: every modality rendered with no cells, plus a flat frame, pure camera noise, a gradient and
a vignetted field.
F1 is at IoU 0.5 (one-to-one matching).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cellsam_core.checkpoint import BUNDLED_WEIGHTS, load_model
from cellsam_core.evaluation import evaluate
from cellsam_core.inference import DecodeOptions, segment
from cellsam_core.io import read_image
from cellsam_core.modalities import MODALITIES
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.synthetic import synthetic_frame
from cellsam_core.training.assess import heldout_frames
from cellsam_core.training.data import HELD_OUT


def _f1(truth: list[np.ndarray], pred: list[np.ndarray]) -> tuple[float, float, float]:
    counts = [c[0.5] for c in evaluate(truth, [p.astype(np.int64) for p in pred]).per_image]
    tp, fp, fn = (sum(getattr(c, k) for c in counts) for k in ("tp", "fp", "fn"))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return f1, tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def _empty_frames(side: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[-1 : 1 : side * 1j, -1 : 1 : side * 1j]
    frames = {
        f"{m} (no cells)": synthetic_frame((side, side), seed=11, modality=m, n_cells=0)[0]  # type: ignore[arg-type]
        for m in MODALITIES
    }
    frames["flat"] = np.full((side, side), 500, np.uint16)
    frames["camera noise"] = (100 + rng.normal(0, 3, (side, side))).astype(np.float32)
    frames["gradient"] = (300 + 200 * xx + rng.normal(0, 5, (side, side))).astype(np.float32)
    frames["vignetted"] = (2000 * (1 - 0.4 * (xx**2 + yy**2)) + rng.normal(0, 20, (side, side))).astype(
        np.float32
    )
    return frames


def _touching_border(labels: np.ndarray) -> int:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return int(np.unique(edge[edge > 0]).size)


def _mosaic(image: np.ndarray, truth: np.ndarray, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    big = np.tile(image, (n, n) + (1,) * (image.ndim - 2))
    out = np.zeros(big.shape[:2], np.int64)
    h, w = truth.shape
    step = int(truth.max())
    for k, (i, j) in enumerate((i, j) for i in range(n) for j in range(n)):
        t = truth.astype(np.int64)
        out[i * h : (i + 1) * h, j * w : (j + 1) * w] = np.where(t > 0, t + k * step, 0)
    return big, out


def assess(model: CellSAM, args: argparse.Namespace, options: DecodeOptions) -> dict[str, object]:
    rows: dict[str, object] = {}
    seg = lambda img: segment(img, model, decode_options=options).labels  # noqa: E731
    for modality in MODALITIES:
        images, truth = heldout_frames(modality, args.frames)
        preds = [seg(img) for img in images]
        f1, p, r = _f1(truth, preds)
        border = sum(_touching_border(x) for x in preds) / max(sum(_touching_border(t) for t in truth), 1)
        rows[modality] = (f1, p, r, border)
    empty = {name: int(np.unique(seg(img)).size - 1) for name, img in _empty_frames().items()}
    rows["empty"] = empty
    for image_path, mask_path in args.real or []:
        image, truth = read_image(Path(image_path)), read_image(Path(mask_path)).astype(np.int64)
        name = Path(image_path).name
        rows[f"real {name}"] = _f1([truth], [seg(image)])
        big, big_truth = _mosaic(image, truth)
        start = time.perf_counter()
        pred = seg(big)
        rows[f"real {name} 4x4 mosaic (tiled)"] = (*_f1([big_truth], [pred]), time.perf_counter() - start)
    return rows


def _print(name: str, rows: dict[str, object]) -> None:
    print(f"\n== {name}")
    print(f"{'modality':<14} {'F1@0.5':>7} {'prec':>6} {'recall':>6} {'border objs pred/true':>22}")
    for modality in MODALITIES:
        f1, p, r, border = rows[modality]  # type: ignore[misc]
        note = "  (held out of training)" if modality in HELD_OUT else ""
        print(f"{modality:<14} {f1:7.3f} {p:6.3f} {r:6.3f} {border:22.2f}{note}")
    empty: dict[str, int] = rows["empty"]  # type: ignore[assignment]
    print(f"cells found on frames without cells: {sum(empty.values())} in total")
    print("  " + ", ".join(f"{k}: {v}" for k, v in empty.items()))
    for key, value in rows.items():
        if key.startswith("real"):
            extra = f" ({value[3]:.1f} s)" if len(value) > 3 else ""  # type: ignore[arg-type]
            print(f"{key}: F1@0.5 {value[0]:.3f} (precision {value[1]:.3f}, recall {value[2]:.3f}){extra}")  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS, help="model to assess")
    parser.add_argument("--baseline", action="store_true", help="also assess the bundled weights")
    parser.add_argument("--frames", type=int, default=6, help="held-out frames per modality (6)")
    parser.add_argument("--real", nargs=2, action="append", metavar=("IMAGE", "LABELS"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.4], help="bbox_threshold values")
    parser.add_argument(
        "--min-scores",
        type=float,
        nargs="+",
        default=[None],
        help="min_box_score values (default: the model's own)",
    )
    args = parser.parse_args()

    print(
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.python_version()}"
    )
    models = [(str(args.weights), load_model(args.weights))]
    if args.baseline and Path(args.weights) != BUNDLED_WEIGHTS:
        models.append(("bundled", load_model(BUNDLED_WEIGHTS)))
    for name, model in models:
        for threshold in args.thresholds:
            for floor in args.min_scores:
                options = DecodeOptions(bbox_threshold=threshold, min_box_score=floor)
                rows = assess(model, args, options)
                floor_name = "the model's" if floor is None else floor
                _print(f"{name}, bbox_threshold {threshold}, min_box_score {floor_name}", rows)


if __name__ == "__main__":
    main()
