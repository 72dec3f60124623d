"""Names, shapes and OME-NGFF 0.5 metadata of the Zarr label store (see `docs/zarr-layout.md`).

Pure functions of an `AcquisitionSpec` (and of pixel values, for the display range): no I/O, so the
layout can be read and tested on its own.

The store is an NGFF **plate**: position ``p`` is the single field ``0`` of one well, the wells laid out
row by row on a near-square grid (`position_path`), because the plate is the multi-image layout that
both ome-zarr-py's `Reader` and napari-ome-zarr open from the store root.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from acquisition.spec import AcquisitionSpec

__all__ = [
    "CELLSAM_KEY",
    "DONE_IMAGE",
    "DONE_LABELS",
    "DONE_TRACKS",
    "HIGH_PERCENTILE",
    "LABEL_IMAGES",
    "LAYOUT_VERSION",
    "LOW_PERCENTILE",
    "NGFF_VERSION",
    "IntensityRange",
    "channel_colors",
    "covers",
    "downsample",
    "frame_intensity_range",
    "image_group_attrs",
    "label_image_attrs",
    "label_z_placement",
    "labels_group_attrs",
    "level_shape",
    "lineage_path",
    "merge_ranges",
    "omero_attrs",
    "plate_grid",
    "position_attrs",
    "position_path",
    "root_attrs",
    "table_name",
    "tracker_state_path",
    "well_attrs",
]

NGFF_VERSION = "0.5"
#: Version of our own layout (plate of positions, `cellsam/` groups, `done`, cell tables); bump on
#: incompatible change. 3: positions moved from ``{p}`` to plate wells ``{row}/{column}/0``. Tracking
#: (``labels/tracks``, ``cellsam/tracked``, ``cellsam/tracker``, ``cellsam/lineage``) was added to layout 3
#: compatibly: a store without it still opens, and its first tracked frame adds it.
LAYOUT_VERSION = 3
#: Key of our metadata in a group's attributes (next to `ome`).
CELLSAM_KEY = "cellsam"
#: Bits of the `done` array: labels and cell table complete; raw image stored too; tracked (track
#: labels, tracked cell table and tracker state written).
DONE_LABELS = 1
DONE_IMAGE = 2
DONE_TRACKS = 4
#: The label images of each position (``{position}/labels/{name}``): cell labels, track labels.
LABEL_IMAGES = ("cells", "tracks")
#: Percentiles of each frame's pixels that bound the display window (robust to hot pixels and dust).
LOW_PERCENTILE = 0.1
HIGH_PERCENTILE = 99.9
#: About this many pixels per channel are sampled (a regular grid) to measure a frame's range.
_SAMPLE_PIXELS = 1 << 16
#: Field of view path inside each well: one position per well.
_FIELD = "0"

#: Default channel colours: grey for a single channel; otherwise green, magenta, cyan, yellow, red,
#: blue, grey (green/magenta first: the pair that stays distinct for colour-blind viewers).
_SINGLE_CHANNEL_COLOR = "FFFFFF"
_PALETTE = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")
_HEX_COLOR = re.compile(r"#?([0-9A-Fa-f]{6})")

#: Per channel, ``[low, high]`` of the pixel values seen so far, or None when none were seen.
IntensityRange = list[list[float] | None]


# -- shapes and names ------------------------------------------------------------------------------


def level_shape(frame_shape: tuple[int, int], level: int) -> tuple[int, int]:
    """(H, W) of multiscale level ``level`` (level 0 = full resolution, each level halves y and x)."""
    factor = 2**level
    return math.ceil(frame_shape[0] / factor), math.ceil(frame_shape[1] / factor)


def downsample(plane: NDArray[Any], level: int) -> NDArray[Any]:
    """Nearest-neighbour downsampling of the last two axes by ``2**level`` (keeps label ids intact).

    Level-k pixel ``i`` is level-0 pixel ``i * 2**k``, so the NGFF scale ``2**k`` alone (no
    translation) maps both onto the same physical coordinates.
    """
    factor = 2**level
    return np.ascontiguousarray(plane[..., ::factor, ::factor])


def table_name(t: int, z: int) -> str:
    """Name of a frame's cell table array inside ``{position}/cellsam/cells`` (``z``: its label plane)."""
    return f"t{t:06d}_z{z:04d}"


def tracker_state_path(position: str, z: int) -> str:
    """Group (in the store) whose attributes hold the tracker state of label plane ``z`` of a position."""
    return f"{position}/cellsam/tracker/z{z:04d}"


