"""The action table: what the feedback loop did during an acquisition, and why, stored in its OME-Zarr.

Where and how
-------------
``{output}/{acquisition}.ome.zarr/cellsam/actions`` is a Zarr v3 group whose attributes hold the table::

    {"cellsam": {"table": "actions", "version": 1, "rows": N,
                 "columns": {"id": [...], "rule": [...], ...}}}      # one list per column, N entries each

One row per action a rule returned (``status`` ``enqueued`` → ``ran`` / ``failed`` / ``skipped``, or
``dropped`` with the safety rule in ``detail``) and one per rule that raised (``status`` ``rule_error``).
Columns: :data:`ACTION_COLUMNS`. Times are seconds since the epoch; stage positions µm; ``cell_y/_x`` the
cell's centroid in frame pixels, (y, x) array axis order; unknown values are ``null``.

Why group attributes: the table is small (rows are bounded by ``max_added_events`` and the rate limit), every
Zarr v3 reader (and plain ``json``) reads it, it needs no string data type (Zarr v3's is not yet read
everywhere), and the whole document is replaced atomically, so **a reader never sees a torn table**: the
writer writes a temporary file next to ``zarr.json`` and renames it over (the same way zarr-python's local
store writes). It never writes files Zarr does not know (a stray file makes zarr warn when it lists the
store), and it never creates the store: rows wait in memory until the service has created it.

Locks follow the store's conventions (``docs/zarr-layout.md``): a writer holds
``.{acquisition}.ome.zarr.locks/store.lock`` shared (like a frame write, so it never overlaps the sink's
exclusive metadata changes) and ``actions.lock`` exclusive (one writer of the table at a time, across
processes). A writer that restarts reads the stored rows back (:func:`read_actions`) and carries on
numbering and counting from them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from acquisition.feedback_errors import ActionTableError
from acquisition.feedback_types import (
    Acquire,
    Action,
    Callback,
    FrameInfo,
    FrameInput,
    RuleInput,
    SetInterval,
)
from acquisition.file_lock import flock
from acquisition.ids import validate_acquisition_id

__all__ = ["ACTIONS_PATH", "ACTION_COLUMNS", "ActionTable", "action_fields", "frame_fields", "read_actions"]

log = logging.getLogger(__name__)

#: Path of the table's group inside the acquisition's store.
ACTIONS_PATH = "cellsam/actions"
TABLE_VERSION = 1

#: Columns of the action table, in order.
ACTION_COLUMNS: tuple[str, ...] = (
    "id",  # 1, 2, ... per acquisition
    "rule",  # name of the rule that returned the action
    "kind",  # acquire | set_interval | stop | callback; null for a rule error
    "status",  # enqueued | ran | failed | skipped | dropped | rule_error
    "detail",  # why dropped (stale, rate_limit, max_added_events, outside_stage_limits, stopped), error text
    "reason",  # the rule's own words
    "t",
    "p",
    "z",  # the frame the decision came from
    "cell",  # label of the cell it is about (its value in that frame's label image)
    "cell_y",
    "cell_x",  # that cell's centroid, pixels, (y, x)
    "target_x_um",
    "target_y_um",
    "target_z_um",  # acquire: where the (first) added event points the stage
    "channel",
    "exposure_ms",
    "n_events",  # acquire: channel, exposure and number of added events (z-stack)
    "interval_s",  # set_interval
    "frame_ready_at",  # time.time() at the frame's frameReady
    "decided_at",  # time.time() when the loop enqueued or dropped the action
    "latency_s",  # frameReady → enqueued (monotonic clock of the microscope process)
    "result_age_s",  # frameReady (or service receipt) → the loop had the result
    "ran_at",
    "ran_x_um",
    "ran_y_um",
    "ran_z_um",  # when and where it ran (stage read with the acquired frame)
)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_value(value.item())
    return value


def _store_path(output: Path, acquisition: str) -> Path:
    return output / f"{validate_acquisition_id(acquisition)}.ome.zarr"


def _atomic_write_json(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    data = json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_actions(store: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """The action table of a store (``{output}/{acquisition}.ome.zarr``) as ``{column: values}``.

    Returns empty columns when the store has no table yet. Safe while a loop is writing (the document is
    replaced atomically). ``pandas.DataFrame(read_actions(path))`` gives a data frame.

    Raises
    ------
    ActionTableError
        The table exists but is not a readable action table.
    """
    path = Path(store) / ACTIONS_PATH / "zarr.json"
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {c: [] for c in ACTION_COLUMNS}
    except (OSError, ValueError) as err:
        raise ActionTableError(f"cannot read the action table {path}: {err}") from err
    meta = document.get("attributes", {}).get("cellsam", {})
    columns = meta.get("columns") if isinstance(meta, dict) else None
    if not isinstance(columns, dict) or meta.get("table") != "actions":
        raise ActionTableError(f"{path} is not a cellsam-stream action table")
    if meta.get("version") != TABLE_VERSION:
        raise ActionTableError(
            f"{path} has table version {meta.get('version')}, this code reads {TABLE_VERSION}"
        )
    n = int(meta.get("rows", 0))
    return {c: list(columns.get(c, [None] * n)) for c in ACTION_COLUMNS}


class ActionTable:
    """The rows of one acquisition's action table, kept in memory and written to its store.

    Thread-safe: rows are added and updated from the feedback thread and the actuator's thread; a writer
    thread (:meth:`start`) writes the whole table at most every ``flush_interval_s``.

    Parameters
    ----------
    acquisition : str
        Acquisition id.
    output : path, optional
        The service's output directory (where ``{acquisition}.ome.zarr`` is). None keeps the table in
        memory only (:meth:`rows`), e.g. when the service's disk is not visible from the microscope PC.
    flush_interval_s : float
        Least time between two writes.
    """

    def __init__(
        self,
        acquisition: str,
        output: str | os.PathLike[str] | None = None,
        *,
        flush_interval_s: float = 0.25,
    ) -> None:
        self.acquisition = validate_acquisition_id(acquisition)
        self.store = _store_path(Path(output), acquisition) if output is not None else None
        self.flush_interval_s = flush_interval_s
        self._rows: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._written = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self.write_errors = 0
        if self.store is not None:
            for row in _rows_of(read_actions(self.store)):
                self._rows[int(row["id"])] = row

    # -- rows --------------------------------------------------------------------------------------

    @property
    def next_id(self) -> int:
        """Id the next row will get."""
        with self._lock:
            return max(self._rows, default=0) + 1

    def add(self, **fields: Any) -> int:
        """Append a row (unknown columns are an error) and return its id."""
        unknown = set(fields) - set(ACTION_COLUMNS)
        if unknown:
            raise ValueError(f"unknown action table columns {sorted(unknown)}; known: {ACTION_COLUMNS}")
        with self._lock:
            row_id = max(self._rows, default=0) + 1
            row: dict[str, Any] = dict.fromkeys(ACTION_COLUMNS)
            row.update({k: _json_value(v) for k, v in fields.items()})
            row["id"] = row_id
            self._rows[row_id] = row
            self._version += 1
            self._changed.notify_all()
        return row_id

    def update(self, row_id: int, **fields: Any) -> None:
        """Set fields of row ``row_id``."""
        with self._lock:
            row = self._rows[row_id]
            for key, value in fields.items():
                if key not in row or key == "id":
                    raise ValueError(f"cannot set column {key!r} of the action table")
                row[key] = _json_value(value)
            self._version += 1
            self._changed.notify_all()

    def rows(self) -> list[dict[str, Any]]:
        """A copy of every row, in id order."""
        with self._lock:
            return [dict(self._rows[k]) for k in sorted(self._rows)]

    def columns(self) -> dict[str, list[Any]]:
        """The table as ``{column: values}`` (the stored form)."""
        rows = self.rows()
        return {c: [r[c] for r in rows] for c in ACTION_COLUMNS}

    # -- writing -----------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Write the table now if it changed; False when the store does not exist yet (rows are kept)."""
        if self.store is None:
            return True
        with self._lock:
            version = self._version
        if version == self._written:
            return True
        if not (self.store / "zarr.json").is_file():
            return False
        columns = self.columns()
        lock_dir = self.store.parent / f".{self.acquisition}.ome.zarr.locks"
        try:
            with (
                flock(lock_dir / "store.lock", exclusive=False),
                flock(lock_dir / "actions.lock", exclusive=True),
            ):
                parent = self.store / "cellsam"
                parent.mkdir(exist_ok=True)
                if not (parent / "zarr.json").is_file():
                    _atomic_write_json(
                        parent / "zarr.json",
                        {
                            "zarr_format": 3,
                            "node_type": "group",
                            "attributes": {"cellsam": {"description": "cellsam-stream acquisition records"}},
                        },
                    )
                (self.store / ACTIONS_PATH).mkdir(exist_ok=True)
                meta = {
                    "table": "actions",
                    "version": TABLE_VERSION,
                    "rows": len(columns["id"]),
                    "columns": columns,
                }
                document = {"zarr_format": 3, "node_type": "group", "attributes": {"cellsam": meta}}
                _atomic_write_json(self.store / ACTIONS_PATH / "zarr.json", document)
        except OSError as err:
            raise ActionTableError(f"cannot write the action table of {self.store}: {err}") from err
        self._written = version
        return True

    def start(self) -> None:
        """Start the writer thread (does nothing without an output directory)."""
        if self.store is None or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"action-table-{self.acquisition}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._closing or self._version != self._written)
                closing = self._closing
            try:
                done = self.flush()
            except ActionTableError:
                self.write_errors += 1
                log.exception("action table of %s not written; will retry", self.acquisition)
                done = False
            if closing:
                return
            # Coalesce bursts; when the store does not exist yet, retry a little later.
            with self._lock:
                self._changed.wait(self.flush_interval_s if done else max(self.flush_interval_s, 0.5))

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the writer and write the last rows, waiting up to ``timeout`` s for the store to exist.

        Returns True when every row is stored (or there is no store), False when rows could not be
        written (logged; they stay available from :meth:`rows`).
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            with self._lock:
                self._closing = True
                self._changed.notify_all()
            thread.join(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.flush():
                    return True
            except ActionTableError:
                log.exception("action table of %s not written", self.acquisition)
                return False
            if time.monotonic() > deadline:
                log.error(
                    "action table of %s not written: %s does not exist (is the output directory the "
                    "service's?)",
                    self.acquisition,
                    self.store,
                )
                return False
            time.sleep(0.1)


def _rows_of(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    n = len(columns.get("id", []))
    return [{c: columns[c][i] for c in ACTION_COLUMNS} for i in range(n)]


def frame_fields(rule_input: RuleInput) -> dict[str, Any]:
    """The action-table columns that name the frame a decision came from."""
    index = rule_input.index
    info = getattr(rule_input, "frame", None)
    return {
        "t": index.t if index is not None else None,
        "p": index.p if index is not None else None,
        "z": index.z if index is not None else None,
        "frame_ready_at": info.ready_wall if isinstance(info, FrameInfo) else None,
        "result_age_s": rule_input.age_s,
    }


def action_fields(rule_input: RuleInput, action: Action) -> dict[str, Any]:
    """The action-table columns that describe an action (and the cell it is about)."""
    out: dict[str, Any] = {"kind": action.kind, "reason": getattr(action, "reason", "") or None}
    cell = getattr(action, "cell", None)
    if cell is not None:
        out["cell"] = cell
        if isinstance(rule_input, FrameInput):
            cells = rule_input.cells
            rows = (cells.label == cell).nonzero()[0]
            if rows.size:
                out["cell_y"], out["cell_x"] = (float(v) for v in cells.centroid[rows[0]])
    if isinstance(action, Acquire):
        event = action.event
        channel = getattr(event, "channel", None)
        out.update(
            target_x_um=event.x_pos,
            target_y_um=event.y_pos,
            target_z_um=event.z_pos,
            channel=getattr(channel, "config", None),
            exposure_ms=event.exposure,
            n_events=len(action.events),
        )
    elif isinstance(action, SetInterval):
        out["interval_s"] = float(action.seconds)
    elif isinstance(action, Callback):
        out["reason"] = f"{action.name}: {action.reason}" if action.reason else action.name
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
