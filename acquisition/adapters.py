"""Microscope adapters: forward frames from pymmcore-plus and pycromanager to a :class:`FrameSender`.

Neither library is imported here: the adapters follow their documented callback signatures, so this
module works (and is importable) without them.

pymmcore-plus
-------------
``core.mda.events.frameReady`` emits ``(img: np.ndarray, event: useq.MDAEvent, meta: dict)``::

    import useq
    from pymmcore_plus import CMMCorePlus
    from acquisition.adapters import PymmcorePlusForwarder
    from acquisition.client import FrameSender

    core = CMMCorePlus.instance()
    core.loadSystemConfiguration()
    sender = FrameSender(endpoint="tcp://127.0.0.1:5555", timeout=2.0)
    forwarder = PymmcorePlusForwarder(sender).connect(core.mda)   # start/frames/end per sequence
    core.mda.run(useq.MDASequence(time_plan={"interval": 1, "loops": 20}, channels=["DAPI"]))
    forwarder.disconnect()
    sender.close()   # delivers what is queued; always close before the process exits

pycromanager
------------
``Acquisition(image_process_fn=...)`` calls ``fn(image, metadata)``; ``metadata["Axes"]`` holds the
event's axes (``time``, ``position``, ``z``, ``channel``)::

    from pycromanager import Acquisition, multi_d_acquisition_events
    from acquisition.adapters import PycromanagerForwarder
    from acquisition.client import FrameSender

    hook = PycromanagerForwarder(FrameSender(timeout=2.0), acquisition="exp42")
    with Acquisition(directory="/data", name="exp42", image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=20))
    hook.finish()   # sends `end`
    hook.sender.close()
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from acquisition.client import FrameSender
from acquisition.declaration import guess_role
from acquisition.errors import AcquisitionError, SendTimeoutError
from acquisition.ids import validate_acquisition_id
from acquisition.protocol import ChannelRole

__all__ = ["PycromanagerForwarder", "PymmcorePlusForwarder", "json_safe"]

log = logging.getLogger(__name__)


def json_safe(value: Any, *, _depth: int = 0) -> Any:
    """Convert metadata to plain JSON types (enums, numpy scalars/arrays, pydantic models, sets).

    Anything else becomes its ``str``; non-finite floats become ``None``; nesting is cut at 8 levels.
    """
    if _depth > 8:
        return str(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if hasattr(value, "model_dump"):
        return json_safe(value.model_dump(mode="json", exclude_unset=True), _depth=_depth + 1)
    if isinstance(value, Mapping):
        return {str(getattr(k, "value", k)): json_safe(v, _depth=_depth + 1) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), _depth=_depth + 1) if value.size <= 64 else f"<array {value.shape}>"
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, _depth=_depth + 1) for v in value]
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


class PymmcorePlusForwarder:
    """Forward pymmcore-plus MDA frames to a :class:`FrameSender`.

    Connect it to an ``MDARunner``'s events (``core.mda``) with :meth:`connect`, or connect the instance
    yourself to ``core.mda.events.frameReady`` (it is callable as ``(img, event, meta)``).

    Index mapping: ``t``, ``p``, ``z``, ``c`` come from ``event.index`` (missing axes are 0; ``c`` missing
    means the image holds all channels). Other axes (e.g. grid ``g``) go to metadata. Metadata carries
    the event (``metadata["mda_event"]``, JSON form) and the frame metadata pymmcore-plus passes.

    Parameters
    ----------
    sender : FrameSender
        Where frames go. Give it a modest ``timeout``: a timeout is logged and the frame skipped, so the
        MDA never stalls.
    acquisition : str, optional
        Acquisition id; default ``mda-<sequence uid>`` per sequence.
    include_meta : bool
        Forward pymmcore-plus's per-frame metadata dict (camera, stage positions, timing).
    raise_on_timeout : bool
        Re-raise :class:`SendTimeoutError` instead of skipping the frame.
    core : CMMCorePlus, optional
        The core, for the pixel size (``getPixelSizeUm()``) declared at each sequence start.
    roles : mapping, optional
        Role per channel config name (``nuclear``, ``whole_cell``, ``ignore``); names not listed are
        guessed (:func:`acquisition.declaration.guess_role`).

    The ``start`` of each sequence declares its plan (:meth:`FrameSender.start` with ``sequence=``): sizes,
    channels with roles and colours, interval, z step, stage positions and the pixel size. Each frame's
    metadata carries the event's stage position (``stage_um``: ``{"x", "y", "z"}``).
    """

    def __init__(
        self,
        sender: FrameSender,
        *,
        acquisition: str | None = None,
        include_meta: bool = True,
        raise_on_timeout: bool = False,
        core: Any = None,
        roles: Mapping[str, ChannelRole] | None = None,
    ) -> None:
        self.sender = sender
        self._fixed = validate_acquisition_id(acquisition) if acquisition is not None else None
        self.acquisition = self._fixed
        self.include_meta = include_meta
        self.raise_on_timeout = raise_on_timeout
        self.core = core
        self.roles = dict(roles or {})
        self._declared: set[str] = set()
        self.frames_forwarded = 0
        self.frames_skipped = 0
        self._connected: list[tuple[Any, Any]] = []

    def connect(self, runner: Any) -> PymmcorePlusForwarder:
        """Connect to ``runner.events`` (``sequenceStarted``, ``frameReady``, ``sequenceFinished``)."""
        events = runner.events
        for signal, slot in (
            (events.sequenceStarted, self.on_sequence_started),
            (events.frameReady, self),
            (events.sequenceFinished, self.on_sequence_finished),
        ):
            signal.connect(slot)
            self._connected.append((signal, slot))
        return self

    def disconnect(self) -> None:
        """Disconnect every signal connected by :meth:`connect`."""
        for signal, slot in self._connected:
            signal.disconnect(slot)
        self._connected.clear()

    def on_sequence_started(self, sequence: Any, *_: Any) -> None:
        """``sequenceStarted(sequence, meta)``: send ``start`` declaring the sequence's plan."""
        uid = getattr(sequence, "uid", None) or uuid.uuid4()
        self.acquisition = self._fixed or f"mda-{uid}"
        self._declare(self.acquisition, sequence)

    def _pixel_size(self) -> float | None:
        getter = getattr(self.core, "getPixelSizeUm", None)
        if getter is None:
            return None
        try:
            value = float(getter())
        except Exception:  # a core without a pixel size configuration
            return None
        return value if value > 0 else None

    def _declare(self, acquisition: str, sequence: Any) -> None:
        self.sender.start(
            acquisition,
            sequence=sequence,
            roles=self.roles,
            pixel_size_um=self._pixel_size(),
            metadata={"mda_sequence": json_safe(sequence)},
        )
        self._declared.add(acquisition)

    def on_sequence_finished(self, sequence: Any, *_: Any) -> None:
        """``sequenceFinished(sequence)``: send ``end``."""
        if self.acquisition is not None:
            self.sender.end(self.acquisition)

    def __call__(self, img: np.ndarray, event: Any, meta: Mapping[str, Any] | None = None) -> None:
        """``frameReady(img, event, meta)``: send the frame."""
        index = {
            str(getattr(k, "value", k)): int(v) for k, v in dict(getattr(event, "index", {}) or {}).items()
        }
        metadata: dict[str, Any] = {"mda_event": json_safe(event)}
        extra_axes = {k: v for k, v in index.items() if k not in "tpzc"}
        if extra_axes:
            metadata["extra_axes"] = extra_axes
        if self.include_meta and meta:
            metadata["frame_meta"] = json_safe(meta)
        channel = getattr(event, "channel", None)
        if channel is not None:
            metadata["channel"] = getattr(channel, "config", str(channel))
        stage = {a: getattr(event, f"{a}_pos", None) for a in ("x", "y", "z")}
        if any(v is not None for v in stage.values()):
            metadata["stage_um"] = json_safe(stage)
        acquisition = self.acquisition or self._fixed
        if acquisition is None:  # frameReady without sequenceStarted (handler connected by hand)
            acquisition = self.acquisition = f"mda-{uuid.uuid4()}"
        sequence = getattr(event, "sequence", None)
        if acquisition not in self._declared and sequence is not None:
            self._declare(acquisition, sequence)  # connected by hand: the event knows its sequence
        try:
            self.sender.send(
                img,
                acquisition=acquisition,
                t=index.get("t", 0),
                p=index.get("p", 0),
                z=index.get("z", 0),
                c=index.get("c"),
                metadata=metadata,
            )
        except SendTimeoutError:
            self.frames_skipped += 1
            if self.raise_on_timeout:
                raise
            log.warning("listener behind: skipped frame %s of %s", index, acquisition)
            return
        self.frames_forwarded += 1


