"""The values of the feedback loop: what rules receive, what they return, and the actuator seam.

- Rule inputs: :class:`RuleInput` is the base of everything a rule can be called with. Today that is
  :class:`FrameInput` (one segmented frame: its result, cell table, and what the microscope knew of it).
  Track events (appeared, divided, lost) will become another subclass once tracking publishes them; a rule
  declares which input types it takes (``FeedbackLoop.add_rule(rule, on=FrameInput)``, the default), so
  adding an input type never calls an existing rule with something it does not expect.
- Actions: :class:`Acquire`, :class:`SetInterval`, :class:`Stop`, :class:`Callback` (:data:`Action`). A rule
  returns ``None``, one action, or an iterable of actions.
- The actuator seam: :class:`Actuator` (``acquisition.actuators`` implements it for pymmcore-plus,
  pycromanager and a recording dry run), the :class:`Ticket` it is handed per action and the
  :class:`Outcome` it reports back, and :class:`FrameInfo`, what it recorded of each acquired frame.

Nothing here imports ``useq``; :meth:`FrameInput.acquire_cell` imports it when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Union

import numpy as np

from acquisition.feedback_errors import InvalidActionError, StageMappingError
from acquisition.protocol import FrameResult, Index, ResultIndex
from acquisition.stage import ImageOrientation, StageXY, pixel_to_stage

if TYPE_CHECKING:
    from useq import MDAEvent

    from cellsam_core.cells import CellTable

__all__ = [
    "Acquire",
    "Action",
    "Actuator",
    "Callback",
    "FrameInfo",
    "FrameInput",
    "FrameKey",
    "Outcome",
    "RuleInput",
    "RuleOutput",
    "SetInterval",
    "Stop",
    "Ticket",
    "frame_key",
]

#: ``(t, p, z)`` of a frame: how results (which name their frame by index) find what the microscope recorded.
FrameKey = tuple[int, int, int]


def frame_key(index: Index | ResultIndex | Mapping[str, Any]) -> FrameKey:
    """``(t, p, z)`` of a result's index or of an ``MDAEvent.index`` mapping (missing axes are 0).

    A z-stack's result (:class:`ResultIndex`, projection z policies) is matched to its stack's first plane.
    """
    if isinstance(index, ResultIndex):
        return index.t, index.p, 0
    if isinstance(index, Index):
        return index.t, index.p, index.z
    return int(index.get("t", 0)), int(index.get("p", 0)), int(index.get("z", 0))


# -- what the microscope recorded ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """What the microscope side recorded when a frame was acquired (``frameReady``).

    Attributes
    ----------
    key : (t, p, z)
        The frame's index, as its result will name it.
    event : useq.MDAEvent or None
        The event that acquired the frame (pymmcore-plus), or None.
    stage_x_um, stage_y_um, stage_z_um : float or None
        Stage position when the frame was taken: the position read with the frame where the microscope
        reports it, else the event's target position.
    pixel_size_um : float or None
        Pixel size of the frame (None when the microscope has no pixel size configured).
    frame_shape : (H, W)
        Shape of the image.
    ready_at : float
        ``time.monotonic()`` at frameReady (latency and result age are measured from it).
    ready_wall : float
        ``time.time()`` at frameReady (for the action table).
    """

    key: FrameKey
    event: MDAEvent | None
    stage_x_um: float | None
    stage_y_um: float | None
    stage_z_um: float | None
    pixel_size_um: float | None
    frame_shape: tuple[int, int]
    ready_at: float
    ready_wall: float


# -- actions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class Acquire:
    """Add acquisition event(s) to the running acquisition: ``Acquire(event)``, or ``Acquire(*z_stack)``.

    The events run as one unit (all of them or none count against ``max_added_events``), as soon as the
    microscope finishes its current event, before the next planned one. ``cell`` is the label of the cell
    that caused it (for the action table); ``reason`` says why, in words. Build one for a cell with
    :meth:`FrameInput.acquire_cell`.
    """

    kind: ClassVar[str] = "acquire"
    events: tuple[MDAEvent, ...]
    cell: int | None
    reason: str

    def __init__(self, *events: MDAEvent, cell: int | None = None, reason: str = "") -> None:
        if not events:
            raise InvalidActionError("Acquire needs at least one useq.MDAEvent")
        for event in events:
            if not hasattr(event, "x_pos") or not hasattr(event, "model_copy"):
                raise InvalidActionError(f"Acquire takes useq.MDAEvent values, got {type(event).__name__}")
        object.__setattr__(self, "events", tuple(events))
        object.__setattr__(self, "cell", None if cell is None else int(cell))
        object.__setattr__(self, "reason", str(reason))

    @property
    def event(self) -> MDAEvent:
        """The first (for a z-stack: the lowest-index) event."""
        return self.events[0]


@dataclass(frozen=True)
class SetInterval:
    """Change the time between the remaining planned time points to ``seconds`` (from the next one on)."""

    kind: ClassVar[str] = "set_interval"
    seconds: float
    reason: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds >= 0):
            raise InvalidActionError(
                f"SetInterval needs a finite number of seconds >= 0, got {self.seconds!r}"
            )


@dataclass(frozen=True)
class Stop:
    """End the acquisition after the current event; planned and added events not yet run are skipped."""

    kind: ClassVar[str] = "stop"
    reason: str


@dataclass(frozen=True)
class Callback:
    """Call ``fn()`` once, where the actuator may use the microscope (pymmcore-plus: on the acquisition
    thread between two events, so it may drive hardware, e.g. photostimulate; keep it short).

    ``name`` identifies it in the action table; an exception in ``fn`` is reported as ``failed``.
    """

    kind: ClassVar[str] = "callback"
    fn: Callable[[], object]
    name: str
    cell: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise InvalidActionError(f"Callback.fn must be callable, got {type(self.fn).__name__}")


Action = Union[Acquire, SetInterval, Stop, Callback]  # noqa: UP007  (a runtime value: isinstance checks)
ACTION_TYPES: tuple[type, ...] = (Acquire, SetInterval, Stop, Callback)


# -- rule inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RuleInput:
    """Base class of what rules are called with.

    ``received_at`` is ``time.monotonic()`` when the loop got it; ``age_s`` how old the information was
    then (the loop drops actions decided on information older than ``max_result_age_s``); ``index`` the
    frame it is about, when there is one.
    """

    acquisition: str
    received_at: float
    age_s: float = 0.0

    @property
    def index(self) -> Index | None:
        """The frame this input is about (None when it is about no single frame)."""
        return None


@dataclass(frozen=True, kw_only=True)
class FrameInput(RuleInput):
    """One segmented frame, as a rule sees it.

    Attributes
    ----------
    result : FrameResult
        The published result (``status == "ok"``), as received.
    cells : CellTable
        Its cell table (one row per cell, (y, x) array axis order).
    frame : FrameInfo or None
        What the microscope recorded of this frame (event, stage position, pixel size); None when the
        actuator did not see it (then nothing can be mapped to the stage).
    orientation : ImageOrientation
        How the camera image lies on the stage (the loop's setting).
    pixel_size_um : float or None
        The loop's pixel size override, else the frame's.
    age_s : float
        Seconds from frameReady (or, when the frame is unknown, from the service's receipt) to when the
        loop received the result.
    """

    result: FrameResult
    cells: CellTable
    frame: FrameInfo | None
    orientation: ImageOrientation = field(default_factory=ImageOrientation)
    pixel_size_um: float | None = None

    @property
    def index(self) -> Index:
        """The frame's index (t, p, z); a z-stack's result (projection z policies) names its first plane."""
        index = self.result.index
        if isinstance(index, ResultIndex):
            return Index(t=index.t, p=index.p)
        return index or Index()

    @property
    def n_cells(self) -> int:
        """Number of cells in the frame."""
        return len(self.cells)

    def _frame(self) -> FrameInfo:
        if self.frame is None:
            raise StageMappingError(
                f"the microscope side did not record frame {frame_key(self.index)} of {self.acquisition!r}, "
                "so its stage position is unknown (is the actuator connected to the runner?)"
            )
        return self.frame

    def stage_xy(self) -> StageXY:
        """Stage positions (µm) of every cell's centroid: ``StageXY`` of float64 arrays (N,)."""
        frame = self._frame()
        return pixel_to_stage(
            self.cells.centroid.reshape(-1, 2),
            frame_shape=frame.frame_shape,
            stage_xy=(frame.stage_x_um, frame.stage_y_um),
            pixel_size_um=self.pixel_size_um,
            orientation=self.orientation,
        )

    def cell_stage_xy(self, i: int) -> StageXY:
        """Stage position (µm) of the centroid of cell row ``i``."""
        frame = self._frame()
        return pixel_to_stage(
            self.cells.centroid[i],
            frame_shape=frame.frame_shape,
            stage_xy=(frame.stage_x_um, frame.stage_y_um),
            pixel_size_um=self.pixel_size_um,
            orientation=self.orientation,
        )

    def acquire_cell(
        self,
        i: int,
        *,
        channel: str | Mapping[str, Any] | None = None,
        exposure_ms: float | None = None,
        z_offsets_um: Iterable[float] = (),
        reason: str = "",
        **event_fields: Any,
    ) -> Acquire:
        """An :class:`Acquire` centred on cell row ``i``: stage x/y at its centroid, z of the frame.

        ``channel`` (a config name, or ``{"config": ..., "group": ...}``) and ``exposure_ms`` set the
        event's; ``z_offsets_um`` makes a z-stack around the frame's z (one event per offset);
        ``event_fields`` go to ``useq.MDAEvent`` as they are (e.g. ``properties``).
        """
        import useq

        frame = self._frame()
        x, y = self.cell_stage_xy(i)
        label = int(self.cells.label[i])
        base: dict[str, Any] = {
            "x_pos": x,
            "y_pos": y,
            "pos_name": f"cell-{label}-t{self.index.t}-p{self.index.p}",
            **event_fields,
        }
        if channel is not None:
            base["channel"] = channel
        if exposure_ms is not None:
            base["exposure"] = exposure_ms
        offsets = tuple(float(o) for o in z_offsets_um)
        z0 = base.pop("z_pos", frame.stage_z_um)  # an explicit z_pos wins over the frame's z
        if not offsets:
            events = [useq.MDAEvent(**base, z_pos=z0)]
        elif z0 is None:
            raise StageMappingError(
                "a z-stack needs the frame's z position, and the microscope reported none"
            )
        else:
            events = [useq.MDAEvent(**base, z_pos=z0 + dz) for dz in offsets]
        return Acquire(*events, cell=label, reason=reason)

    def confluence(self) -> float | None:
        """Fraction of the frame covered by cells, in [0, 1]; None when the frame shape is unknown."""
        if self.frame is not None:
            h, w = self.frame.frame_shape
        elif self.result.labels is not None:
            h, w = self.result.labels.shape[:2]
        else:
            return None
        return float(np.sum(self.cells.area)) / float(h * w)


#: What a rule may return.
RuleOutput = Union[Action, Iterable[Action], None]  # noqa: UP007


# -- the actuator seam -----------------------------------------------------------------------------------

Status = Literal["ran", "failed", "skipped"]


@dataclass(frozen=True)
class Outcome:
    """What happened to an enqueued action, reported by the actuator once.

    ``status``: ``ran`` (done; for :class:`Acquire` every event was acquired), ``failed`` (the actuator
    could not do it: ``detail`` says why), ``skipped`` (the acquisition ended first). ``stage_xyz`` is
    the stage position the (first) added event was acquired at; ``wall`` is ``time.time()`` then.
    """

    status: Status
    detail: str = ""
    stage_xyz: tuple[float | None, float | None, float | None] | None = None
    wall: float | None = None


@dataclass(frozen=True)
class Ticket:
    """One action handed to an actuator: its id in the action table, the action, and where to report."""

    id: int
    action: Action
    report: Callable[[Outcome], None]


class Actuator(Protocol):
    """Turns actions into microscope commands and tells the loop what it knows of each frame.

    Contract
    --------
    - :meth:`submit` never blocks on the microscope: it queues the ticket and returns (it is called on the
      feedback thread; the microscope's own thread must never wait for it, nor it for the microscope).
      It reports each ticket's :class:`Outcome` exactly once, from any thread, via ``ticket.report``.
    - :meth:`frame_info` returns what was recorded for a frame at frameReady, or None; it is thread-safe.
    - :meth:`processed` is called once the loop has handled a frame's result (every rule ran and its actions
      were submitted or dropped), so an actuator can wait for the feedback of the last frames before it ends
      the acquisition.
    """

    def submit(self, ticket: Ticket) -> None:
        """Queue one action for the microscope (never blocks)."""
        ...

    def frame_info(self, key: FrameKey) -> FrameInfo | None:
        """What was recorded for frame ``key`` = (t, p, z), if anything."""
        ...

    def processed(self, key: FrameKey) -> None:
        """The loop has finished with frame ``key``'s result."""
        ...
