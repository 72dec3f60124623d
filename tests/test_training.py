"""Training, resuming and fine-tuning on tiny settings (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_core.checkpoint import BUNDLED_WEIGHTS, load_model, read_state_dict
from cellsam_core.configs import NanoConfig
from cellsam_core.io import read_image
from cellsam_core.training import TrainConfig, finetune, train
from cellsam_core.training.assess import evaluate_model
from cellsam_core.training.data import synthetic_examples

# Small crops, few prompts: a step takes a few tens of milliseconds.
FINETUNE_STEPS = 10
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


def _inverted_nuclei(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A style training never showed: dark nuclei on a bright background (inverted fluorescence)."""
    from cellsam_core.synthetic import synthetic_frame

    image, labels = synthetic_frame((256, 256), seed=seed, modality="nuclear", n_cells=40)
    return (image.max() - image).astype(np.uint16), labels


def test_finetune_on_a_few_frames_raises_f1_on_that_style(tmp_path: Path) -> None:
    train_frames = [_inverted_nuclei(123 + i) for i in range(3)]
    test_frames = [_inverted_nuclei(777 + i) for i in range(2)]
    base = load_model(BUNDLED_WEIGHTS)
    before = evaluate_model(base, [f[0] for f in test_frames], [f[1] for f in test_frames]).f1(0.5)
    out = finetune(
        [f[0] for f in train_frames],
        [f[1] for f in train_frames],
        output=tmp_path / "ft.pt",
        steps=FINETUNE_STEPS,
        lr=1e-3,
        num_threads=1,
    )
    tuned = load_model(out)
    after = evaluate_model(tuned, [f[0] for f in test_frames], [f[1] for f in test_frames]).f1(0.5)
    # The bundled model already finds most of these nuclei (F1 ~0.7): fine-tuning must at least halve
    # the error (1 - F1) on the two frames it did not see.
    assert 1.0 - after <= 0.5 * (1.0 - before) and after >= 0.85, (before, after)


def test_finetune_official_architecture_trains_masks_only(tmp_path: Path) -> None:
    """An official-layout checkpoint (the ``tiny`` sizes of the official module tree) fine-tunes its SAM
    prompt encoder and mask decoder; the ViT encoder and AnchorDETR stay as they were."""
    from cellsam_core.checkpoint import save_model
    from cellsam_core.registry import MODEL_CONFIGS, build_model
    from cellsam_core.synthetic import synthetic_frame

    torch.manual_seed(0)
    base_path = tmp_path / "official_tiny.pt"
    save_model(build_model("tiny"), base_path)
    frame = synthetic_frame((128, 128), seed=5, modality="whole_cell", n_cells=8)
    out = finetune(
        [frame[0]], [frame[1]], output=tmp_path / "ft.pt", weights=base_path, steps=1, lr=1e-3, num_threads=1
    )
    before, after = read_state_dict(base_path), read_state_dict(out)
    assert load_model(out).config == MODEL_CONFIGS["tiny"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model_cp.mask_decoder.") for k in changed)
    assert not any(k.startswith(("cellfinder.", "model_cp.image_encoder.", "model.")) for k in changed)


def test_prepare_data_command_writes_the_sequence_in_parallel_parts(tmp_path: Path) -> None:
    from serving.cli import main

    out = tmp_path / "data" / "train.npz"
    args = ["prepare-data", str(out), "--frames", "27", "--seed", "5", "--image-size", "64"]
    assert main([*args, "--workers", "2", "--modalities", "nuclear", "bacteria", "empty"]) == 0
    expected = synthetic_examples(27, seed=5, image_size=64, modalities=("nuclear", "bacteria", "empty"))
    with np.load(out) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (27, 3, 64, 64) and images.dtype == np.uint8 and labels.dtype == np.int16
    np.testing.assert_array_equal(images, np.stack([e.image for e in expected]))
    np.testing.assert_array_equal(labels, np.stack([e.labels for e in expected]))
    assert not labels[2::3].any() and all(lab.any() for lab in labels[0::3])  # "empty" frames have no cells
    assert main(["prepare-data", str(out), "--frames", "0", "--seed", "1"]) == 1


def test_fewshot_demo_script_runs_end_to_end(tmp_path: Path) -> None:
    """docs/models.md's few-shot command sequence, at toy size (20 cells, 2 steps) so it never rots."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "fewshot-demo.sh"
    run = subprocess.run(
        ["bash", str(script), str(tmp_path / "demo"), "inverted", "20", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("10 images,") == 2 and "fine-tuning on 3 frames took" in run.stdout
    assert (tmp_path / "demo" / "tuned.pt").is_file()
    image = read_image(tmp_path / "demo" / "img_0.tif")
    labels = read_image(tmp_path / "demo" / "lab_0.tif")
    assert labels.any() and image[labels > 0].mean() < image[labels == 0].mean()  # inverted: dark nuclei
    bad = subprocess.run(["bash", str(script), str(tmp_path / "x"), "nope"], env=env, capture_output=True)
    assert bad.returncode == 2


def test_recipe_of_the_bundled_weights_is_a_valid_config() -> None:
    recipe = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "cellsam-nano.yaml"
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.model == "cellsam_nano" and cfg.data_files and cfg.steps > max(cfg.lr_drops)
    assert "dic" not in cfg.modalities and "empty" in cfg.modalities
