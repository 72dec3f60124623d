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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cellsam_core import masks, postprocess, preprocess, threads, tiling, windows
from cellsam_core.acceleration import Acceleration, Plan, set_attention
from cellsam_core.cells import CellTable
from cellsam_core.errors import ImageFormatError
from cellsam_core.modeling.cellfinder import postprocess_detections
from cellsam_core.modeling.cellsam import CellSAM

__all__ = [
    "DecodeOptions",
    "EncodeOptions",
    "ImageEmbedding",
    "Segmentation",
    "decode",
    "decode_batch",
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
    tile_merge: tiling.TileMerge | None = Field(
        None,
        description="How tile labels are merged: 'centre' (each cell whole from the tile whose core holds "
        "its centre), 'reference' (the reference's IoU merge at tile faces); None takes the model's "
        "default (cellsam-nano: centre, the official models: reference). See cellsam_core.tiling.",
    )
    acceleration: Acceleration = Field(
        default_factory=Acceleration,
        description="Fast paths of the two ViT encoders (bf16 autocast, SDPA attention, torch.compile); "
        "the defaults are fp32 + SDPA on a CPU and bf16 + SDPA on CUDA (cellsam_core.acceleration).",
    )


class DecodeOptions(BaseModel):
    """Thresholds and batching of the decoder; defaults are the reference's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bbox_threshold: float = Field(
        0.4, ge=0, le=1, description="Base CellFinder score threshold (dynamic threshold input)."
    )
    min_box_score: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Boxes scoring below this are dropped whatever the dynamic threshold says; None takes "
        "the model's default (cellsam-nano: a calibrated 0.45, the official models: 0, the reference's "
        "dynamic threshold alone).",
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
    acceleration: Acceleration = Field(
        default_factory=Acceleration,
        description="Fast paths of CellFinder's transformer and SAM's mask decoder (bf16 autocast of the "
        "transformers, SDPA attention, torch.compile); mask logits and thresholds stay float32 "
        "(cellsam_core.acceleration).",
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
        How the frame was tiled and how :func:`decode` merges the tiles (``plan.merge``), or None when
        the whole frame was one model input.
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


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Result of segmenting one frame.

    Attributes
    ----------
    labels : np.ndarray
        ``uint32 (H, W)``; 0 is background, cells are ``cells.label``. From one model input the ids lie in
        1..K with possible gaps: a cell whose pixels all fell into a later cell's filled hole leaves its id
        unused (as in the reference). Tiled frames are relabelled 1..N.
    cells : CellTable
        One row per label present in ``labels``, measured on ``labels`` (area, ``(y, x)`` centroid, tight
        ``(y0, x0, y1, x1)`` box), with the prompt box ``(y0, x0, y1, x1)`` in frame pixels and the
        CellFinder score of the detection that produced the cell (see :func:`decode`).
    timings : dict
        Seconds spent per step (``detect``, ``masks``, ``postprocess``).
    """

    labels: np.ndarray
    cells: CellTable
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of cells (rows of :attr:`cells`)."""
        return len(self.cells)


def _model_device_dtype(model: CellSAM) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


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
        merge=options.tile_merge or model.config.tile_merge,
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
    device, _ = _model_device_dtype(model)
    if device.type != "cpu":
        return _encode_batch(images, model, options, max_batch, device)
    # As many intra-op threads as other processes leave free (cellsam_core.threads).
    with threads.intra_op_threads(threads.spare_threads()):
        return _encode_batch(images, model, options, max_batch, device)


def _encode_batch(
    images: Sequence[np.ndarray],
    model: CellSAM,
    options: EncodeOptions,
    max_batch: int,
    device: torch.device,
) -> list[ImageEmbedding]:
    size = model.image_size
    sam = model.sam
    accel = options.acceleration.resolve(device)
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
        sam_emb, finder_emb = _run_encoders(emb_in, box_in, model, accel)
        sam_out.append(sam_emb)
        finder_out.append(finder_emb)
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


def _run_encoders(
    emb_in: torch.Tensor, box_in: torch.Tensor, model: CellSAM, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ViT passes on prepared ``(B, 3, S, S)`` inputs: SAM embedding and CellFinder memory.

    Runs as ``plan`` says (attention kernel, autocast, compiled calls); the outputs are in the model's
    dtype whatever the autocast dtype, so an :class:`ImageEmbedding` has one layout.
    """
    _, dtype = _model_device_dtype(model)
    sam_encoder = model.sam.image_encoder
    finder = model.cellfinder.decode_head
    set_attention(sam_encoder, plan.sdpa)
    set_attention(finder, plan.sdpa)
    with plan.autocast():
        sam_emb = plan.call(sam_encoder)(emb_in.to(dtype))
        finder_emb = plan.call(finder, "encode")(box_in.to(dtype))
    return sam_emb.to(dtype), finder_emb.to(dtype)


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
    finder: torch.Tensor, model: CellSAM, options: DecodeOptions, plan: Plan
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CellFinder head + dynamic threshold per model input: ``[(boxes (n,4) XYXY in S-frame, scores)]``.

    One transformer call for all inputs; the scores come to the host once for the KMeans threshold.
    """
    head = model.cellfinder.decode_head
    _, dtype = _model_device_dtype(model)
    with plan.autocast():
        logits, boxes = plan.call(head, "detect")(finder.to(dtype))
    scores, xyxy = postprocess_detections(logits.float(), boxes.float(), model.image_size)
    out = []
    floor = model.config.min_box_score if options.min_box_score is None else options.min_box_score
    for s, b in zip(scores.cpu().numpy(), xyxy.cpu().numpy(), strict=True):
        thr = postprocess.dynamic_box_threshold(s, options.bbox_threshold)
        if floor > 0:
            thr = max(thr, float(floor))
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


def _windowed_masks(
    sam_embedding: torch.Tensor,
    boxes: np.ndarray,
    out_size: tuple[int, int],
    model: CellSAM,
    window: int,
    chunk: int,
    options: DecodeOptions,
    plan: Plan,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SAM masks for the boxes of one model input, each decoded over its window of the embedding.

    Returns ``(labels int32 (h, w) with values = 1-based index into the kept boxes, kept box indices)``.
    """
    sam = model.sam
    device, dtype = _model_device_dtype(model)
    size = model.image_size
    grid = int(sam_embedding.shape[-1])
    composer = postprocess.LabelComposer(out_size, device=device)
    dense_pe = sam.prompt_encoder.get_dense_pe().to(dtype)
    emb = sam_embedding[None].to(device=device, dtype=dtype)
    logit_threshold = math.log(options.mask_threshold / (1 - options.mask_threshold))
    for start in range(0, len(boxes), chunk):
        box_np = boxes[start : start + chunk]
        box_t = torch.as_tensor(box_np, dtype=torch.float32, device=device)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t[:, None, :], masks=None)
        plan_w = windows.plan_windows(box_np, window=window, grid=grid, input_size=size)
        # Box prompts carry no mask prompt, so every row of `dense` is SAM's "no mask" embedding.
        low_res, iou = windows.decode_windows(
            sam.mask_decoder, emb, dense_pe, sparse.to(dtype), dense[:1].to(dtype), plan_w, plan=plan
        )
        keep = (iou[:, 0].float() >= options.iou_threshold).cpu().numpy()
        if progress is not None:
            progress(len(box_np))
        if not keep.any():
            continue
        region, offsets = windows.window_masks_to_frame(
            low_res[torch.as_tensor(keep, device=device)],
            windows.Windows(origins=plan_w.origins[keep], side=plan_w.side),
            grid=grid,
            low_res_size=grid * low_res.shape[-1] // plan_w.side,
            input_size=size,
            out_size=out_size,
        )
        composer.add_regions(region > logit_threshold, offsets, np.arange(start, start + len(box_t))[keep])
    return composer.labels(), composer.indices()


