"""Training, fine-tuning and assessment of CellSAM-family models (cellsam-nano); see ``docs/models.md``.

Importing this package imports torch but starts nothing.
"""

from cellsam_core.training.finetune import finetune
from cellsam_core.training.trainer import TrainConfig, train

__all__ = ["TrainConfig", "finetune", "train"]
