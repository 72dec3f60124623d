"""The composed CellSAM model: two SAM copies and CellFinder, in the official checkpoint's layout.

``model`` and ``model_cp`` are segment-anything ``Sam`` modules of identical architecture. Which one
encodes images and decodes masks depends on :attr:`CellSAM.adv_mode` (``model_cp`` when True), which the
checkpoint decides: a file with ``model_cp.*`` weights keeps adv mode on, a file without turns it off (see
:mod:`cellsam_core.checkpoint`). ``model`` always supplies the constants (pixel mean/std, input size).
Inference itself lives in :mod:`cellsam_core.inference`.
"""

from __future__ import annotations

from segment_anything.modeling import Sam
from torch import nn

from cellsam_core.configs import ModelConfig, NanoConfig
from cellsam_core.modeling.cellfinder import CellFinder

__all__ = ["CellSAM"]


class CellSAM(nn.Module):
    """SAM (two copies) plus the CellFinder box detector.

    Parameters
    ----------
    model : Sam
        First SAM copy; also supplies ``pixel_mean``/``pixel_std`` and the input size.
    model_cp : Sam
        Second SAM copy, same architecture; the active one when ``adv_mode`` is True.
    cellfinder : CellFinder
        Box detector.
    config : ModelConfig or NanoConfig
        Sizes the modules were built with.
    adv_mode : bool
        Which SAM copy is active and which normalisation the inputs get (see the module docstring).

    Notes
    -----
    ``state_dict()`` keys are exactly the official ones, in the official order: ``model.*``,
    ``cellfinder.decode_head.*``, ``model_cp.*``.
    """

    def __init__(
        self,
        *,
        model: Sam,
        model_cp: Sam,
        cellfinder: CellFinder,
        config: ModelConfig | NanoConfig,
        adv_mode: bool = True,
    ) -> None:
        super().__init__()
        # Registration order fixes the state-dict key order of the official file.
        self.model = model
        self.cellfinder = cellfinder
        self.model_cp = model_cp
        self.config = config
        self.adv_mode = adv_mode

    @property
    def sam(self) -> Sam:
        """The active SAM copy: ``model_cp`` in adv mode, else ``model``."""
        return self.model_cp if self.adv_mode else self.model

    @property
    def image_size(self) -> int:
        """Side of the square model input (1024 for the official model)."""
        return int(self.model.image_encoder.img_size)

    def extra_repr(self) -> str:
        return f"adv_mode={self.adv_mode}, image_size={self.image_size}"
