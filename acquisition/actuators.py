"""Actuators: where feedback actions meet the microscope (the :class:`~acquisition.feedback_types.Actuator`
seam).

- :class:`PymmcorePlusActuator` drives a planned MDA through pymmcore-plus's queue-driven
  ``MDARunner.run(iterable)``: it *is* the iterable, yields the plan's events on time and slips added
  events in between, and records every frame's stage position for the loop.
- :class:`PycromanagerActuator` submits added events to a running pycromanager ``Acquisition``.
- :class:`RecordingActuator` acts on nothing: a dry run of rules on a live acquisition, and the test double.

Neither pymmcore-plus, useq nor pycromanager is imported; the actuators follow their documented APIs.
"""

from __future__ import annotations

from acquisition.actuator_common import FEEDBACK_TAG, RecordingActuator, frame_info_from_mda
from acquisition.pycromanager_actuator import PycromanagerActuator, pycromanager_event
from acquisition.pymmcore_actuator import PymmcorePlusActuator

__all__ = [
    "FEEDBACK_TAG",
    "PycromanagerActuator",
    "PymmcorePlusActuator",
    "RecordingActuator",
    "frame_info_from_mda",
    "pycromanager_event",
]
