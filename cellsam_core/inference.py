"""CellSAM inference split in two halves: :func:`encode` (the two ViT passes) and :func:`decode`.

``segment(image, model) == decode(encode(image, model), model)`` holds by construction: ``segment`` is
exactly that composition. The split is what the service distributes: the encoder deployment runs
:func:`encode_batch` on a GPU, the :class:`ImageEmbedding` travels through Ray's object store, and the
decoder deployment runs :func:`decode`.

The semantics follow the reference implementation step by step (``docs/model.md``); where we are faster
(batched decoding, batched encoding of many frames or tiles) the labels are the same up to float noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cellsam_core import postprocess, preprocess, tiling, windows
from cellsam_core.errors import ImageFormatError
from cellsam_core.modeling.cellfinder import postprocess_detections
from cellsam_core.modeling.cellsam import CellSAM

__all__ = [
    "DecodeOptions",
    "EncodeOptions",
    "ImageEmbedding",
    "Segmentation",
    "decode",
    "decode_window",
    "encode",
    "encode_batch",
    "segment",
]

log = logging.getLogger(__name__)


class EncodeOptions(BaseModel):
    """How an image is prepared and encoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    normalize: bool = Field(
        True, description="Percentile clipping + CLAHE per channel (the reference's default)."
    )
    tile: bool | None = Field(
        None,
        description="Whole-slide tiling: True always, False never, None when the longer side exceeds "
        "`tile_threshold` times the model input size.",
    )
    tile_threshold: float = Field(
        2.0, gt=0, description="Auto-tiling starts above this multiple of the model input size."
    )
    block_size: int = Field(400, gt=0, description="Tile block size in pixels (reference: 400).")
    overlap: int = Field(56, ge=0, description="Tile overlap in pixels on each side (reference: 56).")
    iou_depth: int = Field(56, ge=0, description="Seam strip half-width used to merge tiles (56).")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="IoU above which seam labels merge.")


