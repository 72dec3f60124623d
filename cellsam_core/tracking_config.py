"""``TrackerConfig``: the settings of the cell linker (:mod:`cellsam_core.tracking`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TrackerConfig"]


class TrackerConfig(BaseModel):
    """How cells are linked from frame to frame (see :mod:`cellsam_core.linking` for the cost model).

    Distances are in pixels of the label image; "per frame" means per time index step.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_distance: float = Field(
        12.0,
        gt=0,
        description="Largest distance in pixels between a track's predicted centroid and a cell it links to "
        "in the next frame; over k frames (gap closing, frames declared missing) it grows as "
        "max_distance·√k. Set it to about the largest per-frame displacement of a cell.",
    )
    overlap_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight in [0, 1] of the overlap term of a link's cost (1 - IoU of the track's last "
        "bounding box, moved by the prediction, and the cell's box); the distance term has weight "
        "1 - overlap_weight. 0 links on centroid distance alone.",
    )
    velocity_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Motion model: a track is predicted at its last centroid plus velocity_weight × its "
        "last displacement per frame × frames elapsed. 0 predicts no motion, 1 constant velocity.",
    )
    gap_frames: int = Field(
        2,
        ge=0,
        description="Gap closing: a track not found in up to this many consecutive linked frames can still "
        "be continued; after that it has disappeared for good. 0 disables gap closing.",
    )
    gap_cost: float = Field(
        0.3,
        ge=0,
        description="Added to a link's cost per frame the track was missing, so that a track seen in the "
        "previous frame wins a cell over one that was lost.",
    )
    divisions: bool = Field(True, description="Detect divisions (one parent track, two daughter tracks).")
    division_distance: float = Field(
        15.0,
        gt=0,
        description="Largest distance in pixels from a parent's predicted centroid to each daughter's "
        "centroid.",
    )
    division_area_ratio: tuple[float, float] = Field(
        (0.25, 0.8),
        description="Each daughter's area over the parent's last area must lie in this closed range "
        "(daughters have about half their mother's area).",
    )
    merge_area_ratio: float = Field(
        1.5,
        gt=1,
        description="A track lost while the cell at its predicted centroid continued another track and grew "
        "by at least this factor is reported as merged into it (an under-segmentation), not just lost.",
    )

    @classmethod
    def from_file(cls, path: str | Path) -> TrackerConfig:
        """Load a YAML (or JSON) file holding a mapping of these fields (missing ones keep their defaults).

        Raises
        ------
        OSError
            The file cannot be read.
        yaml.YAMLError
            It is not YAML.
        ValueError
            Its top level is not a mapping, or a field does not validate (pydantic's ``ValidationError``).
        """
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of tracker settings, got {type(data).__name__}")
        return cls.model_validate(data)

    @model_validator(mode="after")
    def _check_ratio(self) -> TrackerConfig:
        lo, hi = self.division_area_ratio
        if not 0 < lo < hi:
            raise ValueError(f"division_area_ratio must be (low, high) with 0 < low < high, got ({lo}, {hi})")
        return self
