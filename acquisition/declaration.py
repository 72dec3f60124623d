"""Declaring an acquisition as microscope software plans it: from a ``useq.MDASequence`` to ``start`` fields.

pymmcore-plus users describe their acquisition as a :class:`useq.MDASequence`; :func:`from_mda_sequence`
turns one into the declaration a ``start`` message carries (protocol §1.2): sizes per axis, channels with
names, colours and roles, time interval, z step and stage positions. ``useq`` is imported lazily, so this
module works without it (only :func:`from_mda_sequence` needs it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from acquisition.protocol import ChannelRole

__all__ = ["NUCLEAR_NAMES", "from_mda_sequence", "guess_role"]

#: Channel names taken as nuclear stains when no role is given (case-insensitive, anywhere in the name).
NUCLEAR_NAMES = ("dapi", "hoechst", "h2b", "nuc", "draq5", "sytox", "nls")

_COLOR_BY_NAME = {
    "dapi": "0000FF",
    "hoechst": "0000FF",
    "bfp": "0000FF",
    "cfp": "00FFFF",
    "gfp": "00FF00",
    "fitc": "00FF00",
    "yfp": "FFFF00",
    "rfp": "FF0000",
    "mcherry": "FF00FF",
    "cy5": "FF00FF",
    "tritc": "FF0000",
}


def guess_role(name: str) -> ChannelRole:
    """``nuclear`` for a name that looks like a nuclear stain, else ``whole_cell``."""
    lowered = name.lower()
    return "nuclear" if any(key in lowered for key in NUCLEAR_NAMES) else "whole_cell"


def _color_for(name: str) -> str | None:
    lowered = name.lower()
    for key, color in _COLOR_BY_NAME.items():
        if key in lowered:
            return color
    return None


def _hex_color(value: Any) -> str | None:
    """A useq channel colour (a ``Color``/name/tuple) as ``RRGGBB``, or None."""
    if value is None:
        return None
    as_hex = getattr(value, "as_hex", None)
    text = str(as_hex() if callable(as_hex) else value).lstrip("#")
    if re.fullmatch(r"[0-9A-Fa-f]{6}", text):
        return text.upper()
    if re.fullmatch(r"[0-9A-Fa-f]{3}", text):
        return "".join(ch * 2 for ch in text).upper()
    return None


def from_mda_sequence(
    sequence: Any,
    *,
    pixel_size_um: float | None = None,
    roles: Mapping[str, ChannelRole] | None = None,
) -> dict[str, Any]:
    """The ``start`` fields declaring the acquisition ``sequence`` will make.

    Parameters
    ----------
    sequence : useq.MDASequence
        The plan (``sizes``, ``channels``, ``time_plan``, ``z_plan``, ``stage_positions``).
    pixel_size_um : float, optional
        Pixel size (pymmcore-plus: ``core.getPixelSizeUm()``); MDASequence does not hold it.
    roles : mapping of channel name to role, optional
        ``nuclear``, ``whole_cell`` or ``ignore`` per channel config name; channels not listed get
        :func:`guess_role`.

    Returns
    -------
    dict
        Keyword arguments for :meth:`acquisition.client.FrameSender.start` / ``StartMessage``:
        ``sizes``, ``channels``, ``time_interval_s``, ``z_step_um``, ``positions``, ``pixel_size_um``.
    """
    sizes = {}
    for key, size in dict(sequence.sizes).items():
        axis = str(getattr(key, "value", key))
        if axis in ("t", "p", "z", "c") and size:
            sizes[axis] = int(size)
    names = [str(ch.config) for ch in sequence.channels]
    chosen = dict(roles or {})
    channel_roles = [chosen.get(name, guess_role(name)) for name in names]
    colors = [
        _hex_color(getattr(ch, "color", None)) or _color_for(name)
        for ch, name in zip(sequence.channels, names, strict=True)
    ]
    fields: dict[str, Any] = {"sizes": sizes}
    if names:
        fields["channels"] = {"names": names, "roles": channel_roles, "colors": colors}
    interval = getattr(sequence.time_plan, "interval", None) if sequence.time_plan is not None else None
    if interval is not None:
        seconds = interval.total_seconds() if hasattr(interval, "total_seconds") else float(interval)
        if seconds > 0:
            fields["time_interval_s"] = seconds
    step = getattr(sequence.z_plan, "step", None) if sequence.z_plan is not None else None
    if step:
        fields["z_step_um"] = float(step)
    positions = [{"name": p.name, "x_um": p.x, "y_um": p.y, "z_um": p.z} for p in sequence.stage_positions]
    if positions:
        fields["positions"] = positions
    if pixel_size_um:
        fields["pixel_size_um"] = float(pixel_size_um)
    return fields