class DecodeOptions(BaseModel):
    """Thresholds and batching of the decoder; defaults are the reference's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bbox_threshold: float = Field(
        0.4, ge=0, le=1, description="Base CellFinder score threshold (dynamic threshold input)."
    )
    iou_threshold: float = Field(
        0.5, ge=0, le=1, description="Masks whose predicted IoU is below this are dropped."
    )
    mask_threshold: float = Field(
        0.4, gt=0, lt=1, description="A pixel belongs to a mask where sigmoid(logit) > this."
    )
    min_size: int = Field(25, ge=0, description="Objects smaller than this many pixels are removed.")
    box_batch_size: int | None = Field(
        None,
        ge=1,
        description="Boxes decoded per SAM mask-decoder call; None picks a device default "
        "(see BENCHMARKS.md: small chunks on CPU, large on GPU).",
    )
    window: Annotated[int, Field(ge=1)] | Literal["full"] | None = Field(
        None,
        description="Side, in embedding tokens, of the window each box's mask is decoded over "
        "(cellsam_core.windows); 'full' decodes over the whole embedding as the reference does; None "
        "takes the model's default (cellsam-nano: 32, the official models: full).",
    )


@dataclass(frozen=True)
class ImageEmbedding:
    """Everything :func:`decode` needs about one frame, as plain tensors.

    Attributes
    ----------
    sam : torch.Tensor
        ``(T, C, h, w)`` SAM image embedding of each of the ``T`` model inputs (``T == 1`` unless the
        frame is tiled). ``C = 256, h = w = 64`` for ``cellsam_vit_b`` (4 MiB per tile in float32).
    finder : torch.Tensor
        ``(T, D, h, w)`` CellFinder memory (its ViT backbone + input projection), ``D = 256``.
    tile_sizes : tuple of (int, int)
        ``(height, width)`` of each model input before it was resized to the square model input.
    frame_size : (int, int)
        ``(H, W)`` of the whole frame.
    input_size : int
        Side of the square model input (1024 for ``cellsam_vit_b``).
    plan : TilePlan or None
        How the frame was tiled, or None when the whole frame was one model input.
    """

    sam: torch.Tensor
    finder: torch.Tensor
    tile_sizes: tuple[tuple[int, int], ...]
    frame_size: tuple[int, int]
    input_size: int
    plan: tiling.TilePlan | None = None

    @property
    def nbytes(self) -> int:
        """Size of the tensors in bytes (what crosses between deployments)."""
        return sum(t.element_size() * t.nelement() for t in (self.sam, self.finder))

    def to(self, device: torch.device | str) -> ImageEmbedding:
        """A copy with the tensors on ``device`` (e.g. ``"cpu"`` before crossing to another process)."""
        return ImageEmbedding(
            sam=self.sam.to(device),
            finder=self.finder.to(device),
            tile_sizes=self.tile_sizes,
            frame_size=self.frame_size,
            input_size=self.input_size,
            plan=self.plan,
        )


@dataclass(frozen=True)
class Segmentation:
    """Result of segmenting one frame.

    Attributes
    ----------
    labels : np.ndarray
        ``uint32 (H, W)``; 0 is background, cells are 1..N.
    boxes : np.ndarray
        ``float32 (N, 4)`` XYXY in input pixels of the box that prompted each cell (row ``i`` is label
        ``i + 1``); for tiled frames the tight bounding box of the merged mask.
    scores : np.ndarray
        ``float32 (N,)`` CellFinder confidence of each cell's box.
    areas : np.ndarray
        ``int64 (N,)`` pixel count of each label.
    centroids : np.ndarray
        ``float64 (N, 2)`` centroid of each label as ``(y, x)`` in input pixels.
    timings : dict
        Seconds spent per step (``detect``, ``masks``, ``postprocess``).
    """

    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.areas.shape[0])


def _model_device_dtype(model: CellSAM) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _prepare(image: np.ndarray, options: EncodeOptions) -> np.ndarray:
    """Channel formatting and (optionally) normalisation: ``float64 (H, W, 3)``."""
    formatted = preprocess.format_image_shape(np.asarray(image))
    return preprocess.normalize_image(formatted) if options.normalize else formatted


def _should_tile(shape: tuple[int, int], size: int, options: EncodeOptions) -> bool:
    if options.tile is not None:
        return options.tile
    return max(shape) > options.tile_threshold * size


def _model_inputs(
    image: np.ndarray, model: CellSAM, options: EncodeOptions
) -> tuple[list[np.ndarray], tiling.TilePlan | None, tuple[int, int]]:
    """Split a frame into the ``(h, w, 3)`` arrays the model sees (one, or one per tile)."""
    arr = np.asarray(image)
    formatted = preprocess.format_image_shape(arr)
    frame_size = (int(formatted.shape[0]), int(formatted.shape[1]))
    if not _should_tile(frame_size, model.image_size, options):
        prepared = preprocess.normalize_image(formatted) if options.normalize else formatted
        return [prepared], None, frame_size
    plan = tiling.plan_tiles(
        frame_size,
        block_size=options.block_size,
        overlap=options.overlap,
        iou_depth=options.iou_depth,
        iou_threshold=options.iou_threshold,
    )
    # Whole-frame min-max per channel first (the reference pipeline does this before tiling), then the
    # per-tile percentile + CLAHE normalisation of the single-image path.
    scaled = preprocess.minmax_channels(formatted)
    tiles = tiling.extract_tiles(scaled, plan)
    if options.normalize:
        tiles = [preprocess.normalize_image(t) for t in tiles]
    return tiles, plan, frame_size


@torch.inference_mode()
def encode_batch(
    images: Sequence[np.ndarray],
    model: CellSAM,
    options: EncodeOptions | None = None,
    *,
    max_batch: int = 8,
) -> list[ImageEmbedding]:
    """Encode several frames, running the ViT passes over all their model inputs in batches.

    Parameters
    ----------
    images : sequence of np.ndarray
        Frames ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C <= 3``, any numeric dtype.
    model : CellSAM
        The model (its device and dtype decide where and how the encoders run).
    options : EncodeOptions, optional
    max_batch : int
        Largest number of model inputs per ViT call (bounds peak memory).

    Returns
    -------
    list of ImageEmbedding
        One per frame, in order, on the model's device.
    """
    options = options or EncodeOptions()
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    device, dtype = _model_device_dtype(model)
    size = model.image_size
    sam = model.sam
    per_frame: list[tuple[int, tiling.TilePlan | None, tuple[int, int], list[tuple[int, int]]]] = []
    resized: list[torch.Tensor] = []
    for image in images:
        inputs, plan, frame_size = _model_inputs(image, model, options)
        per_frame.append((len(inputs), plan, frame_size, [(t.shape[0], t.shape[1]) for t in inputs]))
        for arr in inputs:
            resized.append(preprocess.resize_square(preprocess.to_tensor(arr), size))
    sam_out: list[torch.Tensor] = []
    finder_out: list[torch.Tensor] = []
    for start in range(0, len(resized), max_batch):
        x = torch.cat(resized[start : start + max_batch]).to(device)
        emb_in = preprocess.embedding_input(
            x, adv_mode=model.adv_mode, pixel_mean=sam.pixel_mean, pixel_std=sam.pixel_std
        )
        box_in = preprocess.finder_input(
            x, adv_mode=model.adv_mode, pixel_mean=sam.pixel_mean, pixel_std=sam.pixel_std
        )
        sam_out.append(sam.image_encoder(emb_in.to(dtype)))
        finder_out.append(model.cellfinder.decode_head.encode(box_in.to(dtype)))
    sam_all = torch.cat(sam_out) if sam_out else torch.empty(0)
    finder_all = torch.cat(finder_out) if finder_out else torch.empty(0)
    result = []
    offset = 0
    for n, plan, frame_size, sizes in per_frame:
        result.append(
            ImageEmbedding(
                sam=sam_all[offset : offset + n],
                finder=finder_all[offset : offset + n],
                tile_sizes=tuple(sizes),
                frame_size=frame_size,
                input_size=size,
                plan=plan,
            )
        )
        offset += n
    return result


def encode(image: np.ndarray, model: CellSAM, options: EncodeOptions | None = None) -> ImageEmbedding:
    """Encode one frame: both ViT passes (SAM and CellFinder backbone). See :func:`encode_batch`."""
    return encode_batch([image], model, options)[0]


def default_box_batch_size(device: torch.device, image_size: int) -> int:
    """Boxes per mask-decoder call when the caller does not choose (see BENCHMARKS.md).

    SAM repeats the image embedding once per box and each mask is upsampled to the full model input, so a
    chunk costs memory traffic proportional to ``chunk × image_size²``. GPUs absorb that and gain from
    large chunks; on a CPU chunks of 8 win at the tiny model's 256-pixel input, while at 1024 pixels
    (``cellsam_vit_b``) one box at a time is fastest.
    """
    if device.type == "cuda":
        return 64
    return 8 if image_size <= 512 else 1


def _detect(
    finder: torch.Tensor, model: CellSAM, options: DecodeOptions
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CellFinder head + dynamic threshold per model input: ``[(boxes (n,4) XYXY in S-frame, scores)]``."""
    logits, boxes = model.cellfinder.decode_head.detect(finder)
    scores, xyxy = postprocess_detections(logits.float(), boxes.float(), model.image_size)
    out = []
    for s, b in zip(scores.cpu().numpy(), xyxy.cpu().numpy(), strict=True):
        thr = postprocess.dynamic_box_threshold(s, options.bbox_threshold)
        kept_scores, kept_boxes = postprocess.select_boxes(s, b, thr)
        out.append((kept_boxes, kept_scores))
    return out


