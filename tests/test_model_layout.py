"""The module tree produces exactly the official checkpoint layout; registry and config behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellsam_core.configs import ModelConfig
from cellsam_core.errors import CellSAMError, UnknownModelError
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import MODEL_CONFIGS, build_model, model_registry

# Every tensor of the official CellSAM state dict (key, shape, dtype), in order.
LAYOUT = Path(__file__).parent / "data" / "cellsam_vit_b.tsv"


def official_layout() -> list[tuple[str, str, str]]:
    lines = LAYOUT.read_text().splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


def layout_of(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [
        (k, "x".join(map(str, v.shape)) if v.dim() else "scalar", str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]


@pytest.fixture(scope="module")
def vit_b() -> CellSAM:
    torch.manual_seed(0)
    return build_model("cellsam_vit_b")


def test_vit_b_state_dict_is_the_official_layout(vit_b: CellSAM) -> None:
    assert layout_of(vit_b) == official_layout()


def test_vit_b_sizes(vit_b: CellSAM) -> None:
    assert vit_b.image_size == 1024
    assert vit_b.config == MODEL_CONFIGS["cellsam_vit_b"]
    assert vit_b.cellfinder.decode_head.num_queries == 3500
    assert not vit_b.training


def test_tiny_has_the_official_keys_in_order() -> None:
    tiny = build_model("tiny")
    layout = layout_of(tiny)
    assert [k for k, _, _ in layout] == [k for k, _, _ in official_layout()]
    assert {d for _, _, d in layout} == {"float32"}
    shapes = {k: s for k, s, _ in layout}
    assert shapes["model.image_encoder.pos_embed"] == "1x16x16x64"
    assert shapes["cellfinder.decode_head.transformer.position.weight"] == "300x2"


def test_sam_property_follows_adv_mode() -> None:
    model = build_model("tiny")
    assert model.adv_mode is True
    assert model.sam is model.model_cp
    model.adv_mode = False
    assert model.sam is model.model
    assert model.image_size == 256


def test_builder_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    a = build_model("tiny").state_dict()
    torch.manual_seed(3)
    b = build_model("tiny").state_dict()
    torch.manual_seed(4)
    c = build_model("tiny").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_model_cp_starts_as_a_copy_of_model() -> None:
    model = build_model("tiny")
    cp = model.model_cp.state_dict()
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, cp[k])
    assert model.model_cp.image_encoder.pos_embed is not model.model.image_encoder.pos_embed


def test_registry_names_and_unknown_model() -> None:
    assert {"cellsam_vit_b", "tiny"} <= set(model_registry)
    with pytest.raises(UnknownModelError, match=r"known models: .*tiny") as info:
        build_model("vit_z")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, CellSAMError)


def test_build_with_custom_config() -> None:
    cfg = MODEL_CONFIGS["tiny"].model_copy(update={"cellfinder_num_query_position": 17})
    model = build_model(config=cfg)
    assert model.config is cfg
    assert model.cellfinder.decode_head.num_queries == 17


def test_tiny_forward_shapes() -> None:
    model = build_model("tiny")
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        embedding = model.sam.image_encoder(x)
        features = model.cellfinder.decode_head.backbone.body(x)
    assert embedding.shape == (1, 64, 16, 16)
    assert features.shape == (1, 64, 16, 16)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"image_size": 250}, "multiple of patch_size"),
        ({"vit_num_heads": 5}, "vit_num_heads"),
        ({"vit_global_attn_indexes": (12,)}, "vit_global_attn_indexes"),
        ({"prompt_embed_dim": 60}, "multiple of 8"),
        ({"decoder_num_heads": 3}, "decoder_num_heads"),
        ({"cellfinder_d_model": 48}, "multiple of 32"),
        ({"cellfinder_nheads": 3}, "cellfinder_nheads"),
        ({"vit_depth": 0}, "greater than 0"),
        ({"not_a_field": 1}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_rejected(update: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**update)


def test_config_is_frozen() -> None:
    cfg = ModelConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.image_size = 512  # type: ignore[misc]
