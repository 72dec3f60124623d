"""Tracking accuracy against ground truth: the Cell Tracking Challenge measures, computed by ``traccuracy``.

Both sides go through the CTC files of :mod:`acquisition.ctc` (written to a temporary folder and read
back with ``traccuracy``'s own CTC loader and format checks), so what is measured is exactly what a CTC
evaluation of those files gives:

``TRA``, ``DET``, ``LNK``
    CTC tracking, detection and linking accuracy (AOGM-based, 1 = perfect), with the CTC matcher (a
    result cell matches a true cell covering the majority of it).
``division_precision``, ``division_recall``, ``division_f1``
    Divisions (parent and both daughters matched) with IoU ≥ 0.5 one-to-one matching, no frame
    tolerance.

``traccuracy`` is a development dependency (the ``dev`` extra); it is imported on first use.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from acquisition.ctc import CtcTrack, to_ctc, write_ctc

__all__ = ["tracking_metrics"]


def tracking_metrics(
    truth_frames: Sequence[NDArray[np.integer]],
    truth_tracks: Sequence[CtcTrack],
    track_labels: Sequence[NDArray[np.integer]],
    parents: Mapping[int, int],
) -> dict[str, float]:
    """CTC metrics and division scores of a tracking result (see the module docstring).

    Parameters
    ----------
    truth_frames : sequence of ndarray, (H, W)
        Ground-truth CTC label images, frame ``t`` at index ``t``.
    truth_tracks : sequence of CtcTrack
        Their tracks.
    track_labels : sequence of ndarray, (H, W)
        The result: label images whose values are track ids (gaps allowed, as
        :attr:`cellsam_core.tracking.TrackedFrame.track_labels`).
    parents : mapping of int to int
        Result track id → parent track id, for tracks that have one.

    Returns
    -------
    dict of str to float
        ``TRA``, ``DET``, ``LNK``, ``division_precision``, ``division_recall``, ``division_f1``, and the
        counts ``true_divisions`` and ``found_divisions``.
    """
    from traccuracy import run_metrics
    from traccuracy.loaders import load_ctc_data
    from traccuracy.matchers import CTCMatcher, IOUMatcher
    from traccuracy.metrics import CTCMetrics, DivisionMetrics

    frames, tracks = to_ctc(track_labels, parents)
    with tempfile.TemporaryDirectory() as tmp:
        gt_dir = write_ctc(Path(tmp) / "gt", truth_frames, truth_tracks, kind="gt")
        res_dir = write_ctc(Path(tmp) / "res", frames, tracks, kind="res")
        # traccuracy logs per-step info and format warnings (e.g. a label in two pieces, which the CTC
        # measures allow); keep the output of a benchmark readable.
        logging.getLogger("traccuracy").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gt = load_ctc_data(str(gt_dir), name="truth")
            res = load_ctc_data(str(res_dir), name="result")
            ctc, _ = run_metrics(gt, res, CTCMatcher(), [CTCMetrics()])
            div, _ = run_metrics(gt, res, IOUMatcher(iou_threshold=0.5, one_to_one=True), [DivisionMetrics()])
    scores = ctc[0]["results"]
    division = div[0]["results"]
    buffer = next(iter(v for k, v in division.items() if k.startswith("Frame Buffer")), division)
    out = {name: float(scores[name]) for name in ("TRA", "DET", "LNK")}
    out["division_precision"] = float(buffer["Division Precision"])
    out["division_recall"] = float(buffer["Division Recall"])
    out["division_f1"] = float(buffer["Division F1"])
    out["true_divisions"] = float(buffer["Total GT Divisions"])
    out["found_divisions"] = float(buffer["True Positive Divisions"] + buffer["False Positive Divisions"])
    return out
