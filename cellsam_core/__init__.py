"""CellSAM inference as pure computation: model, pre/post-processing, weights, tiling.

Nothing here opens sockets, starts Ray or writes Zarr; the same functions run in a notebook, in the CLI
and split across the encoder and decoder deployments of the service.
"""

from __future__ import annotations

__version__ = "0.1.0"