def lineage_path(p: int, z: int) -> str:
    """Path (in the store) of the GEFF lineage of position ``p``, label plane ``z``: a symbolic link to its
    current version (`acquisition.lineage.GeffLineageWriter`)."""
    return f"{CELLSAM_KEY}/lineage/p{p:04d}_z{z:04d}.geff"


def plate_grid(n_positions: int) -> tuple[int, int]:
    """(rows, columns) of the near-square well grid that holds ``n_positions`` positions."""
    columns = math.ceil(math.sqrt(n_positions))
    return math.ceil(n_positions / columns), columns


def _row_name(row: int) -> str:
    """Spreadsheet-style row names: A..Z, AA..AZ, BA.. (alphanumeric, as NGFF requires)."""
    name = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def _well(p: int, n_positions: int) -> tuple[int, int]:
    _, columns = plate_grid(n_positions)
    return divmod(p, columns)


def position_path(p: int, n_positions: int) -> str:
    """Group path of position ``p`` (of ``n_positions``) in the store: ``{row}/{column}/0``.

    Wells are filled row by row: with 4 positions, p = 0..3 are ``A/1/0``, ``A/2/0``, ``B/1/0``,
    ``B/2/0``. The root attributes list every position's path (``cellsam.positions``).
    """
    if not 0 <= p < n_positions:
        raise ValueError(f"position {p} is outside [0, {n_positions})")
    row, column = _well(p, n_positions)
    return f"{_row_name(row)}/{column + 1}/{_FIELD}"


# -- metadata --------------------------------------------------------------------------------------


def channel_colors(spec: AcquisitionSpec) -> tuple[str, ...]:
    """One ``RRGGBB`` colour per channel: ``spec.channel_colors`` where given, else the default palette.

    Raises
    ------
    ValueError
        A given colour is not six hex digits (``"00FF00"`` or ``"#00ff00"``).
    """
    given = spec.channel_colors or (None,) * spec.sizes.c
    colors = []
    for index, color in enumerate(given):
        if color is None:
            default = _SINGLE_CHANNEL_COLOR if spec.sizes.c == 1 else _PALETTE[index % len(_PALETTE)]
            colors.append(default)
            continue
        match = _HEX_COLOR.fullmatch(color)
        if match is None:
            raise ValueError(
                f"channel_colors[{index}] = {color!r} is not an RRGGBB hex colour; give e.g. '00FF00'"
            )
        colors.append(match.group(1).upper())
    return tuple(colors)


def position_attrs(spec: AcquisitionSpec, p: int) -> dict[str, Any]:
    """What the store records about position ``p``: index, group path, name and stage coordinates (µm).

    Fields the spec does not give (no `PositionInfo` for ``p``, or one without coordinates) are None.
    """
    info = spec.positions[p].model_dump(mode="json") if p < len(spec.positions) else {}
    return {
        "index": p,
        "path": position_path(p, spec.sizes.p),
        "name": info.get("name"),
        "x_um": info.get("x_um"),
        "y_um": info.get("y_um"),
        "z_um": info.get("z_um"),
    }


def root_attrs(spec: AcquisitionSpec, *, closed: bool = False, summary: Any = None) -> dict[str, Any]:
    """Attributes of the store root: the NGFF plate of positions plus our spec and state.

    ``cellsam.intensity_range`` (None until an image is written) is the per-channel range of pixel
    values seen so far, from which every position's ``omero`` window is derived (`omero_attrs`).
    """
    rows, columns = plate_grid(spec.sizes.p)
    wells = []
    for p in range(spec.sizes.p):
        row, column = _well(p, spec.sizes.p)
        path = position_path(p, spec.sizes.p).rsplit("/", 1)[0]
        wells.append({"path": path, "rowIndex": row, "columnIndex": column})
    plate = {
        # "version" inside "plate" is 0.4's place for it; 0.5 readers take ome.version, and validators
        # (ome-zarr-models) still expect it here.
        "version": NGFF_VERSION,
        "name": spec.acquisition,
        "rows": [{"name": _row_name(r)} for r in range(rows)],
        "columns": [{"name": str(c + 1)} for c in range(columns)],
        "wells": wells,
        "field_count": 1,
    }
    return {
        "ome": {"version": NGFF_VERSION, "plate": plate},
        CELLSAM_KEY: {
            "layout_version": LAYOUT_VERSION,
            "spec": spec.model_dump(mode="json"),
            "positions": [position_attrs(spec, p) for p in range(spec.sizes.p)],
            "closed": closed,
            "summary": summary,
            "intensity_range": None,
        },
    }


