"""The safety limits of a feedback loop: one frozen model, validated at the boundary, loadable from YAML."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FeedbackLimits"]


class FeedbackLimits(BaseModel):
    """Safety limits of a feedback loop (per acquisition). Every field is enforced before an action is
    enqueued; an action that breaks one is dropped and recorded with the limit's name in ``detail``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_result_age_s: float = Field(
        default=5.0,
        gt=0,
        description="A result older than this (frameReady → the loop has it) triggers no action: 'stale'.",
    )
    max_actions_per_s: float = Field(
        default=5.0, gt=0, description="Sustained action rate (token bucket refill); Stop is never limited."
    )
    burst: int = Field(default=10, ge=1, description="Actions allowed at once before the rate applies.")
    max_added_events: int = Field(
        default=100, ge=0, description="Most events Acquire actions may add to one acquisition."
    )
    max_rule_errors: int = Field(
        default=10, ge=1, description="A rule that raises this many times in a row is disabled."
    )
    stage_limits_um: tuple[tuple[float, float], tuple[float, float]] | None = Field(
        default=None,
        description="((x_min, x_max), (y_min, y_max)) in µm; Acquire targets outside are dropped.",
    )

    @classmethod
    def from_file(cls, path: str) -> FeedbackLimits:
        """Load from a YAML or JSON file (the fields above; unknown keys are an error)."""
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f) or {})
