"""Segmenting images with more axes than one frame: z-stacks, time-lapses, channel-first files.

An axes string names every axis of the array, from ``T``, ``P``, ``C``, ``Z``, ``Y``, ``X`` (e.g. ``ZYX``,
``CYX``, ``TCZYX``). Every (T, P, Z) plane is segmented on its own with :func:`cellsam_core.segment`, its
``C`` channels (at most 3, in the multiplexed convention: blank, nuclear, whole-cell; fewer fill the last
slots) given to the model together; the labels come back with the same axes minus ``C``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from cellsam_core.errors import ImageFormatError

if TYPE_CHECKING:
    from cellsam_core.inference import DecodeOptions, EncodeOptions
    from cellsam_core.modeling.cellsam import CellSAM

__all__ = ["AXES", "label_axes", "planes", "segment_stack"]

#: Axis letters an axes string may use.
AXES = "TPCZYX"


def _check(shape: tuple[int, ...], axes: str) -> str:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ImageFormatError(f"axes {axes!r} name {len(axes)} axes but the image has {len(shape)}: {shape}")
    unknown = sorted(set(axes) - set(AXES))
    if unknown or len(set(axes)) != len(axes):
        raise ImageFormatError(f"axes {axes!r}: use each of {', '.join(AXES)} at most once")
    if "Y" not in axes or "X" not in axes:
        raise ImageFormatError(f"axes {axes!r} must include Y and X")
    if "C" in axes and shape[axes.index("C")] > 3:
        raise ImageFormatError(
            f"{shape[axes.index('C')]} channels on axis C: the model takes at most 3 (blank, nuclear, "
            "whole-cell); pick them first"
        )
    return axes


def label_axes(axes: str) -> str:
    """The axes of the labels :func:`segment_stack` returns: ``axes`` without ``C``, in the same order."""
    return axes.upper().replace("C", "")


def planes(image: np.ndarray, axes: str) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Every plane of ``image``: ``(index along the label axes other than Y, X; (H, W) or (H, W, C))``."""
    axes = _check(image.shape, axes)
    order = [a for a in axes if a not in "CYX"] + ["Y", "X"] + (["C"] if "C" in axes else [])
    arranged = np.transpose(image, [axes.index(a) for a in order])
    outer = arranged.shape[: len(order) - (3 if "C" in axes else 2)]
    for index in itertools.product(*(range(n) for n in outer)):
        yield index, arranged[index]


def segment_stack(
    image: np.ndarray,
    model: CellSAM,
    axes: str,
    *,
    encode_options: EncodeOptions | None = None,
    decode_options: DecodeOptions | None = None,
    on_plane: Callable[[tuple[int, ...]], None] | None = None,
) -> np.ndarray:
    """Segment every (T, P, Z) plane of ``image``; labels have ``label_axes(axes)`` as their axes.

    Parameters
    ----------
    image : ndarray
        Any numeric array whose axes ``axes`` names.
    model : CellSAM
    axes : str
        E.g. ``"ZYX"``, ``"CYX"``, ``"TCZYX"`` (see the module docstring).
    encode_options, decode_options : optional
        As for :func:`cellsam_core.segment`.
    on_plane : callable, optional
        Called with each plane's index once it is segmented (progress).

    Returns
    -------
    ndarray
        uint32 labels, one label image per plane, in ``label_axes(axes)`` order; label values are per plane.
    """
    from cellsam_core.inference import segment

    axes = _check(image.shape, axes)
    out_axes = label_axes(axes)
    outer_axes = [a for a in out_axes if a not in "YX"]
    height, width = image.shape[axes.index("Y")], image.shape[axes.index("X")]
    outer_shape = tuple(image.shape[axes.index(a)] for a in outer_axes)
    labels = np.zeros((*outer_shape, height, width), dtype=np.uint32)
    for index, plane in planes(image, axes):
        result = segment(plane, model, encode_options=encode_options, decode_options=decode_options)
        labels[index] = result.labels
        if on_plane is not None:
            on_plane(index)
    # `labels` is (outer..., Y, X); put Y and X back where `axes` has them.
    arranged = [*outer_axes, "Y", "X"]
    return np.transpose(labels, [arranged.index(a) for a in out_axes])
