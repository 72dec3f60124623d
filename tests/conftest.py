"""Shared fixtures: small models whose weights make every stage of the pipeline do real work."""

from __future__ import annotations

import pytest

from cellsam_core import testing
from cellsam_core.modeling.cellsam import CellSAM


def make_smoke_model(seed: int = 0) -> CellSAM:
    """``tiny`` with random weights adjusted so that every stage decodes something (see
    :func:`cellsam_core.testing.smoke_model`)."""
    return testing.smoke_model(seed)


@pytest.fixture(scope="session")
def smoke_model() -> CellSAM:
    return make_smoke_model()
