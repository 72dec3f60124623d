"""Cell Tracking Challenge (CTC) format: tracks as label images plus a ``L B E P`` text file.

A CTC track is one label ``L`` present in every frame from ``B`` to ``E`` (inclusive) and nowhere else,
whose parent track ``P`` (0 = none) ended before ``B``. A parent with two daughters is a division; a
parent with one is a track that went missing for some frames and came back (gap closing). This module
converts label images whose values are track ids (e.g.
:attr:`cellsam_core.tracking.TrackedFrame.track_labels`, where a track may skip frames) into that form,
and reads and writes it:

============  ==================================  =====================
kind          label images                        track file
============  ==================================  =====================
``"gt"``      ``man_track000.tif`` ...            ``man_track.txt``
``"res"``     ``mask000.tif`` ...                 ``res_track.txt``
============  ==================================  =====================

(the ground truth ``TRA`` folder and a result folder of the CTC), one file per frame, frame numbers of at
least three digits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from acquisition.errors import TrackFileError

__all__ = ["CtcTrack", "read_ctc", "to_ctc", "write_ctc"]

CtcKind = Literal["gt", "res"]
_NAMES: dict[str, tuple[str, str]] = {"gt": ("man_track", "man_track.txt"), "res": ("mask", "res_track.txt")}


@dataclass(frozen=True, slots=True)
class CtcTrack:
    """One line ``L B E P`` of a CTC track file: label, first and last frame (inclusive), parent label."""

    label: int
    begin: int
    end: int
    parent: int = 0


def to_ctc(
    frames: Sequence[NDArray[np.integer]], parents: Mapping[int, int] | None = None
) -> tuple[list[NDArray[np.uint32]], list[CtcTrack]]:
    """Turn label images whose values are track ids into CTC tracks.

    A track present in frames with gaps becomes one CTC track per unbroken run; each later run gets a new
    label (after the largest id) whose parent is the run before it. A track's parent (``parents``) becomes
    the parent of its first run and refers to the parent track's last run.

    Parameters
    ----------
    frames : sequence of ndarray, (H, W), non-negative integers
        Frame ``t`` is ``frames[t]``; values are track ids, 0 background.
    parents : mapping of int to int, optional
        Track id → parent track id, for tracks that have one.

    Returns
    -------
    frames : list of ndarray, uint32 (H, W)
        Relabelled so that every value is one CTC track (unchanged where no track has gaps).
    tracks : list of CtcTrack
        Sorted by label.
    """
    parents = dict(parents or {})
    present = [np.unique(np.asarray(f)) for f in frames]
    runs: dict[int, list[list[int]]] = {}  # track id -> runs of frame numbers
    for t, ids in enumerate(present):
        for tid in ids[ids > 0].tolist():
            track_runs = runs.setdefault(tid, [])
            if track_runs and track_runs[-1][-1] == t - 1:
                track_runs[-1].append(t)
            else:
                track_runs.append([t])
    next_label = max(runs, default=0) + 1
    relabel: dict[int, dict[int, int]] = {}  # frame -> {track id: label} where the label changes
    tracks: list[CtcTrack] = []
    last_run_label: dict[int, int] = {}
    first_run_label: dict[int, int] = {}
    for tid in sorted(runs):
        previous = 0
        for r, run in enumerate(runs[tid]):
            label = tid if r == 0 else next_label
            if r:
                next_label += 1
                for t in run:
                    relabel.setdefault(t, {})[tid] = label
            else:
                first_run_label[tid] = label
            tracks.append(CtcTrack(label, run[0], run[-1], previous))
            previous = label
        last_run_label[tid] = previous
    by_label = {tr.label: tr for tr in tracks}
    for tid, parent in parents.items():
        if parent and tid in first_run_label and parent in last_run_label:
            label = first_run_label[tid]
            by_label[label] = CtcTrack(
                label, by_label[label].begin, by_label[label].end, last_run_label[parent]
            )
    out: list[NDArray[np.uint32]] = []
    for t, frame in enumerate(frames):
        arr = np.asarray(frame).astype(np.uint32)
        changes = relabel.get(t)
        if changes:
            lut = np.arange(int(arr.max()) + 1, dtype=np.uint32)
            for tid, lab in changes.items():
                lut[tid] = lab
            arr = lut[arr]
        out.append(arr)
    return out, sorted(by_label.values(), key=lambda tr: tr.label)


def write_ctc(
    directory: str | Path,
    frames: Sequence[NDArray[np.integer]],
    tracks: Sequence[CtcTrack],
    *,
    kind: CtcKind = "gt",
) -> Path:
    """Write CTC label images and the track file into ``directory`` (created); returns it.

    Label images are uint16 when every label fits, else uint32 (as the CTC tools read both).

    Raises
    ------
    TrackFileError
        A label image is not 2-D, or a track's frames or parent are inconsistent with the images.
    """
    if kind not in _NAMES:
        raise TrackFileError(f"kind must be 'gt' or 'res', got {kind!r}")
    import tifffile

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem, track_file = _NAMES[kind]
    labels = {tr.label for tr in tracks}
    for tr in tracks:
        if tr.begin > tr.end or (tr.parent and tr.parent not in labels):
            raise TrackFileError(f"CTC track {tr} has begin > end or an unknown parent")
    width = max(3, len(str(max(len(frames) - 1, 0))))
    top = max((tr.label for tr in tracks), default=0)
    dtype = np.uint16 if top < 2**16 else np.uint32
    for t, frame in enumerate(frames):
        arr = np.asarray(frame)
        if arr.ndim != 2:
            raise TrackFileError(f"CTC frame {t} must be a 2-D label image, got shape {arr.shape}")
        tifffile.imwrite(out / f"{stem}{t:0{width}d}.tif", arr.astype(dtype), compression="zlib")
    lines = [f"{tr.label} {tr.begin} {tr.end} {tr.parent}\n" for tr in sorted(tracks, key=lambda x: x.label)]
    (out / track_file).write_text("".join(lines))
    return out


def read_ctc(directory: str | Path) -> tuple[list[NDArray[np.uint32]], list[CtcTrack]]:
    """Read what :func:`write_ctc` wrote (either kind): label images in frame order, and the tracks.

    Raises
    ------
    TrackFileError
        No track file, or no label images, in ``directory``.
    """
    import tifffile

    root = Path(directory)
    found = [(stem, name) for stem, name in _NAMES.values() if (root / name).exists()]
    if not found:
        raise TrackFileError(f"{root} holds neither man_track.txt nor res_track.txt")
    stem, track_file = found[0]
    pattern = re.compile(rf"^{stem}(\d+)\.tif$")
    files = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name)) is not None)
    if not files:
        raise TrackFileError(f"{root} holds no {stem}NNN.tif label images")
    frames = [tifffile.imread(p).astype(np.uint32) for _, p in files]
    tracks = []
    for line in (root / track_file).read_text().splitlines():
        if line.strip():
            label, begin, end, parent = (int(v) for v in line.split())
            tracks.append(CtcTrack(label, begin, end, parent))
    return frames, tracks
