"""The public API of ``cellsam_core``: every exported name resolves, and importing the package is light."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import cellsam_core


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_segment_through_the_package_namespace() -> None:
    code = (
        "import cellsam_core as c; m = c.build_model('tiny'); "
        "print(c.segment(__import__('numpy').zeros((64,64)), m).labels.shape)"
    )
    assert _run(code) == "(64, 64)"


def test_importing_the_package_imports_no_torch() -> None:
    heavy = ("torch", "cellsam_core.inference", "cellsam_core.registry")
    code = f"import sys, cellsam_core; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    assert _run(code) == "[]"


@pytest.mark.parametrize("name", cellsam_core.__all__)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(cellsam_core, name)
    assert value is not None
    assert name in dir(cellsam_core)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__.startswith("cellsam_core."), f"{name} comes from {value.__module__}"


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        cellsam_core.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(cellsam_core, "postprocessing")


def test_public_names_are_the_defining_objects() -> None:
    from cellsam_core import cells, checkpoint, configs, inference, registry

    assert cellsam_core.segment is inference.segment
    assert cellsam_core.Segmentation is inference.Segmentation
    assert cellsam_core.CellTable is cells.CellTable and cellsam_core.CELL_COLUMNS is cells.CELL_COLUMNS
    assert cellsam_core.load_bundled_model is checkpoint.load_bundled_model
    assert cellsam_core.ModelConfig is configs.ModelConfig
    assert cellsam_core.model_registry is registry.model_registry
