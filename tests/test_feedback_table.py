"""The action table in the acquisition's OME-Zarr (``acquisition.action_table``): where it lands, that readers
never see it torn, that it waits for the store, and that the store stays a valid, usable Zarr for the sink
and for readers."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zarr

from acquisition.action_table import ACTION_COLUMNS, ACTIONS_PATH, ActionTable, read_actions
from acquisition.feedback_errors import ActionTableError
from acquisition.frames import FrameId
from acquisition.spec import AcquisitionSpec, Sizes
from acquisition.zarr_sink import ZarrLabelSink

pytestmark = pytest.mark.timeout(60)

ACQ = "tbl"


def _sink(tmp_path) -> ZarrLabelSink:
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(AcquisitionSpec(acquisition=ACQ, frame_shape=(16, 16), sizes=Sizes(t=2)))
    return sink


def test_rows_land_in_the_store_as_a_zarr_group_that_any_reader_opens(tmp_path) -> None:
    sink = _sink(tmp_path)
    table = ActionTable(ACQ, tmp_path)
    first = table.add(
        rule="r", kind="acquire", status="enqueued", t=0, cell=3, target_x_um=1.5, channel="GFP"
    )
    table.add(rule="r", kind="stop", status="dropped", detail="stale", result_age_s=float("nan"))
    table.update(first, status="ran", ran_x_um=1.5)
    assert table.flush()
    store = sink.store_path(ACQ)
    columns = read_actions(store)
    assert list(columns) == list(ACTION_COLUMNS)
    assert columns["id"] == [1, 2] and columns["status"] == ["ran", "dropped"]
    assert columns["channel"] == ["GFP", None] and columns["result_age_s"] == [None, None]  # NaN → null
    # Plain zarr sees a group with the table in its attributes; listing the whole store warns about nothing
    # (pytest turns warnings into errors), so viewers that walk the hierarchy are not disturbed.
    root = zarr.open_group(store, mode="r")
    group = root[ACTIONS_PATH]
    assert isinstance(group, zarr.Group) and group.attrs["cellsam"]["rows"] == 2
    assert group.attrs["cellsam"]["columns"]["target_x_um"] == [1.5, None]
    assert ACTIONS_PATH in {name for name, _ in root.members(max_depth=None)}
    # The label store keeps working around it: write, close, reopen, progress.
    sink.write(FrameId(ACQ, 0, 0, 0), np.ones((16, 16), np.uint32))
    sink.close_acquisition(ACQ, {"frames_ok": 1})
    sink.open_acquisition(AcquisitionSpec(acquisition=ACQ, frame_shape=(16, 16), sizes=Sizes(t=2)))
    assert sink.progress(ACQ).done == (FrameId(ACQ, 0, 0, 0),)
    assert read_actions(store)["id"] == [1, 2]


def test_readers_never_see_a_torn_table(tmp_path) -> None:
    _sink(tmp_path)
    table = ActionTable(ACQ, tmp_path)
    store = tmp_path / f"{ACQ}.ome.zarr"
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    done = threading.Event()

    def reader(seen: list[int]) -> None:
        try:
            while not done.is_set():
                columns = read_actions(store)
                n = len(columns["id"])
                assert all(len(v) == n for v in columns.values())
                assert columns["id"] == list(range(1, n + 1))
                assert all(r == f"rule-{i}" for i, r in zip(columns["id"], columns["rule"], strict=True))
                seen.append(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(mine,)) for mine in seen]
    for th in threads:
        th.start()
    for i in range(1, 301):
        table.add(rule=f"rule-{i}", kind="callback", status="enqueued", reason="x" * (i % 50))
        table.flush()
    done.set()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for mine in seen:  # each reader saw the table grow, never shrink or break
        assert len(mine) > 10 and mine == sorted(mine)
    assert read_actions(store)["id"][-1] == 300


def test_rows_wait_in_memory_until_the_service_creates_the_store(tmp_path) -> None:
    table = ActionTable(ACQ, tmp_path, flush_interval_s=0.05)
    table.start()
    table.add(rule="early", kind="stop", status="enqueued")
    assert not table.flush()  # no store yet: nothing is created in its place
    assert not (tmp_path / f"{ACQ}.ome.zarr").exists()
    _sink(tmp_path)  # the service creates it (an atomic rename would fail if we had made the directory)
    assert table.close(timeout=5)
    assert read_actions(tmp_path / f"{ACQ}.ome.zarr")["rule"] == ["early"]


def test_close_gives_up_on_a_store_that_never_comes(tmp_path) -> None:
    table = ActionTable(ACQ, tmp_path)
    table.add(rule="r", kind="stop", status="enqueued")
    assert table.close(timeout=0.2) is False
    assert table.rows()[0]["rule"] == "r"  # still available in memory


def test_a_restarted_writer_continues_from_the_stored_rows(tmp_path) -> None:
    _sink(tmp_path)
    table = ActionTable(ACQ, tmp_path)
    table.add(rule="a", kind="stop", status="ran")
    assert table.close()
    again = ActionTable(ACQ, tmp_path)
    assert again.next_id == 2 and again.rows()[0]["rule"] == "a"
    again.add(rule="b", kind="stop", status="enqueued")
    assert again.close()
    assert read_actions(tmp_path / f"{ACQ}.ome.zarr")["rule"] == ["a", "b"]


def test_in_memory_tables_and_bad_columns(tmp_path) -> None:
    table = ActionTable(ACQ)
    row = table.add(rule="r", kind="stop", status="enqueued")
    assert table.flush() and table.close() and table.columns()["id"] == [row]
    with pytest.raises(ValueError, match="unknown action table columns"):
        table.add(rules="r")
    with pytest.raises(ValueError):
        table.update(row, id=5)


def test_a_foreign_group_at_the_path_is_not_read_as_a_table(tmp_path) -> None:
    _sink(tmp_path)
    path = tmp_path / f"{ACQ}.ome.zarr" / ACTIONS_PATH
    path.mkdir(parents=True)
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(ActionTableError, match="not a cellsam-stream action table"):
        read_actions(tmp_path / f"{ACQ}.ome.zarr")
    assert read_actions(tmp_path / "missing.ome.zarr")["id"] == []
