"""Loading and saving CellSAM weights in the official checkpoint layout, strictly checked.

An official file (``cellsam_general.pt`` and kin) is one ``torch.save``d state dict with keys
``model.*`` (SAM), ``cellfinder.decode_head.*`` (CellFinder) and, optionally, ``model_cp.*`` (a second SAM
copy); a ``{"state_dict": ...}`` wrapper is accepted where no key starts with ``model.`` (the reference's
rule). Whether ``model_cp.*`` is there decides the model's ``adv_mode``, as in the reference:

* present (it must then be complete): ``adv_mode = True``, ``model_cp`` encodes images and decodes masks;
* absent: ``adv_mode = False`` and ``model_cp`` receives a copy of ``model``'s weights.

Unlike the reference (``strict=False``), every other key must be present with the right shape and nothing
else may be in the file; otherwise :class:`~cellsam_core.errors.CheckpointError` names the offending keys.
Plain SAM checkpoints (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) load into both SAM
copies with ``sam_checkpoint=True`` or :func:`load_sam_weights`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch

from cellsam_core.configs import ModelConfig, NanoConfig
from cellsam_core.errors import CheckpointError, WeightsNotFoundError
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import MODEL_CONFIGS, NANO_CONFIGS, build_from_config, build_model

__all__ = [
    "BUNDLED_WEIGHTS",
    "infer_config",
    "load_bundled_model",
    "load_model",
    "load_sam_weights",
    "read_state_dict",
    "save_model",
]

BUNDLED_WEIGHTS = Path(__file__).parent / "data" / "cellsam_nano.pt"
"""The cellsam-nano weights shipped in the package (trained by :mod:`cellsam_core.training`)."""

StateDict: TypeAlias = dict[str, torch.Tensor]
Source: TypeAlias = str | os.PathLike[str] | Mapping[str, Any]

_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_SHOWN = 10  # keys listed per category in error messages


def read_state_dict(source: Source) -> StateDict:
    """Read a state dict from a file (or take a mapping) and unwrap ``{"state_dict": ...}``.

    Parameters
    ----------
    source : path or mapping
        A ``torch.save``d file, read with ``weights_only=True`` onto the CPU, or an in-memory dict.

    Raises
    ------
    WeightsNotFoundError
        ``source`` is a path that does not exist.
    CheckpointError
        The file cannot be read as a torch checkpoint, or does not hold a ``str -> Tensor`` mapping.
    """
    if isinstance(source, Mapping):
        obj: Any = source
        where = "the given state dict"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint file {path} does not exist; check the path")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises a zoo of types (UnpicklingError, RuntimeError, EOFError...)
            raise CheckpointError(
                f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {exc}); "
                "it must be a file written by torch.save holding a state dict of tensors"
            ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds a {type(obj).__name__}, not a state dict (a str -> Tensor dict)"
        )
    # The reference unwraps {"state_dict": ...} only if no key already looks like CellSAM's own.
    if "state_dict" in obj and not any(str(k).startswith("model.") for k in obj):
        obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: the 'state_dict' entry is a {type(obj).__name__}, not a dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{where} is not a plain state dict: {len(bad)} entries are not tensors "
            f"({', '.join(bad[:_SHOWN])}); pass the file of model weights, not a training checkpoint",
            unexpected=bad,
        )
    return dict(obj)


# --- configuration inference --------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(
            f"cannot infer the model sizes: key {key!r} is missing. {_describe(sd)}"
            "Pass model= (a registry name or a CellSAM) to get the full list of differences.",
            missing=[key],
        )
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indexes) + 1 if indexes else 0


def _infer_sam_fields(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    enc, dec = f"{prefix}image_encoder.", f"{prefix}mask_decoder."
    _, grid, _, embed_dim = _shape(sd, enc + "pos_embed")
    patch = _shape(sd, enc + "patch_embed.proj.weight")[-1]
    depth = _count(sd, enc + "blocks.")
    head_dim = _shape(sd, enc + "blocks.0.attn.rel_pos_h")[1]
    rel_sizes = [_shape(sd, f"{enc}blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    global_idx = tuple(i for i, n in enumerate(rel_sizes) if n == 2 * grid - 1)
    windowed = [n for n in rel_sizes if n != 2 * grid - 1]
    return {
        "image_size": grid * patch,
        "patch_size": patch,
        "vit_embed_dim": embed_dim,
        "vit_depth": depth,
        "vit_num_heads": embed_dim // head_dim,
        "vit_mlp_ratio": _shape(sd, enc + "blocks.0.mlp.lin1.weight")[0] / embed_dim,
        "vit_global_attn_indexes": global_idx,
        # With every block global the window size is irrelevant; the grid side is equivalent.
        "vit_window_size": (windowed[0] + 1) // 2 if windowed else grid,
        "prompt_embed_dim": _shape(sd, enc + "neck.0.weight")[0],
        "mask_in_chans": _shape(sd, f"{prefix}prompt_encoder.mask_downscaling.3.weight")[0],
        "decoder_depth": _count(sd, dec + "transformer.layers."),
        "decoder_mlp_dim": _shape(sd, dec + "transformer.layers.0.mlp.lin1.weight")[0],
        "decoder_iou_head_hidden_dim": _shape(sd, dec + "iou_prediction_head.layers.0.weight")[0],
        "num_multimask_outputs": _shape(sd, dec + "mask_tokens.weight")[0] - 1,
    }


def _infer_cellfinder_fields(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    tr = "cellfinder.decode_head.transformer."
    n_pattern, d_model = _shape(sd, tr + "pattern.weight")
    return {
        "cellfinder_d_model": d_model,
        "cellfinder_num_query_pattern": n_pattern,
        "cellfinder_num_query_position": _shape(sd, tr + "position.weight")[0],
        "cellfinder_dim_feedforward": _shape(sd, tr + "decoder_layers.0.ffn.linear1.weight")[0],
        "cellfinder_enc_layers": _count(sd, tr + "encoder_layers."),
        "cellfinder_dec_layers": _count(sd, tr + "decoder_layers."),
        "cellfinder_num_classes": _shape(sd, tr + "class_embed.0.weight")[0],
    }


def _config_from_fields(fields: dict[str, Any]) -> ModelConfig:
    """Registry config whose sizes equal ``fields``, else a new config from them."""
    for cfg in MODEL_CONFIGS.values():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    # Head counts cannot be read from weight shapes. Fall back to the official head widths: 32 channels
    # per CellFinder head (256 / 8) and 8 heads in SAM's decoder where they divide.
    full = dict(fields)
    if "cellfinder_d_model" in full:
        full["cellfinder_nheads"] = max(1, full["cellfinder_d_model"] // 32)
    half = full.get("prompt_embed_dim", 256) // 2
    full["decoder_num_heads"] = next(h for h in (8, 4, 2, 1) if half % h == 0)
    try:
        return ModelConfig(**full)
    except ValueError as exc:
        raise CheckpointError(f"the weight shapes describe no valid model ({exc})") from exc


_NANO_MARKER = "cellfinder.decode_head.heatmap.1.weight"


def _infer_nano_config(sd: Mapping[str, torch.Tensor]) -> NanoConfig:
    """cellsam-nano sizes: the input size is a stored buffer, everything else comes from shapes."""
    enc, dec = "model.image_encoder.", "model.mask_decoder."
    size_key = enc + "input_size"
    if size_key not in sd or sd[size_key].numel() != 1:
        raise CheckpointError(
            f"cellsam-nano checkpoint without a scalar {size_key!r}; it was not written by save_model",
            missing=[size_key],
        )
    fields: dict[str, Any] = {
        "image_size": int(sd[size_key].item()),
        "trunk_widths": tuple(_shape(sd, f"{enc}trunk.stages.{i}.0.0.weight")[0] for i in range(5)),
        "trunk_dim": _shape(sd, enc + "trunk.lateral.0.weight")[0],
        "prompt_embed_dim": _shape(sd, enc + "neck.0.weight")[0],
        "mask_in_chans": _shape(sd, "model.prompt_encoder.mask_downscaling.3.weight")[0],
        "decoder_depth": _count(sd, dec + "transformer.layers."),
        "decoder_mlp_dim": _shape(sd, dec + "transformer.layers.0.mlp.lin1.weight")[0],
        "decoder_iou_head_hidden_dim": _shape(sd, dec + "iou_prediction_head.layers.0.weight")[0],
        "num_multimask_outputs": _shape(sd, dec + "mask_tokens.weight")[0] - 1,
    }
    for cfg in NANO_CONFIGS.values():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    half = fields["prompt_embed_dim"] // 2
    fields["decoder_num_heads"] = next(h for h in (2, 1) if half % h == 0)
    try:
        return NanoConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(f"the weight shapes describe no valid cellsam-nano model ({exc})") from exc


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig | NanoConfig:
    """Model sizes of a CellSAM state dict in the official layout, read from tensor shapes.

    Returns the registered configuration with those sizes when there is one (so head counts, which shapes
    do not determine, are the registered ones); otherwise a new configuration with official head widths.
    A cellsam-nano checkpoint (dense detector keys) gives a :class:`~cellsam_core.configs.NanoConfig`.

    Raises
    ------
    CheckpointError
        A key needed to read the sizes is missing.
    """
    if _NANO_MARKER in state_dict:
        return _infer_nano_config(state_dict)
    fields = _infer_sam_fields(state_dict, "model.")
    fields.update(_infer_cellfinder_fields(state_dict))
    return _config_from_fields(fields)


# --- checking and loading -----------------------------------------------------------------------------


def _describe(keys: Mapping[str, Any] | list[str]) -> str:
    """A sentence on what a set of keys looks like, for error messages ('' if nothing specific)."""
    names = list(keys)
    if not names:
        return "The file holds no tensors at all. "
    if all(k.startswith(_SAM_PARTS) for k in names):
        return "This looks like a plain SAM checkpoint (image_encoder.*, ...); pass sam_checkpoint=True. "
    if all(k.startswith("module.") for k in names):
        return "All keys start with 'module.' (saved from a DataParallel wrapper); strip that prefix. "
    if all(k.startswith(("decode_head.", "transformer.", "backbone.", "input_proj.")) for k in names):
        return "This looks like CellFinder (AnchorDETR) weights alone, not a CellSAM checkpoint. "
    if not any(k.startswith("cellfinder.") for k in names) and any(k.startswith("model.") for k in names):
        return "It has SAM weights (model.*) but no CellFinder weights (cellfinder.*). "
    return ""


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _mismatch_error(
    what: str,
    file_keys: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    hint: str = "",
) -> CheckpointError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {', '.join(missing[:_SHOWN])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:_SHOWN])}")
    if mismatched:
        shown = ", ".join(
            f"{k} (file {_fmt_shape(a)}, model {_fmt_shape(b)})" for k, a, b in mismatched[:_SHOWN]
        )
        parts.append(f"{len(mismatched)} keys with other shapes: {shown}")
    if mismatched and not missing and not unexpected:
        hint += "The file holds a model of other sizes; load it without model= to infer them. "
    message = f"checkpoint does not match {what}: " + "; ".join(parts) + ". " + hint + _describe(file_keys)
    return CheckpointError(message.strip(), missing=missing, unexpected=unexpected, mismatched=mismatched)


def _compare(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        (k, tuple(given[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, mismatched


def _reject_plain_sam(sd: StateDict) -> None:
    if any(k.startswith(_SAM_PARTS) for k in sd) and not any(k.startswith("model.") for k in sd):
        raise CheckpointError(
            "this looks like a plain SAM checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.*), "
            "not a CellSAM one; pass sam_checkpoint=True to load it into the SAM part only",
            unexpected=list(sd),
        )


def _load_cellsam(model: CellSAM, sd: StateDict, what: str) -> None:
    expected = model.state_dict()
    has_cp = any(k.startswith("model_cp.") for k in sd)
    if not has_cp:
        expected = OrderedDict((k, v) for k, v in expected.items() if not k.startswith("model_cp."))
    missing, unexpected, mismatched = _compare(expected, sd)
    if missing or unexpected or mismatched:
        hint = ""
        if has_cp and any(k.startswith("model_cp.") for k in missing):
            hint = "The second SAM copy (model_cp.*) is incomplete: a file holds all of it or none of it. "
        raise _mismatch_error(what, sd, missing, unexpected, mismatched, hint)
    full = dict(sd)
    if not has_cp:
        # As the reference: without model_cp weights, model_cp becomes a copy of model.
        full.update({"model_cp." + k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")})
    model.load_state_dict(full, strict=True)
    model.adv_mode = has_cp


def load_sam_weights(model: CellSAM, source: Source) -> CellSAM:
    """Load a plain SAM checkpoint (e.g. ``sam_vit_b_01ec64.pth``) into both SAM copies of ``model``.

    CellFinder and ``adv_mode`` are left as they are. Keys and shapes are checked strictly.

    Raises
    ------
    CheckpointError
        The file is not a SAM checkpoint of ``model``'s SAM size.
    """
    sd = read_state_dict(source)
    if any(k.startswith(("model.", "cellfinder.")) for k in sd):
        raise CheckpointError(
            "this is a CellSAM checkpoint (model.*, cellfinder.*), not a plain SAM one; "
            "load it without sam_checkpoint=True",
            unexpected=[k for k in sd if not k.startswith(_SAM_PARTS)],
        )
    missing, unexpected, mismatched = _compare(model.model.state_dict(), sd)
    if missing or unexpected or mismatched:
        raise _mismatch_error("the SAM part of the model", sd, missing, unexpected, mismatched)
    model.model.load_state_dict(sd, strict=True)
    model.model_cp.load_state_dict(sd, strict=True)
    return model


def load_model(
    path_or_state_dict: Source,
    model: str | CellSAM | None = None,
    *,
    device: str | torch.device = "cpu",
    sam_checkpoint: bool = False,
) -> CellSAM:
    """Load CellSAM weights, strictly checked, into a new or given model.

    Parameters
    ----------
    path_or_state_dict : path or mapping
        Official-layout CellSAM checkpoint (or a plain SAM one with ``sam_checkpoint=True``).
    model : str or CellSAM, optional
        Registry name to build, or a model to load into (in place). By default the sizes are inferred
        from the tensor shapes (:func:`infer_config`).
    device : str or torch.device
        Where the returned model lives.
    sam_checkpoint : bool
        The file is a plain SAM checkpoint: load it into both SAM copies and leave CellFinder at its
        current (random) weights.

    Returns
    -------
    CellSAM
        In eval mode on ``device``; ``adv_mode`` set from the file (see the module docstring).

    Raises
    ------
    WeightsNotFoundError
        The file does not exist.
    CheckpointError
        The file is unreadable or its keys or shapes do not match; the message lists them.
    UnknownModelError
        ``model`` is a name not in the registry.
    """
    sd = read_state_dict(path_or_state_dict)
    if not sam_checkpoint:
        _reject_plain_sam(sd)
    if isinstance(model, CellSAM):
        target, what = model, "the given model"
    elif isinstance(model, str):
        target, what = build_model(model), f"model {model!r}"
    elif sam_checkpoint:
        target, what = build_from_config(_config_from_fields(_infer_sam_fields(sd, ""))), "the inferred model"
    else:
        target, what = build_from_config(infer_config(sd)), "the model inferred from its shapes"
    if sam_checkpoint:
        load_sam_weights(target, sd)
    else:
        _load_cellsam(target, sd, what)
    return target.to(torch.device(device)).eval()


def save_model(model: CellSAM, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights as an official-layout checkpoint (CPU tensors, atomically).

    With ``adv_mode`` False the ``model_cp.*`` keys (a copy of ``model.*``) are left out, so that loading
    the file gives ``adv_mode`` False again; with ``adv_mode`` True all 1,041 official keys are written.
    """
    path = Path(path)
    state = OrderedDict(
        (k, v.detach().cpu())
        for k, v in model.state_dict().items()
        if model.adv_mode or not k.startswith("model_cp.")
    )
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_bundled_model(*, device: str | torch.device = "cpu") -> CellSAM:
    """The bundled cellsam-nano model (:data:`BUNDLED_WEIGHTS`), in eval mode on ``device``.

    Raises
    ------
    WeightsNotFoundError
        The package was installed without its data files.
    """
    return load_model(BUNDLED_WEIGHTS, device=device)
