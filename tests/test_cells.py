"""cellsam_core.cells.CellTable: measurements by value, (y, x) order, array round trips, refusals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from cellsam_core.cells import CELL_COLUMNS, CellTable
from cellsam_core.errors import CellSAMError, CellTableError


def _labels() -> np.ndarray:
    """Three cells on a 10 x 12 image; none is symmetric in y and x, so swapped axes show up."""
    labels = np.zeros((10, 12), dtype=np.uint32)
    labels[1:3, 2:6] = 1  # 2 rows x 4 columns
    labels[6:9, 1] = 2  # an L: three pixels down column 1 ...
    labels[8, 2:4] = 2  # ... and two more along row 8
    labels[5:10, 9:12] = 4  # 5 x 3, non-sequential id
    return labels


@dataclass(frozen=True)
class ColumnCase:
    column: str
    expected: list[float]


COLUMN_CASES = [
    ColumnCase("label", [1, 2, 4]),
    ColumnCase("area", [8, 5, 15]),
    ColumnCase("centroid_y", [1.5, 37 / 5, 7.0]),
    ColumnCase("centroid_x", [3.5, 8 / 5, 10.0]),
    ColumnCase("bbox_y0", [1, 6, 5]),
    ColumnCase("bbox_x0", [2, 1, 9]),
    ColumnCase("bbox_y1", [3, 9, 10]),
    ColumnCase("bbox_x1", [6, 4, 12]),
    ColumnCase("prompt_y0", [np.nan] * 3),
    ColumnCase("prompt_x1", [np.nan] * 3),
    ColumnCase("score", [np.nan] * 3),
    ColumnCase("area_um2", [np.nan] * 3),
]


@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda c: c.column)
def test_from_labels_columns_by_value(case: ColumnCase) -> None:
    columns = CellTable.from_labels(_labels()).columns()
    assert list(columns) == list(CELL_COLUMNS)
    np.testing.assert_allclose(columns[case.column], case.expected)


def test_from_labels_dtypes_and_bbox_slices_the_cell() -> None:
    labels = _labels()
    table = CellTable.from_labels(labels)
    assert (table.label.dtype, table.area.dtype, table.bbox.dtype) == (np.uint32, np.int64, np.int64)
    assert table.centroid.dtype == table.prompt_box.dtype == table.score.dtype == np.float64
    for label, (y0, x0, y1, x1) in zip(table.label, table.bbox, strict=True):
        window = labels[y0:y1, x0:x1] == label
        assert window.sum() == (labels == label).sum()  # max-exclusive box holds the whole cell
        assert window[0].any() and window[-1].any() and window[:, 0].any() and window[:, -1].any()


def test_empty_image() -> None:
    for table in (CellTable.from_labels(np.zeros((4, 5), dtype=np.int32)), CellTable.empty()):
        assert len(table) == table.n_cells == 0
        assert table.centroid.shape == (0, 2) and table.bbox.shape == (0, 4)
        assert table.prompt_box.shape == (0, 4) and table.score.shape == (0,)
        assert all(c.shape == (0,) for c in table.columns().values())
        assert table.to_array().shape == (0, len(CELL_COLUMNS))
        assert CellTable.from_array(table.to_array()).equals(table)


def _with_prompts() -> CellTable:
    prompt = np.array([[0.5, 1.5, 3.5, 6.25], [5.0, 0.0, 9.0, 4.0], [np.nan] * 4])
    return CellTable.from_labels(
        _labels(), prompt_boxes=prompt, scores=[0.9, 0.75, np.nan], pixel_size_um=0.5
    )


def test_to_array_from_array_round_trip() -> None:
    table = _with_prompts()
    rows = table.to_array()
    assert rows.dtype == np.float64 and rows.shape == (3, len(CELL_COLUMNS))
    back = CellTable.from_array(rows, pixel_size_um=0.5)
    assert back.equals(table)
    for name in ("label", "area", "centroid", "bbox", "prompt_box", "score"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
        assert getattr(back, name).dtype == getattr(table, name).dtype
    # Without the pixel size the physical areas are unknown, so the rows differ in area_um2 only.
    assert not CellTable.from_array(rows).equals(table)


def test_from_array_with_columns_in_another_order_keeps_other_columns_as_measurements() -> None:
    table = _with_prompts()
    order = [*reversed(CELL_COLUMNS), "extra"]
    columns = {**table.columns(), "extra": np.arange(len(table), dtype=np.float64)}
    rows = np.column_stack([columns[name] for name in order])
    back = CellTable.from_array(rows, order, pixel_size_um=0.5)
    assert back.column_names == (*CELL_COLUMNS, "extra")
    assert back.equals(table.with_measurements({"extra": columns["extra"]}))
    assert not back.equals(table)  # a table without the extra column is a different table


def test_centroids_in_micrometres_follow_the_pixel_size() -> None:
    table = CellTable.from_labels(_labels())
    assert np.isnan(table.centroid_um).all()
    scaled = table.with_pixel_size(0.5)
    np.testing.assert_allclose(scaled.centroid_um, table.centroid * 0.5)
    cols = scaled.columns()
    np.testing.assert_allclose(cols["centroid_y_um"], table.centroid[:, 0] * 0.5)
    np.testing.assert_allclose(cols["centroid_x_um"], table.centroid[:, 1] * 0.5)


def test_intensities_per_cell_and_channel() -> None:
    labels = _labels()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, size=(*labels.shape, 2)).astype(np.uint16)
    table = CellTable.from_labels(labels).with_intensities(labels, image, ["H2B-mCherry", "GFP reporter"])
    assert table.column_names[-4:] == (
        "intensity_mean_H2B-mCherry",
        "intensity_sum_H2B-mCherry",
        "intensity_mean_GFP_reporter",
        "intensity_sum_GFP_reporter",
    )
    for row, label in enumerate(table.label):
        mask = labels == label
        for c, name in enumerate(("H2B-mCherry", "GFP_reporter")):
            expected = image[..., c][mask].astype(np.float64)
            assert table.measurements[f"intensity_mean_{name}"][row] == pytest.approx(expected.mean())
            assert table.measurements[f"intensity_sum_{name}"][row] == pytest.approx(expected.sum())
    back = CellTable.from_array(table.to_array(), table.column_names)
    assert back.equals(table)
    twice = CellTable.from_labels(labels).with_intensities(labels, image[..., :1], ["a/b"])
    assert "intensity_mean_a_b" in twice.measurements
    with pytest.raises(CellTableError):
        CellTable.from_labels(labels).with_intensities(labels, image, ["only one name"])
    with pytest.raises(CellTableError):
        table.with_measurements({"area": np.zeros(len(table))})  # may not shadow a core column


def test_pixel_size_gives_area_um2() -> None:
    table = CellTable.from_labels(_labels())
    assert np.isnan(table.area_um2).all()
    scaled = table.with_pixel_size(0.5)
    np.testing.assert_allclose(scaled.area_um2, [2.0, 1.25, 3.75])
    np.testing.assert_allclose(scaled.columns()["area_um2"], scaled.area_um2)
    assert CellTable.from_labels(_labels(), pixel_size_um=0.5).equals(scaled)
    assert table.pixel_size_um is None  # with_pixel_size returns a new table


def _table(**overrides: object) -> CellTable:
    fields: dict[str, object] = {
        "label": [1, 2],
        "area": [3, 4],
        "centroid": np.zeros((2, 2)),
        "bbox": np.zeros((2, 4)),
        "prompt_box": np.zeros((2, 4)),
        "score": [0.5, 0.5],
    }
    return CellTable(**{**fields, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class BadCase:
    name: str
    make: Callable[[], object]
    match: str


BAD_CASES = [
    BadCase("3-D labels", lambda: CellTable.from_labels(np.zeros((2, 2, 2), np.int32)), "2-D integer"),
    BadCase("float labels", lambda: CellTable.from_labels(np.zeros((4, 4))), "2-D integer"),
    BadCase("negative labels", lambda: CellTable.from_labels(np.full((2, 2), -1)), "non-negative"),
    BadCase(
        "prompt boxes for another number of cells",
        lambda: CellTable.from_labels(_labels(), prompt_boxes=np.zeros((2, 4))),
        "prompt_box",
    ),
    BadCase("scores of the wrong length", lambda: CellTable.from_labels(_labels(), scores=[1.0]), "score"),
    BadCase("label 0", lambda: _table(label=[0, 1]), "> 0"),
    BadCase("2-D label column", lambda: _table(label=np.ones((2, 1))), "1-D"),
    BadCase("centroid as (N, 3)", lambda: _table(centroid=np.zeros((2, 3))), "centroid"),
    BadCase("area of another length", lambda: _table(area=[1, 2, 3]), "area"),
    BadCase("pixel size 0", lambda: _table(pixel_size_um=0.0), "pixel_size_um"),
    BadCase(
        "missing columns", lambda: CellTable.from_array(np.zeros((1, 3)), ["label", "area", "score"]), "lack"
    ),
    BadCase("rows narrower than the columns", lambda: CellTable.from_array(np.zeros((2, 5))), r"\(N, 16\)"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.name)
def test_bad_input_raises_cell_table_error(case: BadCase) -> None:
    with pytest.raises(CellTableError, match=case.match) as info:
        case.make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, CellSAMError)
