"""Model sizes and builders: ``model_registry[name]()`` returns a randomly initialised :class:`CellSAM`.

Every hyperparameter lives in a :class:`~cellsam_core.configs.ModelConfig`; ``"cellsam_vit_b"`` is the
official architecture (the layout of ``cellsam_general.pt``), ``"tiny"`` the same module tree with tiny
sizes for fast CPU tests and demos; ``"cellsam_nano"`` (a :class:`~cellsam_core.configs.NanoConfig`) the
compact model of ``docs/models.md`` whose
trained weights ship in the package. Weights are loaded separately (:mod:`cellsam_core.checkpoint`).
Building is deterministic for a given ``torch.manual_seed``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cellsam_core.configs import NANO_STRIDE, ModelConfig, NanoConfig
from cellsam_core.errors import UnknownModelError
from cellsam_core.modeling.anchor_detr import AnchorDETRTransformer
from cellsam_core.modeling.cellfinder import Backbone, CellFinder, CellFinderDetector
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.modeling.nano import ConvTrunk, DenseDetector, NanoImageEncoder
from cellsam_core.modeling.vit import ViTBackbone

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_CONFIGS",
    "NANO_CONFIGS",
    "build_from_config",
    "build_model",
    "model_registry",
]

# SAM's pixel statistics (0-255 scale); constants of the architecture, not weights.
_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)


def _prompt_and_mask_decoder(config: ModelConfig | NanoConfig) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder at the sizes of ``config`` (shared by every architecture)."""
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(config.grid_size, config.grid_size),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=config.decoder_iou_head_hidden_dim,
    )
    return prompt_encoder, mask_decoder


def _build_sam(config: ModelConfig) -> Sam:
    encoder = ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=3,
        embed_dim=config.vit_embed_dim,
        depth=config.vit_depth,
        num_heads=config.vit_num_heads,
        mlp_ratio=config.vit_mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.vit_window_size,
        global_attn_indexes=config.vit_global_attn_indexes,
    )
    prompt_encoder, mask_decoder = _prompt_and_mask_decoder(config)
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(_PIXEL_MEAN),
        pixel_std=list(_PIXEL_STD),
    )


def _build_cellfinder(config: ModelConfig) -> CellFinder:
    body = ViTBackbone(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.vit_embed_dim,
        depth=config.vit_depth,
        num_heads=config.vit_num_heads,
        mlp_ratio=config.vit_mlp_ratio,
        window_size=config.vit_window_size,
        global_attn_indexes=config.vit_global_attn_indexes,
    )
    transformer = AnchorDETRTransformer(
        d_model=config.cellfinder_d_model,
        nhead=config.cellfinder_nheads,
        num_encoder_layers=config.cellfinder_enc_layers,
        num_decoder_layers=config.cellfinder_dec_layers,
        dim_feedforward=config.cellfinder_dim_feedforward,
        num_query_position=config.cellfinder_num_query_position,
        num_query_pattern=config.cellfinder_num_query_pattern,
        num_classes=config.cellfinder_num_classes,
    )
    detector = CellFinderDetector(
        backbone=Backbone(body=body), transformer=transformer, backbone_channels=config.vit_embed_dim
    )
    return CellFinder(decode_head=detector)


def _build_nano(config: NanoConfig) -> CellSAM:
    trunk = ConvTrunk(widths=config.trunk_widths, out_dim=config.trunk_dim)
    prompt_encoder, mask_decoder = _prompt_and_mask_decoder(config)
    sam = Sam(
        image_encoder=NanoImageEncoder(
            trunk=trunk,
            img_size=config.image_size,
            trunk_dim=config.trunk_dim,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(_PIXEL_MEAN),
        pixel_std=list(_PIXEL_STD),
    )
    # The detector shares the trunk with SAM's encoder role (one set of weights, listed under both keys).
    detector = DenseDetector(
        trunk=trunk, trunk_dim=config.trunk_dim, stride=NANO_STRIDE, image_size=config.image_size
    )
    model = CellSAM(
        model=sam,
        model_cp=copy.deepcopy(sam),
        cellfinder=CellFinder(decode_head=detector),
        config=config,
        adv_mode=False,
    )
    return model.eval()


def build_from_config(config: ModelConfig | NanoConfig) -> CellSAM:
    """Build a randomly initialised CellSAM of the given sizes, in eval mode.

    For a :class:`ModelConfig`, ``model_cp`` starts as a copy of ``model`` (as in the reference) and
    ``adv_mode`` is True until a checkpoint says otherwise. A :class:`NanoConfig` builds cellsam-nano with
    ``adv_mode`` False (it has one SAM copy's worth of trained weights).
    """
    if isinstance(config, NanoConfig):
        return _build_nano(config)
    sam = _build_sam(config)
    cellfinder = _build_cellfinder(config)
    model = CellSAM(
        model=sam, model_cp=copy.deepcopy(sam), cellfinder=cellfinder, config=config, adv_mode=True
    )
    return model.eval()


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # The official CellSAM (v1.x): ViT-B SAM ×2 and a ViT-B CellFinder backbone at 1024².
    "cellsam_vit_b": ModelConfig(),
    # Exactly the official key set (same depths and layer counts) with tiny widths, a 256² input and 300
    # queries: building takes well under a second and a forward pass tens of milliseconds on a CPU.
    "tiny": ModelConfig(
        image_size=256,
        vit_embed_dim=64,
        vit_num_heads=2,
        vit_window_size=8,
        prompt_embed_dim=64,
        mask_in_chans=8,
        decoder_num_heads=2,
        decoder_mlp_dim=128,
        decoder_iou_head_hidden_dim=64,
        cellfinder_d_model=64,
        cellfinder_nheads=2,
        cellfinder_dim_feedforward=128,
        cellfinder_num_query_position=300,
    ),
}
"""Configuration of every registered model, by name."""

NANO_CONFIGS: dict[str, NanoConfig] = {
    # The bundled default model (cellsam_core/data/cellsam_nano.pt); see docs/models.md.
    "cellsam_nano": NanoConfig(),
}
"""Configuration of every registered cellsam-nano model, by name."""

DEFAULT_MODEL = "cellsam_vit_b"

_ALL_CONFIGS: dict[str, ModelConfig | NanoConfig] = {**MODEL_CONFIGS, **NANO_CONFIGS}

model_registry: dict[str, Callable[[], CellSAM]] = {
    name: partial(build_from_config, cfg) for name, cfg in _ALL_CONFIGS.items()
}
"""Builders of randomly initialised models, by name (``model_registry["tiny"]()``)."""


def build_model(name: str = DEFAULT_MODEL, *, config: ModelConfig | NanoConfig | None = None) -> CellSAM:
    """Build a registered model with random weights, or one of custom sizes.

    Parameters
    ----------
    name : str
        Key of :data:`model_registry`; ignored when ``config`` is given.
    config : ModelConfig, optional
        Custom sizes; takes precedence over ``name``.

    Raises
    ------
    UnknownModelError
        ``name`` is not registered (and no ``config`` was given).
    """
    if config is not None:
        return build_from_config(config)
    try:
        builder = model_registry[name]
    except KeyError:
        raise UnknownModelError(name, list(model_registry)) from None
    return builder()
