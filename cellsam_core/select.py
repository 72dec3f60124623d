"""Choosing the model to run: explicit weights, the official cache, or (explicitly) random weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from cellsam_core.modeling.cellsam import CellSAM

__all__ = ["ModelInfo", "file_sha256", "select_model"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What model runs, for logs, result messages and the ``cellsam_model_info`` metric.

    Attributes
    ----------
    name : str
        Registry name of the architecture (``cellsam_vit_b``, ``tiny``, ...).
    source : str
        Where the weights came from: a file path, or ``"random"``.
    sha256 : str
        Checksum of the weights file (first 16 hex digits), or ``"random"``.
    random_weights : bool
        True when the weights are a random initialisation (labels are meaningless).
    bundled : bool
        True when no weights were asked for or found and the bundled cellsam-nano model runs.
    """

    name: str
    source: str
    sha256: str
    random_weights: bool
    bundled: bool = False

    def describe(self) -> str:
        if self.random_weights:
            return (
                f"model {self.name} with RANDOM weights: the labels only exercise the pipeline, "
                "they are not a segmentation"
            )
        if self.bundled:
            return (
                f"model {self.name}: the bundled default, trained by this project on synthetic images (no "
                "official CellSAM weights found; for the published accuracy: cellsam-stream weights fetch)"
            )
        return f"model {self.name} with weights {self.source} (sha256 {self.sha256})"


def config_name(config: object) -> str:
    """Registry name of an architecture configuration, or ``"custom"`` when none matches."""
    from cellsam_core.registry import MODEL_CONFIGS, NANO_CONFIGS

    configs = {**MODEL_CONFIGS, **NANO_CONFIGS}
    return next((name for name, cfg in configs.items() if cfg == config), "custom")


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` to a torch dtype (ValueError otherwise)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def resolve_model_weights(weights: str | Path | None = None) -> tuple[Path, bool]:
    """The weights file to run and whether it is the bundled default: ``(path, bundled)``.

    An explicit ``weights`` or ``$CELLSAM_WEIGHTS`` must exist (a typo never silently falls back);
    otherwise the official cache, then the bundled cellsam-nano model.

    Raises
    ------
    WeightsNotFoundError
        An explicit/env path does not exist, or nothing was found and no bundled model is installed.
    """
    import os

    from cellsam_core.checkpoint import BUNDLED_WEIGHTS
    from cellsam_core.weights import WEIGHTS_ENV, find_weights, resolve_weights

    if weights is not None or os.environ.get(WEIGHTS_ENV):
        return resolve_weights(weights), False
    found = find_weights()
    if found is not None:
        return found, False
    if BUNDLED_WEIGHTS.is_file():
        return BUNDLED_WEIGHTS, True
    return resolve_weights(None), False  # raises WeightsNotFoundError with the how-to message


def select_model(
    *,
    weights: str | Path | None = None,
    model: str | None = None,
    random_weights: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[CellSAM, ModelInfo]:
    """Build or load the model the user asked for.

    Parameters
    ----------
    weights : path, optional
        Explicit weights file; otherwise ``CELLSAM_WEIGHTS`` and the official cache are searched
        (:func:`cellsam_core.weights.find_weights`), then the bundled cellsam-nano model is used.
        Nothing is downloaded.
    model : str, optional
        Registry name. With weights it must match the file (it is inferred when omitted).
    random_weights : bool
        Build ``model`` (default ``tiny``) with a seeded random initialisation instead of loading weights.
        For tests and pipeline smoke runs only.
    device, dtype : str
        Where and in which precision the model runs (bf16/fp16 are meant for GPUs).

    Raises
    ------
    WeightsNotFoundError
        An explicit path does not exist, or nothing was found and no bundled model is installed.
    CheckpointError
        The weights file does not match the architecture.
    """
    from cellsam_core.checkpoint import load_model
    from cellsam_core.registry import build_model

    torch_dtype = parse_dtype(dtype)
    if random_weights:
        name = model or "tiny"
        torch.manual_seed(seed)
        net = build_model(name)
        info = ModelInfo(name=name, source="random", sha256="random", random_weights=True)
        return net.to(device=device, dtype=torch_dtype).eval(), info
    path, bundled = resolve_model_weights(weights)
    net = load_model(path, model)
    info = ModelInfo(
        name=model or config_name(net.config),
        source=str(path),
        sha256=file_sha256(path)[:16],
        random_weights=False,
        bundled=bundled,
    )
    net = net.to(device=device, dtype=torch_dtype).eval()
    return net, info
