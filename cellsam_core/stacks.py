"""Segmenting images with more axes than one frame: z-stacks, time-lapses, channel-first files.

An axes string names every axis of the array, from ``T``, ``P``, ``C``, ``Z``, ``Y``, ``X`` (e.g. ``ZYX``,
``CYX``, ``TCZYX``). Every (T, P, Z) plane is segmented on its own with :func:`cellsam_core.segment`, its
``C`` channels (at most 3, in the multiplexed convention: blank, nuclear, whole-cell; fewer fill the last
slots) given to the model together; the labels come back with the same axes minus ``C``.

A :class:`ZPolicy` says what of a z-stack is segmented: every plane (``planes``, the default), the
per-channel maximum over z (``max_projection``) or one chosen plane (``plane``); under the last two each
(T, P) is segmented once and its labels keep a ``Z`` axis of size 1. The streaming service applies the
same policy (its ``z`` setting) to the z-stacks it receives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cellsam_core.errors import ImageFormatError

if TYPE_CHECKING:
    from cellsam_core.inference import DecodeOptions, EncodeOptions
    from cellsam_core.modeling.cellsam import CellSAM

__all__ = ["AXES", "ZPolicy", "label_axes", "planes", "segment_stack"]

#: Axis letters an axes string may use.
AXES = "TPCZYX"


class ZPolicy(BaseModel):
    """What of a z-stack is segmented, and so how many label planes a (t, p) gets.

    ``planes``: every z plane on its own, labels per (t, p, z). ``max_projection``: the maximum over z of
    each channel, segmented once per (t, p). ``plane``: z plane ``plane`` alone, once per (t, p); the other
    planes are kept (stored raw) but not segmented. Under both projections the labels of a (t, p) are one
    plane. A stack of one plane is its own projection under every policy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["planes", "max_projection", "plane"] = Field(
        "planes",
        description="planes: segment every z plane (labels per (t, p, z)); max_projection: segment the "
        "per-channel maximum over z once per (t, p); plane: segment z plane `plane` once per (t, p), "
        "the other planes stored raw without segmenting.",
    )
    plane: int | None = Field(
        None, ge=0, description="The z plane segmented under policy `plane` (0 = first); only with it."
    )

    @model_validator(mode="after")
    def _plane_with_its_policy(self) -> ZPolicy:
        if (self.policy == "plane") != (self.plane is not None):
            raise ValueError(
                "z policy 'plane' needs the plane to segment (plane: N), and only it takes one; "
                f"got policy={self.policy!r}, plane={self.plane!r}"
            )
        return self

    @classmethod
    def parse(cls, text: str) -> ZPolicy:
        """The policy a short form names: ``planes``, ``max`` (or ``max_projection``), ``plane:N``.

        Raises
        ------
        ValueError
            ``text`` is none of these.
        """
        name, _, plane = text.strip().lower().partition(":")
        if name in ("planes", "max", "max_projection") and not plane:
            return cls(policy="max_projection" if name.startswith("max") else "planes")
        if name == "plane" and plane.isdigit():
            return cls(policy="plane", plane=int(plane))
        raise ValueError(f"z policy {text!r}: give planes, max or plane:N (N = the z plane, from 0)")

    @property
    def projects(self) -> bool:
        """Whether a (t, p) is segmented once (a projection or a chosen plane) rather than per plane."""
        return self.policy != "planes"

    def describe(self) -> str:
        """The short form :meth:`parse` reads (``planes``, ``max``, ``plane:N``)."""
        return {"planes": "planes", "max_projection": "max"}.get(self.policy, f"plane:{self.plane}")

    def project(self, stack: np.ndarray, axis: int = 0) -> np.ndarray:
        """The image segmented for a z-stack under a projection policy: ``stack`` without its z axis.

        Parameters
        ----------
        stack : ndarray
            Any numeric array; ``axis`` is its z axis (e.g. ``(Z, H, W)`` or ``(Z, H, W, C)`` with axis 0).
        axis : int

        Returns
        -------
        ndarray
            ``max_projection``: the maximum over z (each channel on its own), same dtype; ``plane``: that
            plane (a view).

        Raises
        ------
        ImageFormatError
            Policy ``planes`` (nothing to project), or the chosen plane is not in the stack.
        """
        size = stack.shape[axis]
        if self.policy == "max_projection":
            return np.max(stack, axis=axis)
        if self.policy == "plane" and self.plane is not None:
            if self.plane >= size:
                raise ImageFormatError(
                    f"z plane {self.plane} was chosen but the stack has {size} plane(s) (0..{size - 1})"
                )
            return np.take(stack, self.plane, axis=axis)
        raise ImageFormatError("z policy 'planes' segments every plane: there is no projection")


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
    z_policy: ZPolicy | None = None,
    encode_options: EncodeOptions | None = None,
    decode_options: DecodeOptions | None = None,
    on_plane: Callable[[tuple[int, ...]], None] | None = None,
) -> np.ndarray:
    """Segment every (T, P, Z) plane of ``image``, or once per (T, P) under a projection z policy.

    Parameters
    ----------
    image : ndarray
        Any numeric array whose axes ``axes`` names.
    model : CellSAM
    axes : str
        E.g. ``"ZYX"``, ``"CYX"``, ``"TCZYX"`` (see the module docstring).
    z_policy : ZPolicy, optional
        Default ``planes``. With ``max_projection`` or ``plane`` each (T, P) stack is projected over ``Z``
        (:meth:`ZPolicy.project`, channels apart) and segmented once; needs a ``Z`` axis.
    encode_options, decode_options : optional
        As for :func:`cellsam_core.segment`.
    on_plane : callable, optional
        Called with each segmented plane's index once it is done (progress); under a projection the index
        has 0 for Z.

    Returns
    -------
    ndarray
        uint32 labels in ``label_axes(axes)`` order, label values per segmented plane. Under a projection
        the ``Z`` axis is kept with size 1.

    Raises
    ------
    ImageFormatError
        Bad axes; a projection policy without a ``Z`` axis, or a chosen plane beyond it.
    """
    from cellsam_core.inference import segment

    axes = _check(image.shape, axes)
    policy = z_policy or ZPolicy()
    if policy.projects:
        if "Z" not in axes:
            raise ImageFormatError(
                f"z policy {policy.describe()!r} projects the Z axis, but axes {axes!r} have none"
            )
        z = axes.index("Z")
        image = np.expand_dims(policy.project(image, axis=z), z)
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
