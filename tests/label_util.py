"""Label images for tests: rectangles painted in order."""

from __future__ import annotations

import numpy as np


def rect_labels(*boxes: tuple[int, int, int, int, int], shape: tuple[int, int] = (10, 10)) -> np.ndarray:
    """int32 label image of ``shape`` with rectangles ``(label, y0, y1, x0, x1)`` (max exclusive), later
    ones painted over earlier ones."""
    out = np.zeros(shape, np.int32)
    for value, y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = value
    return out
