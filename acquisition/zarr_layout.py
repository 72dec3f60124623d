"""Names, shapes and OME-NGFF 0.5 metadata of the Zarr label store (see `docs/zarr-layout.md`).

Pure functions of an `AcquisitionSpec`: no I/O, so the layout can be read and tested on its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from acquisition.spec import AcquisitionSpec

__all__ = [
    "CELLSAM_KEY",
    "DONE_IMAGE",
    "DONE_LABELS",
    "LAYOUT_VERSION",
    "NGFF_VERSION",
    "downsample",
    "image_group_attrs",
    "label_image_attrs",
    "labels_group_attrs",
    "level_shape",
    "ome_group_attrs",
    "root_attrs",
    "table_name",
]

NGFF_VERSION = "0.5"
#: Version of our own layout (groups `cellsam/`, `done`, cell tables); bump on incompatible change.
LAYOUT_VERSION = 2
#: Key of our metadata in the root group's attributes (next to `ome`).
CELLSAM_KEY = "cellsam"
#: Bits of the `done` array: labels and cell table complete; raw image stored too.
DONE_LABELS = 1
DONE_IMAGE = 2

_CHANNEL_COLORS = ("FFFFFF", "00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00")


def level_shape(frame_shape: tuple[int, int], level: int) -> tuple[int, int]:
    """(H, W) of multiscale level ``level`` (level 0 = full resolution, each level halves y and x)."""
    factor = 2**level
    return math.ceil(frame_shape[0] / factor), math.ceil(frame_shape[1] / factor)


def downsample(plane: NDArray[Any], level: int) -> NDArray[Any]:
    """Nearest-neighbour downsampling of the last two axes by ``2**level`` (keeps label ids intact)."""
    factor = 2**level
    return np.ascontiguousarray(plane[..., ::factor, ::factor])


def table_name(t: int, z: int) -> str:
    """Name of a frame's cell table array inside ``{p}/cellsam/cells``."""
    return f"t{t:06d}_z{z:04d}"


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


def _multiscales(spec: AcquisitionSpec, name: str, with_channel: bool) -> list[dict[str, Any]]:
    datasets = []
    for level in range(spec.storage.levels):
        pixel = (spec.pixel_size_um or 1.0) * 2**level
        scale = [spec.time_interval_s or 1.0]
        if with_channel:
            scale.append(1.0)
        scale += [spec.z_step_um or 1.0, pixel, pixel]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    return [
        {
            "name": name,
            "axes": _axes(spec, with_channel),
            "datasets": datasets,
            "type": "nearest",
            "metadata": {"description": "level k keeps every 2**k-th pixel in y and x"},
        }
    ]


def _window(dtype: np.dtype[Any]) -> dict[str, float]:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        low, high = float(info.min), float(info.max)
    else:
        low, high = 0.0, 1.0
    return {"min": low, "max": high, "start": low, "end": high}


def root_attrs(spec: AcquisitionSpec, *, closed: bool = False, summary: Any = None) -> dict[str, Any]:
    """Attributes of the store root: bioformats2raw collection marker plus our spec and state."""
    return {
        "ome": {"version": NGFF_VERSION, "bioformats2raw.layout": 3},
        CELLSAM_KEY: {
            "layout_version": LAYOUT_VERSION,
            "spec": spec.model_dump(mode="json"),
            "closed": closed,
            "summary": summary,
        },
    }


def ome_group_attrs(spec: AcquisitionSpec) -> dict[str, Any]:
    """Attributes of the ``OME`` group: the list of series (one per position)."""
    return {"ome": {"version": NGFF_VERSION, "series": [str(p) for p in range(spec.sizes.p)]}}


def image_group_attrs(spec: AcquisitionSpec, p: int) -> dict[str, Any]:
    """Attributes of series ``p``: multiscale image (t, c, z, y, x) and omero channel rendering."""
    dtype = np.dtype(spec.image_dtype)
    channels = [
        {
            "label": name,
            "color": _CHANNEL_COLORS[i % len(_CHANNEL_COLORS)],
            "window": _window(dtype),
            "active": True,
        }
        for i, name in enumerate(spec.channels)
    ]
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": _multiscales(spec, f"{spec.acquisition}/{p}", with_channel=True),
            "omero": {"channels": channels, "rdefs": {"model": "color"}},
        }
    }


def labels_group_attrs() -> dict[str, Any]:
    """Attributes of ``{p}/labels``: the label images it holds."""
    return {"ome": {"version": NGFF_VERSION, "labels": ["cells"]}}


def label_image_attrs(spec: AcquisitionSpec, p: int) -> dict[str, Any]:
    """Attributes of ``{p}/labels/cells``: multiscale (t, z, y, x) label image with image-label metadata.

    Label ids are per frame (cell 3 at t=0 is unrelated to cell 3 at t=1), so no per-label colours or
    properties are listed; only the background is made transparent.
    """
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": _multiscales(spec, f"{spec.acquisition}/{p}/labels/cells", with_channel=False),
            "image-label": {
                "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
                "source": {"image": "../../"},
            },
        }
    }