def decode_window(model: CellSAM, options: DecodeOptions) -> int | None:
    """Window side in tokens that :func:`decode` uses with ``model`` (None: the whole embedding)."""
    if options.window == "full":
        return None
    if options.window is not None:
        return options.window
    return getattr(model.config, "decode_window", None)


def _masks_for_input(
    sam_embedding: torch.Tensor,
    boxes: np.ndarray,
    out_size: tuple[int, int],
    model: CellSAM,
    options: DecodeOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """SAM masks for the boxes of one model input, composed "later box wins" into one label image.

    Returns ``(labels int64 (h, w) with values = 1-based index into the kept boxes, kept box indices)``.
    """
    sam = model.sam
    device, dtype = _model_device_dtype(model)
    size = model.image_size
    grid = int(sam_embedding.shape[-1])
    window = decode_window(model, options)
    composer = postprocess.LabelComposer(out_size)
    chunk = options.box_batch_size or default_box_batch_size(device, size)
    dense_pe = sam.prompt_encoder.get_dense_pe().to(dtype)
    emb = sam_embedding[None].to(device=device, dtype=dtype)
    logit_threshold = math.log(options.mask_threshold / (1 - options.mask_threshold))
    for start in range(0, len(boxes), chunk):
        box_np = boxes[start : start + chunk]
        box_t = torch.as_tensor(box_np, dtype=torch.float32, device=device)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t[:, None, :], masks=None)
        plan = None
        if window is not None:
            plan = windows.plan_windows(box_np, window=window, grid=grid, input_size=size)
            if plan.side >= grid:  # a window as large as the grid is the full-context computation
                plan = None
        if plan is None:
            low_res, iou = sam.mask_decoder(
                image_embeddings=emb,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=False,
            )
        else:
            # Box prompts carry no mask prompt, so every row of `dense` is SAM's "no mask" embedding.
            low_res, iou = windows.decode_windows(
                sam.mask_decoder, emb, dense_pe, sparse.to(dtype), dense[:1].to(dtype), plan
            )
        keep = (iou[:, 0].float() >= options.iou_threshold).cpu().numpy()
        index = np.arange(start, start + len(box_t))
        if not keep.any():
            continue
        kept = low_res[torch.as_tensor(keep, device=device)]
        # sigmoid(x) > t  <=>  x > logit(t); the comparison on logits avoids a full-frame sigmoid.
        if plan is None:
            up = sam.postprocess_masks(kept.float(), (size, size), out_size)
            composer.add(up[:, 0] > logit_threshold, index[keep])
        else:
            region, offsets = windows.window_masks_to_frame(
                kept,
                windows.Windows(origins=plan.origins[keep], side=plan.side),
                grid=grid,
                low_res_size=grid * low_res.shape[-1] // plan.side,
                input_size=size,
                out_size=out_size,
            )
            composer.add_regions(region > logit_threshold, offsets, index[keep])
    return composer.labels(), composer.indices()


