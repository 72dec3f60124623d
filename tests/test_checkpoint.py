"""Checkpoint reading, strict checking, adv-mode rule, SAM checkpoints and config inference, on real files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cellsam_core.checkpoint import infer_config, load_model, load_sam_weights, save_model
from cellsam_core.errors import CheckpointError, WeightsNotFoundError
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import MODEL_CONFIGS, build_model

TINY = MODEL_CONFIGS["tiny"]


def seeded_tiny(seed: int) -> CellSAM:
    torch.manual_seed(seed)
    return build_model("tiny")


def outputs(model: CellSAM) -> list[torch.Tensor]:
    """Image embedding of the active SAM copy, CellFinder detections and a mask decoding."""
    gen = torch.Generator().manual_seed(123)
    x = torch.rand(1, 3, TINY.image_size, TINY.image_size, generator=gen)
    with torch.no_grad():
        embedding = model.sam.image_encoder(x)
        logits, boxes = model.cellfinder.decode_head(x)
        sparse, dense = model.sam.prompt_encoder(
            points=None, boxes=torch.tensor([[[10.0, 20.0, 100.0, 120.0]]]), masks=None
        )
        masks, iou = model.sam.mask_decoder(
            embedding, model.sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
        )
    return [embedding, logits, boxes, masks, iou]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """Official-layout state dict of a tiny model whose two SAM copies differ (as a trained file would)."""
    model = seeded_tiny(0)
    with torch.no_grad():
        for p in model.model_cp.parameters():
            p.add_(0.01)
    return dict(model.state_dict())


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = seeded_tiny(0)
    path = tmp_path / "tiny.pt"
    save_model(model, path)

    loaded = load_model(path)  # sizes inferred from the file

    assert loaded.config == TINY
    assert loaded.adv_mode is True
    assert not loaded.training
    assert_same_weights(loaded, model)
    for got, expected in zip(outputs(loaded), outputs(model), strict=True):
        assert torch.equal(got, expected)
    assert len(torch.load(path, weights_only=True)) == 1041


def test_round_trip_keeps_adv_mode_off(tmp_path: Path) -> None:
    model = seeded_tiny(0)
    model.adv_mode = False
    path = tmp_path / "tiny.pt"
    save_model(model, path)
    assert not any(k.startswith("model_cp.") for k in torch.load(path, weights_only=True))
    assert load_model(path, "tiny").adv_mode is False


def test_state_dict_wrapper_is_unwrapped(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tiny_state, "epoch": 7}, path)
    loaded = load_model(path)
    assert loaded.adv_mode is True
    assert torch.equal(
        loaded.model_cp.image_encoder.pos_embed, tiny_state["model_cp.image_encoder.pos_embed"]
    )


def test_file_without_model_cp_turns_adv_mode_off(
    tmp_path: Path, tiny_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "no_cp.pt"
    torch.save({k: v for k, v in tiny_state.items() if not k.startswith("model_cp.")}, path)
    target = seeded_tiny(5)  # its model_cp differs from the file's model weights

    loaded = load_model(path, target)

    assert loaded is target
    assert loaded.adv_mode is False
    assert loaded.sam is loaded.model
    cp = loaded.model_cp.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, tiny_state["model." + k])
        assert torch.equal(cp[k], v)


def test_file_with_model_cp_keeps_its_weights(tiny_state: dict[str, torch.Tensor]) -> None:
    loaded = load_model(tiny_state, "tiny")
    assert loaded.adv_mode is True
    key = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(loaded.model_cp.state_dict()[key], tiny_state["model_cp." + key])
    assert not torch.equal(loaded.model.state_dict()[key], loaded.model_cp.state_dict()[key])


def _drop_one_cp(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k != "model_cp.mask_decoder.iou_token.weight"}


def _misshape(sd: dict) -> dict:
    return {**sd, "cellfinder.decode_head.transformer.pattern.weight": torch.zeros(1, 32)}


def _extra(sd: dict) -> dict:
    return {**sd, "cellfinder.decode_head.transformer.level_embed.weight": torch.zeros(1, 64)}


def _no_cellfinder_key(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k != "cellfinder.decode_head.input_proj.0.1.bias"}


@pytest.mark.parametrize(
    ("corrupt", "attr", "key", "message"),
    [
        (_drop_one_cp, "missing", "model_cp.mask_decoder.iou_token.weight", "model_cp.* is incomplete"),
        (
            _misshape,
            "mismatched",
            ("cellfinder.decode_head.transformer.pattern.weight", (1, 32), (1, 64)),
            "pattern.weight \\(file 1x32, model 1x64\\)",
        ),
        (_extra, "unexpected", "cellfinder.decode_head.transformer.level_embed.weight", "1 unexpected keys"),
        (_no_cellfinder_key, "missing", "cellfinder.decode_head.input_proj.0.1.bias", "1 missing keys"),
    ],
    ids=["partial-model_cp", "misshaped", "extra-key", "missing-key"],
)
def test_mismatching_files_name_the_keys(
    tmp_path: Path,
    tiny_state: dict[str, torch.Tensor],
    corrupt: Callable[[dict], dict],
    attr: str,
    key: object,
    message: str,
) -> None:
    path = tmp_path / "bad.pt"
    torch.save(corrupt(tiny_state), path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path, "tiny")
    assert getattr(info.value, attr) == [key]
    assert isinstance(info.value, ValueError)


def test_inference_also_checks_strictly(tiny_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="level_embed") as info:
        load_model(_extra(tiny_state))
    assert info.value.unexpected == ["cellfinder.decode_head.transformer.level_embed.weight"]


def test_many_missing_keys_are_counted_and_truncated(tiny_state: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in tiny_state.items() if not k.startswith("cellfinder.")}
    with pytest.raises(CheckpointError, match="413 missing keys") as info:
        load_model(partial, "tiny")
    assert len(info.value.missing) == 413
    assert "no CellFinder weights" in str(info.value)
    assert str(info.value).count("cellfinder.decode_head") == 10


def test_wrong_size_model_name(tiny_state: dict[str, torch.Tensor]) -> None:
    other = build_model(config=TINY.model_copy(update={"cellfinder_num_query_position": 50}))
    with pytest.raises(CheckpointError, match="other sizes; load it without model=") as info:
        load_model(tiny_state, other)
    assert info.value.mismatched == [
        ("cellfinder.decode_head.transformer.position.weight", (300, 2), (50, 2))
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a checkpoint at all", "could not be read as a torch checkpoint"),
        (b"", "could not be read as a torch checkpoint"),
    ],
    ids=["text", "empty"],
)
def test_garbled_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "garbled.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"model": {"a": torch.zeros(1)}}, "1 entries are not tensors \\(model\\)"),
        ({"state_dict": [1, 2]}, "'state_dict' entry is a list"),
        ({}, "no tensors at all"),
    ],
    ids=["list", "model-wrapper", "bad-wrapper", "empty-dict"],
)
def test_files_that_are_not_state_dicts(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, "tiny")


def test_module_prefix_is_explained(tiny_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="DataParallel"):
        load_model({"module." + k: v for k, v in tiny_state.items()}, "tiny")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def _sam_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}


def test_plain_sam_checkpoint(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(_sam_only(tiny_state), path)

    with pytest.raises(CheckpointError, match=r"plain SAM checkpoint.*sam_checkpoint=True"):
        load_model(path)

    target = seeded_tiny(9)
    cellfinder_before = {k: v.clone() for k, v in target.cellfinder.state_dict().items()}
    loaded = load_model(path, target, sam_checkpoint=True)
    for copy in (loaded.model, loaded.model_cp):
        for k, v in copy.state_dict().items():
            assert torch.equal(v, tiny_state["model." + k]), k
    for k, v in loaded.cellfinder.state_dict().items():
        assert torch.equal(v, cellfinder_before[k])

    # Without a model, the SAM sizes pick the registry entry.
    assert load_model(path, sam_checkpoint=True).config == TINY


def test_sam_checkpoint_checks(tiny_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="without sam_checkpoint=True"):
        load_model(tiny_state, "tiny", sam_checkpoint=True)
    broken = _sam_only(tiny_state)
    del broken["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="SAM part") as info:
        load_sam_weights(seeded_tiny(0), broken)
    assert info.value.missing == ["mask_decoder.iou_token.weight"]


def test_infer_config_picks_the_registry_entry(tiny_state: dict[str, torch.Tensor]) -> None:
    assert infer_config(tiny_state) is MODEL_CONFIGS["tiny"]


def test_infer_config_of_unregistered_sizes(tmp_path: Path) -> None:
    # Head counts cannot be read from shapes; this config uses the fallback's choice for them.
    cfg = TINY.model_copy(
        update={
            "vit_depth": 3,
            "vit_global_attn_indexes": (1,),
            "vit_window_size": 4,
            "cellfinder_enc_layers": 2,
            "cellfinder_dec_layers": 3,
            "cellfinder_num_query_position": 40,
            "cellfinder_num_query_pattern": 2,
            "decoder_num_heads": 8,
            "cellfinder_nheads": 2,
        }
    )
    torch.manual_seed(0)
    model = build_model(config=cfg)
    path = tmp_path / "custom.pt"
    save_model(model, path)

    loaded = load_model(path)

    assert loaded.config == cfg
    assert_same_weights(loaded, model)
    assert loaded.cellfinder.decode_head.num_queries == 80


def test_load_moves_to_device_and_eval(tiny_state: dict[str, torch.Tensor]) -> None:
    target = seeded_tiny(0).train()
    loaded = load_model(tiny_state, target, device="cpu")
    assert not loaded.training
    assert loaded.model.image_encoder.pos_embed.device.type == "cpu"


def test_official_vit_b_checkpoint_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cellsam_vit_b")
    path = tmp_path / "cellsam_vit_b.pt"
    save_model(model, path)
    del model

    loaded = load_model(path)

    file_state = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded.config == MODEL_CONFIGS["cellsam_vit_b"]
    assert loaded.adv_mode is True
    state = loaded.state_dict()
    assert list(state) == list(file_state)
    for k, v in file_state.items():
        assert torch.equal(state[k], v), k
