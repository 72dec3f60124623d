"""Training, resuming and fine-tuning on tiny settings (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_core.checkpoint import BUNDLED_WEIGHTS, load_model, read_state_dict
from cellsam_core.registry import NanoConfig
from cellsam_core.training import TrainConfig, finetune, train
from cellsam_core.training.assess import evaluate_model
from cellsam_core.training.data import synthetic_examples

# Small crops, few prompts: a step takes a few tens of milliseconds.
FAST = {"batch_size": 2, "crop_size": 64, "prompts_per_image": 2, "warmup_steps": 0, "log_every": 1}


@pytest.fixture(scope="module")
def examples() -> list:  # type: ignore[type-arg]
    return synthetic_examples(3, seed=7, image_size=NanoConfig().image_size)


def _config(tmp_path: Path, name: str, **kw: object) -> TrainConfig:
    return TrainConfig.model_validate({**FAST, "output": tmp_path / f"{name}.pt", **kw})


def test_loss_decreases(tmp_path: Path, examples: list) -> None:  # type: ignore[type-arg]
    history: list[float] = []
    cfg = _config(tmp_path, "a", steps=25, lr=3e-3, crop_size=None, batch_size=1)
    train(cfg, examples=examples[:1], on_step=lambda _, terms: history.append(sum(terms.values())))
    assert len(history) == 25
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5])


def test_same_seed_same_weights_and_loadable(tmp_path: Path, examples: list) -> None:  # type: ignore[type-arg]
    a = train(_config(tmp_path, "a", steps=3, seed=3), examples=examples)
    b = train(_config(tmp_path, "b", steps=3, seed=3), examples=examples)
    c = train(_config(tmp_path, "c", steps=3, seed=4), examples=examples)
    sa, sb, sc = read_state_dict(a), read_state_dict(b), read_state_dict(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    model = load_model(a)
    assert isinstance(model.config, NanoConfig) and not model.adv_mode


def test_resume_equals_uninterrupted(tmp_path: Path, examples: list) -> None:  # type: ignore[type-arg]
    full = train(_config(tmp_path, "full", steps=4, checkpoint_every=2), examples=examples)
    work = tmp_path / "state"
    first = _config(tmp_path, "part", steps=2, checkpoint_every=2, work_dir=work)
    train(first, examples=examples)
    seen: list[int] = []
    resumed = train(
        _config(tmp_path, "part", steps=4, checkpoint_every=2, work_dir=work),
        resume=True,
        examples=examples,
        on_step=lambda step, _: seen.append(step),
    )
    assert seen == [3, 4]  # it really continued rather than starting over
    sf, sr = read_state_dict(full), read_state_dict(resumed)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)


def test_resume_refuses_other_settings(tmp_path: Path, examples: list) -> None:  # type: ignore[type-arg]
    work = tmp_path / "state"
    train(_config(tmp_path, "x", steps=1, work_dir=work), examples=examples)
    with pytest.raises(ValueError, match="other settings"):
        train(_config(tmp_path, "x", steps=2, work_dir=work, lr=1e-2), resume=True, examples=examples)


def test_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 12\nlr_drops: [5, 9]\noutput: out.pt\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.steps == 12 and cfg.lr_drops == (5, 9) and cfg.output == Path("out.pt")
    path.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_yaml(path)
