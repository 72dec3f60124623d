"""CellSAM inference as pure computation: model, pre/post-processing, weights, tiling.

Nothing here opens sockets, starts Ray or writes Zarr; the same functions run in a notebook, in the CLI
and split across the encoder and decoder deployments of the service::

    import cellsam_core as cs

    model = cs.load_bundled_model()  # or cs.load_model("cellsam_general.pt"), cs.build_model("tiny")
    seg = cs.segment(image, model)  # == cs.decode(cs.encode(image, model), model)
    seg.labels  # uint32 (H, W)
    seg.cells  # CellTable, one row per cell, coordinates in (y, x) array axis order

The names below are imported on first use, so ``import cellsam_core`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cellsam_core.threads import gauge as _cpu_gauge

__version__ = "0.1.0"

# Start measuring what other processes use, so that the first encode already knows how many threads
# it may take (cellsam_core.threads).
_cpu_gauge.read()

if TYPE_CHECKING:
    from cellsam_core.cells import CELL_COLUMNS, CellTable
    from cellsam_core.checkpoint import load_bundled_model, load_model
    from cellsam_core.configs import ModelConfig, NanoConfig
    from cellsam_core.inference import (
        DecodeOptions,
        EncodeOptions,
        ImageEmbedding,
        Segmentation,
        decode,
        encode,
        encode_batch,
        segment,
    )
    from cellsam_core.registry import build_model, model_registry

__all__ = [
    "CELL_COLUMNS",
    "CellTable",
    "DecodeOptions",
    "EncodeOptions",
    "ImageEmbedding",
    "ModelConfig",
    "NanoConfig",
    "Segmentation",
    "__version__",
    "build_model",
    "decode",
    "encode",
    "encode_batch",
    "load_bundled_model",
    "load_model",
    "model_registry",
    "segment",
]

# Public name -> the submodule that defines it (the same imports as the TYPE_CHECKING block above).
_LAZY: dict[str, str] = {
    "CELL_COLUMNS": "cellsam_core.cells",
    "CellTable": "cellsam_core.cells",
    "load_bundled_model": "cellsam_core.checkpoint",
    "load_model": "cellsam_core.checkpoint",
    "ModelConfig": "cellsam_core.configs",
    "NanoConfig": "cellsam_core.configs",
    "DecodeOptions": "cellsam_core.inference",
    "EncodeOptions": "cellsam_core.inference",
    "ImageEmbedding": "cellsam_core.inference",
    "Segmentation": "cellsam_core.inference",
    "decode": "cellsam_core.inference",
    "encode": "cellsam_core.inference",
    "encode_batch": "cellsam_core.inference",
    "segment": "cellsam_core.inference",
    "build_model": "cellsam_core.registry",
    "model_registry": "cellsam_core.registry",
}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines a public name on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