def _masks_for_inputs(
    sam_embeddings: torch.Tensor,
    boxes: Sequence[np.ndarray],
    out_sizes: Sequence[tuple[int, int]],
    model: CellSAM,
    options: DecodeOptions,
    plan: Plan,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """SAM masks for the boxes of each model input, composed "later box wins" into one label image each.

    Returns, per input, ``(labels int32 (h, w), kept)``: label value ``v > 0`` is the mask prompted by
    ``boxes[t][kept[v - 1]]``. Full-context decoding batches the boxes of all inputs together
    (:func:`cellsam_core.masks.decode_boxes`); windowed decoding goes input by input.
    """
    sam = model.sam
    device, dtype = _model_device_dtype(model)
    size = model.image_size
    grid = int(sam_embeddings.shape[-1])
    chunk = options.box_batch_size or default_box_batch_size(device, size)
    window = decode_window(model, options)
    set_attention(sam.mask_decoder, plan.sdpa)
    advance = None
    if progress is not None:
        total = sum(len(b) for b in boxes)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress(done[0], total)

    if window is not None and window < grid:
        return [
            _windowed_masks(sam_embeddings[t], b, out_sizes[t], model, window, chunk, options, plan, advance)
            for t, b in enumerate(boxes)
        ]
    return masks.decode_boxes(
        sam,
        sam_embeddings.to(device=device, dtype=dtype),
        boxes,
        out_sizes,
        chunk=chunk,
        iou_threshold=options.iou_threshold,
        logit_threshold=math.log(options.mask_threshold / (1 - options.mask_threshold)),
        plan=plan,
        transformer=plan.call(sam.mask_decoder.transformer) if plan.compile_mode else None,
        pad_chunks=plan.compile_mode is not None,
        progress=advance,
    )


@torch.inference_mode()
def decode(
    embedding: ImageEmbedding,
    model: CellSAM,
    options: DecodeOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Segmentation:
    """Boxes from CellFinder, masks from SAM, one label image and its cell table for the frame.

    Parameters
    ----------
    embedding : ImageEmbedding
        From :func:`encode` with the same model (weights and size).
    model : CellSAM
    options : DecodeOptions, optional
    progress : callable, optional
        ``progress(done, total)`` after each chunk of boxes of the mask step (the long part of a large
        frame): boxes decoded so far and in all.

    Returns
    -------
    Segmentation
        Labels ``uint32 (H, W)`` of the frame and the :class:`~cellsam_core.cells.CellTable` measured on
        them once. Each cell's ``prompt_box`` and ``score`` come from one detection:

        * single model input: the box that prompted the SAM mask the cell comes from, scaled from the
          ``S × S`` model input to the frame;
        * tiled frame, centre merge (``EncodeOptions.tile_merge``): the detection whose cleaned tile
          mask is the cell (each cell comes whole from one tile);
        * tiled frame, reference merge: the detection whose cleaned tile mask supplies the cell's
          highest-score pixel (pixels of the final image each come from exactly one tile's core).

        A tile's box is scaled from the model input to that tile and shifted by the tile's origin.
        Tiles wrap periodically at the frame edges, so a box of a cell at the edge may reach outside
        ``[0, H) × [0, W)``.
    """
    return decode_batch([embedding], model, options, progress=progress)[0]


@torch.inference_mode()
def decode_batch(
    embeddings: Sequence[ImageEmbedding],
    model: CellSAM,
    options: DecodeOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Segmentation]:
    """:func:`decode` of several frames at once: one detection call, mask decoding batched across frames.

    Every frame's result equals ``decode(embedding, model, options)`` up to float rounding (chunks of
    boxes then span frames). ``timings`` of each frame hold its share of the batch's ``detect`` and
    ``masks`` time (the batch's time divided by the number of frames) and its own ``postprocess`` time.
    """
    options = options or DecodeOptions()
    for embedding in embeddings:
        if embedding.input_size != model.image_size:
            raise ImageFormatError(
                f"embedding was made for a {embedding.input_size}-pixel model input but this model takes "
                f"{model.image_size}; encode and decode with the same model"
            )
    if not embeddings:
        return []
    device, _ = _model_device_dtype(model)
    if device.type != "cpu":
        return _decode_batch(embeddings, model, options, device, progress)
    # Thousands of small tensor calls with NumPy work between them: more threads pay only while other
    # processes leave the cores free (cellsam_core.threads).
    with threads.intra_op_threads(threads.spare_threads()):
        return _decode_batch(embeddings, model, options, device, progress)


def _decode_batch(
    embeddings: Sequence[ImageEmbedding],
    model: CellSAM,
    options: DecodeOptions,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> list[Segmentation]:
    plan = options.acceleration.resolve(device)
    share = 1.0 / len(embeddings)
    t0 = time.perf_counter()
    detections = _detect(torch.cat([e.finder.to(device) for e in embeddings]), model, options, plan)
    detect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    composed = _masks_for_inputs(
        torch.cat([e.sam.to(device) for e in embeddings]),
        [boxes for boxes, _ in detections],
        [size for e in embeddings for size in e.tile_sizes],
        model,
        options,
        plan,
        progress,
    )
    masks_s = time.perf_counter() - t0
    results = []
    offset = 0
    for embedding in embeddings:
        n = len(embedding.tile_sizes)
        t0 = time.perf_counter()
        tile_labels = [labels for labels, _ in composed[offset : offset + n]]
        tile_boxes = [
            detections[offset + i][0][kept] for i, (_, kept) in enumerate(composed[offset : offset + n])
        ]
        tile_scores = [
            detections[offset + i][1][kept] for i, (_, kept) in enumerate(composed[offset : offset + n])
        ]
        offset += n
        if embedding.plan is None:
            labels, cells = _cells_of_input(
                tile_labels[0],
                tile_boxes[0],
                tile_scores[0],
                input_size=embedding.input_size,
                min_size=options.min_size,
            )
        else:
            labels, cells = _cells_of_tiles(
                tile_labels,
                tile_boxes,
                tile_scores,
                plan=embedding.plan,
                tile_sizes=embedding.tile_sizes,
                input_size=embedding.input_size,
                min_size=options.min_size,
            )
        timings = {
            "detect": detect_s * share,
            "masks": masks_s * share,
            "postprocess": time.perf_counter() - t0,
        }
        if len(cells) == 0:
            log.debug("no cells detected in the image")
        results.append(Segmentation(labels=labels, cells=cells, timings=timings))
    return results


def _frame_boxes(xyxy: np.ndarray, input_size: int, size_hw: tuple[int, ...]) -> np.ndarray:
    """XYXY boxes in the ``S × S`` model input -> float64 ``(n, 4)`` ``(y0, x0, y1, x1)`` in ``(h, w)``."""
    h, w = size_hw
    scale = np.array([h, w, h, w], dtype=np.float64) / input_size
    return np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]] * scale


def _cells_of_input(
    composed: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    input_size: int,
    min_size: int,
) -> tuple[np.ndarray, CellTable]:
    """Clean up the composed masks of one whole-frame model input and tabulate its cells.

    Parameters
    ----------
    composed : np.ndarray
        int ``(H, W)``: value ``v > 0`` is the mask prompted by ``boxes[v - 1]`` (later masks won overlaps).
    boxes : np.ndarray
        float ``(K, 4)`` XYXY prompt boxes in the ``input_size × input_size`` model input.
    scores : np.ndarray
        float ``(K,)`` their CellFinder scores.
    input_size : int
        Side ``S`` of the square model input.
    min_size : int
        Objects under this many pixels are removed
        (:func:`~cellsam_core.postprocess.fill_holes_and_remove_small`).

    Returns
    -------
    labels : np.ndarray
        uint32 ``(H, W)``.
    cells : CellTable
        One row per label present in ``labels``, with its prompt box ``(y0, x0, y1, x1)`` in frame pixels
        and its score.
    """
    labels, kept = postprocess.fill_holes_and_remove_small(composed, min_size=min_size)
    table = CellTable.from_labels(labels)
    # Label k came from composed value kept[k - 1], i.e. from boxes[kept[k - 1] - 1]. A label whose
    # pixels all went to a later label's filled hole is absent, so index by the labels present.
    source = kept[table.label.astype(np.int64) - 1] - 1
    prompt = _frame_boxes(np.asarray(boxes)[source], input_size, labels.shape)
    return labels, replace(table, prompt_box=prompt, score=np.asarray(scores)[source])


def _cells_of_tiles(
    tile_labels: Sequence[np.ndarray],
    tile_boxes: Sequence[np.ndarray],
    tile_scores: Sequence[np.ndarray],
    *,
    plan: tiling.TilePlan,
    tile_sizes: Sequence[tuple[int, int]],
    input_size: int,
    min_size: int,
) -> tuple[np.ndarray, CellTable]:
    """Clean up each tile, merge the tiles as ``plan.merge`` says, and give each cell one detection.

    ``tile_labels[i]`` is tile ``i``'s composed masks (value ``v`` from ``tile_boxes[i][v - 1]``, XYXY in
    the ``input_size`` model input, scored ``tile_scores[i][v - 1]``), of shape ``tile_sizes[i]``, in
    :meth:`~cellsam_core.tiling.TilePlan.indices` order. Returns the merged uint32 ``(H, W)`` labels and
    their table (see :func:`decode` for the prompt box and score).
    """
    cleaned: list[np.ndarray] = []
    detection_luts: list[np.ndarray] = []
    frame_boxes: list[np.ndarray] = []
    offset = 0
    for index, labels_i, boxes_i, size_i in zip(
        plan.indices(), tile_labels, tile_boxes, tile_sizes, strict=True
    ):
        clean_i, kept_i = postprocess.fill_holes_and_remove_small(labels_i, min_size=min_size)
        cleaned.append(clean_i)
        # Cleaned label k of this tile came from boxes_i[kept_i[k - 1] - 1], detection offset + that.
        detection_luts.append(np.concatenate([[-1], offset + kept_i - 1]).astype(np.int64))
        y0, _, x0, _ = plan.core_bounds(index)
        origin = np.array([y0, x0, y0, x0], dtype=np.float64) - plan.overlap
        frame_boxes.append(_frame_boxes(boxes_i, input_size, size_i) + origin)
        offset += len(boxes_i)
    all_boxes = np.concatenate(frame_boxes)
    all_scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in tile_scores])
    if plan.merge == "centre":
        merged = tiling.merge_tiles_by_centre(cleaned, plan, sequential=True)
        table = CellTable.from_labels(merged.labels)
        # Each cell is one tile's cleaned label pasted whole, so its detection is that label's.
        label = table.label.astype(np.int64)
        pairs = zip(merged.source_tile[label], merged.source_label[label], strict=True)
        detection = np.array([detection_luts[t][k] for t, k in pairs], dtype=np.int64)
        return merged.labels, replace(table, prompt_box=all_boxes[detection], score=all_scores[detection])
    return _cells_by_best_pixel(cleaned, detection_luts, all_boxes, all_scores, plan)