@torch.inference_mode()
def decode(embedding: ImageEmbedding, model: CellSAM, options: DecodeOptions | None = None) -> Segmentation:
    """Boxes from CellFinder, masks from SAM, one label image for the frame.

    Parameters
    ----------
    embedding : ImageEmbedding
        From :func:`encode` with the same model (weights and size).
    model : CellSAM
    options : DecodeOptions, optional

    Returns
    -------
    Segmentation
        Labels ``uint32 (H, W)`` of the frame and the per-cell table.
    """
    options = options or DecodeOptions()
    if embedding.input_size != model.image_size:
        raise ImageFormatError(
            f"embedding was made for a {embedding.input_size}-pixel model input but this model takes "
            f"{model.image_size}; encode and decode with the same model"
        )
    device, _ = _model_device_dtype(model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    detections = _detect(embedding.finder.to(device), model, options)
    timings["detect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tile_labels: list[np.ndarray] = []
    tile_boxes: list[np.ndarray] = []
    tile_scores: list[np.ndarray] = []
    for i, (boxes, scores) in enumerate(detections):
        labels, kept = _masks_for_input(embedding.sam[i], boxes, embedding.tile_sizes[i], model, options)
        tile_labels.append(labels)
        tile_boxes.append(boxes[kept])
        tile_scores.append(scores[kept])
    timings["masks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if embedding.plan is None:
        labels, kept = postprocess.fill_holes_and_remove_small(tile_labels[0], min_size=options.min_size)
        table = postprocess.cell_table(labels)
        h, w = embedding.frame_size
        size = embedding.input_size
        scale = np.array([w / size, h / size, w / size, h / size], dtype=np.float64)
        boxes_out = (tile_boxes[0][kept - 1] * scale).astype(np.float32)
        scores_out = tile_scores[0][kept - 1].astype(np.float32)
    else:
        cleaned = []
        score_maps = []
        for labels_i, scores_i in zip(tile_labels, tile_scores, strict=True):
            clean_i, kept_i = postprocess.fill_holes_and_remove_small(labels_i, min_size=options.min_size)
            cleaned.append(clean_i)
            lut = np.concatenate([[0.0], scores_i[kept_i - 1]]).astype(np.float32)
            score_maps.append(lut[clean_i])
        labels = tiling.merge_tiles(cleaned, embedding.plan, sequential=True)
        score_image = tiling.merge_values(score_maps, embedding.plan)
        table = postprocess.cell_table(labels)
        boxes_out = table.bboxes.astype(np.float32)
        n = int(labels.max()) if labels.size else 0
        scores_out = _max_per_label(score_image, labels, n)
    timings["postprocess"] = time.perf_counter() - t0
    if table.areas.shape[0] == 0:
        log.debug("no cells detected in the image")
    return Segmentation(
        labels=labels.astype(np.uint32, copy=False),
        boxes=boxes_out.reshape(-1, 4),
        scores=scores_out.reshape(-1),
        areas=table.areas,
        centroids=table.centroids,
        timings=timings,
    )


def _max_per_label(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    from scipy import ndimage

    return np.asarray(ndimage.maximum(values, labels, index=np.arange(1, n + 1)), dtype=np.float32)


def segment(
    image: np.ndarray,
    model: CellSAM,
    *,
    encode_options: EncodeOptions | None = None,
    decode_options: DecodeOptions | None = None,
) -> Segmentation:
    """Segment one frame: exactly ``decode(encode(image, model), model)``.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` single channel, or ``(H, W, C)`` / ``(C, H, W)`` with ``C <= 3`` in the multiplexed
        convention (blank, nuclear, whole-cell): channels fill the last ``C`` slots.
    model : CellSAM
        From :func:`cellsam_core.build_model` or :func:`cellsam_core.load_model`.
    """
    return decode(encode(image, model, encode_options), model, decode_options)