def well_attrs() -> dict[str, Any]:
    """Attributes of a well group: its single field of view (one position per well)."""
    return {"ome": {"version": NGFF_VERSION, "well": {"images": [{"path": _FIELD}]}}}


def _space_axis(name: str, size_um: float | None) -> dict[str, Any]:
    axis: dict[str, Any] = {"name": name, "type": "space"}
    if size_um is not None:
        axis["unit"] = "micrometer"
    return axis


def _axes(spec: AcquisitionSpec, with_channel: bool) -> list[dict[str, Any]]:
    time_axis: dict[str, Any] = {"name": "t", "type": "time"}
    if spec.time_interval_s is not None:
        time_axis["unit"] = "second"
    axes = [time_axis]
    if with_channel:
        axes.append({"name": "c", "type": "channel"})
    axes.append(_space_axis("z", spec.z_step_um))
    axes += [_space_axis(name, spec.pixel_size_um) for name in ("y", "x")]
    return axes


def label_z_placement(spec: AcquisitionSpec) -> tuple[float, float]:
    """``(scale, translation)`` along z of the label image: where its planes lie among the image's.

    Every plane segmented: the image's (``z_step_um``, 0). Under a projection z policy the one label plane
    covers what was segmented: a max projection spans the whole stack (scale ``sizes.z * z_step_um``,
    centred on it), a chosen plane lies on that plane (scale ``z_step_um``, translation ``plane *
    z_step_um``). With no z step the unit is one plane.
    """
    step = spec.z_step_um or 1.0
    policy = spec.z_policy
    if policy.policy == "max_projection":
        return spec.sizes.z * step, (spec.sizes.z - 1) / 2 * step
    if policy.plane is not None:
        return step, policy.plane * step
    return step, 0.0


def _multiscale(spec: AcquisitionSpec, with_channel: bool) -> dict[str, Any]:
    projected = not with_channel and spec.z_policy.projects
    z_scale, z_offset = label_z_placement(spec) if projected else (spec.z_step_um or 1.0, 0.0)
    datasets = []
    for level in range(spec.storage.levels):
        pixel = (spec.pixel_size_um or 1.0) * 2**level
        scale = [spec.time_interval_s or 1.0]
        if with_channel:
            scale.append(1.0)
        scale += [z_scale, pixel, pixel]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if projected:
            transforms.append({"type": "translation", "translation": [0.0, z_offset, 0.0, 0.0]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {
        "axes": _axes(spec, with_channel),
        "datasets": datasets,
        "type": "nearest",
        "metadata": {"description": "level k keeps every 2**k-th pixel in y and x"},
    }


def _window(dtype: np.dtype[Any], seen: list[float] | None) -> dict[str, float]:
    """omero window of one channel: ``start``/``end`` = the range seen so far.

    ``min``/``max`` are what the type holds for integer images, the range seen for float images.
    Before any pixel was seen the window is the whole type range (integers) or [0, 1] (floats).
    """
    integer = dtype.kind in "ui"
    if seen is None:
        low, high = (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if integer else (0.0, 1.0)
        return {"min": low, "max": high, "start": low, "end": high}
    start, end = float(seen[0]), float(seen[1])
    if end <= start:  # a constant image: viewers need end > start
        end = start + 1.0
    if not integer:
        return {"min": start, "max": end, "start": start, "end": end}
    low, high = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    if end > high:  # a constant image at the type's maximum
        start, end = high - 1.0, high
    return {"min": low, "max": high, "start": start, "end": end}


def omero_attrs(spec: AcquisitionSpec, intensity: IntensityRange | None = None) -> dict[str, Any]:
    """``omero`` rendering settings: channel names, colours and the display window per channel.

    ``intensity`` is the per-channel range of pixel values seen so far (`merge_ranges` of
    `frame_intensity_range`); None (or a None entry) before any image of that channel was written.
    """
    dtype = np.dtype(spec.image_dtype)
    seen = intensity or [None] * spec.sizes.c
    channels = [
        {
            "label": name,
            "color": color,
            "window": _window(dtype, channel_seen),
            "active": True,
            "family": "linear",
            "coefficient": 1.0,
            "inverted": False,
        }
        for name, color, channel_seen in zip(spec.channels, channel_colors(spec), seen, strict=True)
    ]
    return {"channels": channels, "rdefs": {"model": "color"}}


def image_group_attrs(
    spec: AcquisitionSpec, p: int, intensity: IntensityRange | None = None
) -> dict[str, Any]:
    """Attributes of position ``p``'s image group: multiscale (t, c, z, y, x), omero, position.

    The multiscale has no ``name``: napari-ome-zarr names each channel layer ``"{name}: {channel}"``
    when there is one, and the plate view of the root would then carry position 0's name for every
    position; without it the layers are named after the channels.
    """
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(spec, with_channel=True)],
            "omero": omero_attrs(spec, intensity),
        },
        CELLSAM_KEY: {"position": position_attrs(spec, p)},
    }