_PYCRO_AXES = {"time": "t", "position": "p", "z": "z"}


class PycromanagerForwarder:
    """A pycromanager ``image_process_fn(image, metadata)`` that forwards each image and returns it.

    Index mapping from ``metadata["Axes"]``: ``time`` → t, ``position`` → p, ``z`` → z, ``channel`` → c
    (pycromanager channels are usually names: each new name gets the next integer, in order of first
    appearance, and the name goes to ``metadata["channel"]``). Other axes are kept in metadata. The image
    and metadata are returned unchanged, so pycromanager's own saving and viewing carry on.

    Parameters
    ----------
    sender : FrameSender
    acquisition : str
        Acquisition id. ``start`` is sent lazily with the first image.
    raise_on_timeout : bool
        Re-raise :class:`SendTimeoutError` instead of skipping the frame.
    channels : sequence of str, optional
        The channel names the acquisition will use, in order: declared in ``start`` (with roles from
        ``roles`` or guessed from the names), so each channel's frames are assembled and stored in their
        own place. A multi-channel acquisition needs it: without a declared channel count the service
        rejects frames of any channel but the first (``undeclared_channel``).
    sizes : mapping, optional
        Extents per axis (``t``, ``p``, ``z``) to declare.
    roles : mapping, optional
        Role per channel name (``nuclear``, ``whole_cell``, ``ignore``).

    The pixel size is declared from the first image's ``PixelSizeUm`` tag when Micro-Manager sets one.
    """

    def __init__(
        self,
        sender: FrameSender,
        *,
        acquisition: str,
        raise_on_timeout: bool = False,
        channels: Sequence[str] | None = None,
        sizes: Mapping[str, int] | None = None,
        roles: Mapping[str, ChannelRole] | None = None,
    ) -> None:
        self.sender = sender
        self.acquisition = validate_acquisition_id(acquisition)
        self.raise_on_timeout = raise_on_timeout
        self.channels: dict[str, int] = {str(name): i for i, name in enumerate(channels or ())}
        self._sizes = dict(sizes or {})
        self._roles = dict(roles or {})
        self.frames_forwarded = 0
        self.frames_skipped = 0
        self._started = False

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        axes = dict(metadata.get("Axes", {}) or {})
        index = {short: int(axes[name]) for name, short in _PYCRO_AXES.items() if name in axes}
        extra: dict[str, Any] = {k: v for k, v in axes.items() if k not in _PYCRO_AXES and k != "channel"}
        c: int | None = None
        if "channel" in axes:
            name = axes["channel"]
            if isinstance(name, (int, np.integer)):
                c = int(name)
            else:
                c = self.channels.setdefault(str(name), len(self.channels))
                extra["channel"] = str(name)
        try:
            if not self._started:
                self._start(metadata)
                self._started = True
            self.sender.send(
                image,
                acquisition=self.acquisition,
                t=index.get("t", 0),
                p=index.get("p", 0),
                z=index.get("z", 0),
                c=c,
                metadata={**extra, "pycromanager": json_safe(metadata)},
            )
        except SendTimeoutError:
            self.frames_skipped += 1
            if self.raise_on_timeout:
                raise
            log.warning("listener behind: skipped frame %s of %s", axes, self.acquisition)
        else:
            self.frames_forwarded += 1
        return image, metadata

    def _start(self, metadata: Mapping[str, Any]) -> None:
        names = list(self.channels)
        sizes = dict(self._sizes)
        channels = None
        if names:
            sizes["c"] = len(names)
            roles = [self._roles.get(name, guess_role(name)) for name in names]
            channels = {"names": names, "roles": roles}
        pixel = metadata.get("PixelSizeUm")
        try:
            pixel_size = float(pixel) if pixel is not None else None
        except (TypeError, ValueError):
            pixel_size = None
        self.sender.start(
            self.acquisition,
            sizes=sizes,
            channels=channels,
            pixel_size_um=pixel_size if pixel_size and pixel_size > 0 else None,
        )

    def finish(self) -> None:
        """Send ``end`` (call after the pycromanager ``Acquisition`` finished)."""
        if not self._started:
            raise AcquisitionError("finish() before any image was forwarded; nothing to end")
        self.sender.end(self.acquisition)