def _cells_by_best_pixel(
    cleaned: Sequence[np.ndarray],
    detection_luts: Sequence[np.ndarray],
    all_boxes: np.ndarray,
    all_scores: np.ndarray,
    plan: tiling.TilePlan,
) -> tuple[np.ndarray, CellTable]:
    """Reference merge; a cell (maybe stitched from several tiles) takes its best-score pixel's detection."""
    from scipy import ndimage

    labels = tiling.merge_tiles(cleaned, plan, sequential=True)
    table = CellTable.from_labels(labels)
    if len(table) == 0:
        return labels, table
    score_lut = np.concatenate([[0.0], all_scores])  # detection -1 (background) scores 0
    detection_maps = [lut[clean] for lut, clean in zip(detection_luts, cleaned, strict=True)]
    score_image = tiling.merge_values([score_lut[d + 1] for d in detection_maps], plan)
    detection_image = tiling.merge_values(detection_maps, plan)
    # Every labelled pixel comes from a labelled pixel of one tile's core, so it names a detection (>= 0).
    peaks = ndimage.maximum_position(score_image, labels, index=table.label)
    detection = np.array([detection_image[pos] for pos in peaks], dtype=np.int64)
    return labels, replace(table, prompt_box=all_boxes[detection], score=all_scores[detection])


def segment(
    image: np.ndarray,
    model: CellSAM,
    *,
    encode_options: EncodeOptions | None = None,
    decode_options: DecodeOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Segmentation:
    """Segment one frame: exactly ``decode(encode(image, model), model)``.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` single channel, or ``(H, W, C)`` / ``(C, H, W)`` with ``C <= 3`` in the multiplexed
        convention (blank, nuclear, whole-cell): channels fill the last ``C`` slots.
    model : CellSAM
        From :func:`cellsam_core.build_model` or :func:`cellsam_core.load_model`.
    progress : callable, optional
        ``progress(done, total)`` in boxes of the mask step (see :func:`decode`).
    """
    return decode(encode(image, model, encode_options), model, decode_options, progress=progress)