def labels_group_attrs(names: Sequence[str] = LABEL_IMAGES) -> dict[str, Any]:
    """Attributes of ``{position}/labels``: the label images it holds."""
    return {"ome": {"version": NGFF_VERSION, "labels": list(names)}}


#: What the values of each label image are (``cellsam.values`` of its attributes).
_LABEL_VALUES = {
    "cells": "cell labels, per frame",
    "tracks": "track ids (cellsam_core.tracking): one id per track across frames, 0 = background",
}


def label_image_attrs(spec: AcquisitionSpec, name: str = "cells") -> dict[str, Any]:
    """Attributes of ``{position}/labels/{name}``: multiscale (t, z, y, x) label image, ``image-label``.

    ``cells`` holds each frame's cell labels, ``tracks`` the same cells numbered by track (a cell keeps
    its value from frame to frame); both share shape, chunks, axes and scales.

    No ``colors``: NGFF viewers then colour every label value with their own label colormap and keep 0
    transparent (napari-ome-zarr turns a ``colors`` list into the only colours it shows, so a list that
    misses a value hides that cell). Label ids are per frame (cell 3 at t=0 is unrelated to cell 3 at
    t=1), so neither colours nor ``properties`` per label value could be listed once for all frames;
    the per-frame cell table holds the per-cell data.

    Under a projection z policy the z axis has one plane, placed by `label_z_placement`, and
    ``cellsam.z_policy`` says what was segmented.
    """
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": [{"name": name, **_multiscale(spec, with_channel=False)}],
            "image-label": {"source": {"image": "../../"}},
        },
        CELLSAM_KEY: {"z_policy": spec.z_policy.model_dump(mode="json"), "values": _LABEL_VALUES[name]},
    }


# -- display range ---------------------------------------------------------------------------------


def frame_intensity_range(image: NDArray[Any]) -> IntensityRange:
    """Robust per-channel range of one frame: its `LOW_PERCENTILE` and `HIGH_PERCENTILE` percentiles.

    Parameters
    ----------
    image : ndarray, shape (C, H, W), integer or float
        The frame's raw image.

    Returns
    -------
    list of [low, high] or None, one per channel
        Measured on a regular grid of about 65,536 pixels per channel (a few hundred microseconds for
        a 2048 x 2048 frame, where the whole frame would take tens of milliseconds). Integer images
        round outward to integers. Non-finite float pixels are ignored; a channel without finite
        pixels gives None.
    """
    _, height, width = image.shape
    step = max(1, math.isqrt(height * width // _SAMPLE_PIXELS))
    sample = image[:, ::step, ::step].reshape(image.shape[0], -1)
    integer = image.dtype.kind in "ui"
    ranges: IntensityRange = []
    for values in sample:
        if not integer:
            values = values[np.isfinite(values)]
            if values.size == 0:
                ranges.append(None)
                continue
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
        if integer:
            low, high = math.floor(low), math.ceil(high)
        ranges.append([float(low), float(high)])
    return ranges


def merge_ranges(a: IntensityRange | None, b: IntensityRange | None) -> IntensityRange | None:
    """Per channel, the smallest range holding both: ``[min(lows), max(highs)]`` (None = nothing seen).

    Commutative, associative and idempotent, so frames may be merged in any order, by any number of
    writers, and a frame merged twice (a retried write) changes nothing.
    """
    if a is None or b is None:
        return b if a is None else a
    merged: IntensityRange = []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            merged.append(y if x is None else [float(x[0]), float(x[1])])
        else:
            merged.append([float(min(x[0], y[0])), float(max(x[1], y[1]))])
    return merged


def covers(known: IntensityRange | None, new: Sequence[Sequence[float] | None]) -> bool:
    """True when ``known`` already holds every channel's range in ``new`` (merging would change nothing)."""
    if known is None:
        return all(n is None for n in new)
    return all(
        n is None or (k is not None and k[0] <= n[0] and n[1] <= k[1])
        for k, n in zip(known, new, strict=True)
    )
