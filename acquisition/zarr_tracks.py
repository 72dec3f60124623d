"""Tracking in the Zarr label store: cell tables, tracker state and lineage files (`docs/zarr-layout.md`).

Used by `acquisition.zarr_sink.ZarrLabelSink`, which holds the locks: these functions read and write one
node each and know nothing of concurrency beyond writing every file atomically.

- Cell tables (``{position}/cellsam/cells/t…_z…`` as written with the frame, and the tracked table
  ``{position}/cellsam/tracked/t…_z…`` that replaces it for readers once the frame is tracked): one Zarr
  array each, float64 (N, columns), column names in ``attributes.cellsam.columns``.
- Tracker state of label plane ``z``: the attributes of the group ``{position}/cellsam/tracker/z{z:04d}``,
  ``cellsam: {t, state}``; its ``zarr.json`` is replaced whole (temporary file + rename).
- Lineage: GEFF at ``cellsam/lineage/p{p:04d}_z{z:04d}.geff``, a symbolic link swapped by
  `acquisition.lineage.GeffLineageWriter`; its ``.versions`` folder is made a Zarr group, so that listing
  ``cellsam/lineage`` with Zarr finds nothing but Zarr nodes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from acquisition.lineage import GeffLineageWriter, from_geff_graph, read_lineage
from acquisition.spec import AcquisitionSpec
from acquisition.zarr_layout import CELLSAM_KEY, lineage_path, table_name, tracker_state_path
from cellsam_core.cells import CELL_COLUMNS, CellTable

__all__ = [
    "CELLS_GROUP",
    "ROOT_GROUP_ATTRS",
    "TRACKED_GROUP",
    "TRACKER_GROUP",
    "read_lineage_graph",
    "read_state",
    "read_table",
    "write_group_json",
    "write_lineage_graph",
    "write_state",
    "write_table",
]

#: Per position: the cell tables as written with the frames, and as written with their tracking.
CELLS_GROUP = "cellsam/cells"
TRACKED_GROUP = "cellsam/tracked"
#: Per position: one group per label plane holding the tracker state.
TRACKER_GROUP = "cellsam/tracker"
#: Attributes of the store root's ``cellsam`` group (also written by `acquisition.action_table`).
ROOT_GROUP_ATTRS = {CELLSAM_KEY: {"description": "cellsam-stream acquisition records"}}


def write_group_json(directory: Path, attributes: Mapping[str, Any]) -> None:
    """Make ``directory`` a Zarr v3 group with ``attributes``, replacing its ``zarr.json`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}
    path = directory / "zarr.json"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(json.dumps(document, allow_nan=False, separators=(",", ":")).encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- cell tables -----------------------------------------------------------------------------------


def write_table(zstore: LocalStore, position: str, group: str, t: int, z: int, table: CellTable) -> None:
    """Write a frame's cell table as ``{position}/{group}/t…_z…`` (replacing one there)."""
    rows = table.to_array()
    zarr.create_array(
        zstore,
        name=f"{position}/{group}/{table_name(t, z)}",
        data=rows,
        chunks=(max(len(rows), 1), len(table.column_names)),
        compressors=ZstdCodec(level=3),
        dimension_names=("cell", "column"),
        attributes={CELLSAM_KEY: {"columns": list(table.column_names)}},
        overwrite=True,
    )


def read_table(
    zstore: LocalStore, position: str, group: str, t: int, z: int, pixel_size_um: float | None
) -> CellTable:
    """Read the cell table ``{position}/{group}/t…_z…`` (columns named in its attributes)."""
    array = zarr.open_array(zstore, path=f"{position}/{group}/{table_name(t, z)}", mode="r")
    meta = array.attrs.get(CELLSAM_KEY)
    columns = meta.get("columns") if isinstance(meta, dict) else None
    names = [str(c) for c in columns] if isinstance(columns, list) else list(CELL_COLUMNS)
    return CellTable.from_array(np.asarray(array[...]), names, pixel_size_um=pixel_size_um)


# -- tracker state ---------------------------------------------------------------------------------


def _state_document(store: Path, position: str, z: int) -> dict[str, Any] | None:
    try:
        document = json.loads((store / tracker_state_path(position, z) / "zarr.json").read_bytes())
    except FileNotFoundError:
        return None
    meta = document.get("attributes", {}).get(CELLSAM_KEY)
    return meta if isinstance(meta, dict) and "state" in meta else None


def read_state(store: Path, position: str, z: int) -> dict[str, Any] | None:
    """The tracker state stored for label plane ``z`` of a position (None: none yet)."""
    meta = _state_document(store, position, z)
    return None if meta is None else dict(meta["state"])


def write_state(store: Path, position: str, z: int, t: int, state: Mapping[str, Any]) -> bool:
    """Store ``state`` (after linking frame ``t``) unless the stored one is of a later frame.

    Callers hold the plane's tracker lock (this reads, compares, then writes). Returns whether it was
    written.
    """
    meta = _state_document(store, position, z)
    if meta is not None and int(meta["t"]) > t:
        return False
    write_group_json(
        store / tracker_state_path(position, z), {CELLSAM_KEY: {"t": int(t), "state": dict(state)}}
    )
    return True


# -- lineage ---------------------------------------------------------------------------------------


def write_lineage_graph(store: Path, spec: AcquisitionSpec, p: int, z: int, graph: nx.DiGraph) -> None:
    """Write a new version of the lineage of (p, z) in physical units (callers hold its lock)."""
    writer = GeffLineageWriter(
        store / lineage_path(p, z), pixel_size_um=spec.pixel_size_um, time_interval_s=spec.time_interval_s
    )
    if not (writer.versions / "zarr.json").is_file():
        write_group_json(writer.versions, {CELLSAM_KEY: {"lineage_versions": writer.path.name}})
    writer.write(graph)


def read_lineage_graph(store: Path, spec: AcquisitionSpec, p: int, z: int) -> nx.DiGraph | None:
    """The lineage of (p, z) in pixels and frames (None: never written)."""
    path = store / lineage_path(p, z)
    if not os.path.lexists(path):
        return None
    graph, _ = read_lineage(path)
    return from_geff_graph(graph, pixel_size_um=spec.pixel_size_um)
