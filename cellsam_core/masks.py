"""Batched SAM mask decoding: every box of one or more model inputs through SAM's mask decoder in chunks.

The reference decodes one box per call of ``MaskDecoder(..., multimask_output=False)``. Here a chunk of
boxes, which may come from several model inputs (the frames of an encoder batch, the tiles of a frame),
goes through one call: each box gets its own input's embedding, SAM's transformer runs once for the
chunk, and only what ``multimask_output=False`` keeps (mask token 0 and its IoU) is computed after it.
Masks are upsampled, thresholded and composed into each input's label image on the model's device;
the host sees one label image per input, once, at the end.

Precision: the transformer may run under bf16 autocast (:class:`~cellsam_core.acceleration.Plan`); the
mask upscaling, the hypernetwork product that makes the logits, the IoU head, the resize to the output
and both thresholds stay in float32, so bf16 only moves a mask where its float32 logit is within
rounding of the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, Sam

from cellsam_core.acceleration import Plan
from cellsam_core.postprocess import LabelComposer

__all__ = ["decode_boxes", "predict_single_masks"]


def predict_single_masks(
    mask_decoder: MaskDecoder,
    src: torch.Tensor,
    pos: torch.Tensor,
    sparse: torch.Tensor,
    *,
    plan: Plan | None = None,
    transformer: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask prediction (``multimask_output=False``) for prompts with their own image tokens.

    The computation of ``MaskDecoder.predict_masks`` followed by taking mask 0 and IoU 0, with the image
    embedding already expanded per prompt (SAM repeats one image's embedding per prompt instead).

    Parameters
    ----------
    mask_decoder : MaskDecoder
    src : torch.Tensor
        ``(n, C, h, w)`` image embedding of each prompt's input plus the dense prompt embedding.
    pos : torch.Tensor
        ``(n, C, h, w)`` or ``(1, C, h, w)`` dense positional encoding of the same tokens.
    sparse : torch.Tensor
        ``(n, k, C)`` sparse prompt tokens (one box: ``k = 2``).
    plan : Plan, optional
        Autocast for the transformer (None: the model's dtype).
    transformer : callable, optional
        Replaces ``mask_decoder.transformer`` (e.g. its compiled form); same signature.

    Returns
    -------
    masks : torch.Tensor
        ``(n, 1, 4h, 4w)`` low-resolution mask logits, in the dtype of the mask decoder's weights.
    iou : torch.Tensor
        ``(n, 1)`` predicted IoU, same dtype.
    """
    md = mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    if pos.shape[0] != n:
        pos = pos.expand(n, -1, -1, -1)
    run = transformer if transformer is not None else md.transformer
    if plan is None:
        hs, src_out = run(src, pos, tokens)
    else:
        with plan.autocast():
            hs, src_out = run(src, pos, tokens)
    dtype = md.iou_token.weight.dtype  # back to the model's dtype for logits and IoU
    hs, src_out = hs.to(dtype), src_out.to(dtype)
    b, c, h, w = src.shape
    upscaled = md.output_upscaling(src_out.transpose(1, 2).reshape(b, c, h, w))
    hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0 only
    _, cu, hu, wu = upscaled.shape
    masks = torch.bmm(hyper[:, None, :], upscaled.reshape(b, cu, hu * wu)).reshape(b, 1, hu, wu)
    iou = md.iou_prediction_head(hs[:, 0, :])[:, 0:1]
    return masks, iou


def decode_boxes(
    sam: Sam,
    embeddings: torch.Tensor,
    boxes: Sequence[np.ndarray],
    out_sizes: Sequence[tuple[int, int]],
    *,
    chunk: int,
    iou_threshold: float,
    logit_threshold: float,
    plan: Plan | None = None,
    transformer: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    pad_chunks: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Masks of every box of every model input, composed "later box wins" into one label image per input.

    Parameters
    ----------
    sam : Sam
        The active SAM copy (prompt encoder, mask decoder, ``postprocess_masks``).
    embeddings : torch.Tensor
        ``(T, C, h, w)`` SAM image embeddings of the ``T`` model inputs, on the model's device.
    boxes : sequence of np.ndarray
        ``T`` arrays ``(n_t, 4)`` XYXY in model-input pixels, in score order.
    out_sizes : sequence of (int, int)
        ``(H, W)`` each input's masks are resized to (``Sam.postprocess_masks``).
    chunk : int
        Boxes per mask-decoder call; a chunk may span inputs.
    iou_threshold : float
        Masks with predicted IoU below this are dropped.
    logit_threshold : float
        A pixel is in a mask where its upsampled logit is above this (``logit(mask_threshold)``).
    plan : Plan, optional
        Autocast of the transformer.
    transformer : callable, optional
        Replaces ``sam.mask_decoder.transformer`` (its compiled form).
    pad_chunks : bool
        Pad the last chunk to ``chunk`` boxes (repeating its last box, outputs discarded), so that every
        call has one shape: what compiled code and CUDA graphs need.
    progress : callable, optional
        Called with the number of boxes of each chunk once it is decoded.

    Returns
    -------
    list of (np.ndarray, np.ndarray)
        Per input: int32 ``(H, W)`` labels where value ``v > 0`` is the mask of ``boxes[t][v - 1]``, and
        int64 ``arange(n_t)`` (the box index of each label value; masks whose IoU was too low, or that
        later masks covered, leave their value unused).
    """
    if len(boxes) != embeddings.shape[0] or len(out_sizes) != len(boxes):
        raise ValueError(
            f"need one box array and one output size per embedding: {embeddings.shape[0]} embeddings, "
            f"{len(boxes)} box arrays, {len(out_sizes)} sizes"
        )
    device = embeddings.device
    size = int(sam.image_encoder.img_size)
    counts = [len(b) for b in boxes]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(starts[-1])
    composers = [LabelComposer(s, device=device) for s in out_sizes]
    if total:
        # One host-to-device copy for the whole batch: per-chunk copies would wait on the GPU each time.
        all_boxes = torch.as_tensor(
            np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]), device=device
        )
        owner = torch.as_tensor(np.repeat(np.arange(len(boxes)), counts), device=device)
        dense_pe = sam.prompt_encoder.get_dense_pe().to(embeddings.dtype)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        box_t, owner_t = all_boxes[start:stop], owner[start:stop]
        if pad_chunks and stop - start < chunk:
            fill = chunk - (stop - start)
            box_t = torch.cat([box_t, box_t[-1:].expand(fill, -1)])
            owner_t = torch.cat([owner_t, owner_t[-1:].expand(fill)])
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t[:, None, :], masks=None)
        src = embeddings[owner_t] + dense.to(embeddings.dtype)
        low_res, iou = predict_single_masks(
            sam.mask_decoder,
            src,
            dense_pe,
            sparse.to(embeddings.dtype),
            plan=plan,
            transformer=transformer,
        )
        keep = iou[:, 0].float() >= iou_threshold
        # The inputs this chunk touches and each one's rows, from the host-side offsets: no device sync.
        t = int(np.searchsorted(starts, start, side="right")) - 1
        while t < len(boxes) and starts[t] < stop:
            lo, hi = max(start, int(starts[t])), min(stop, int(starts[t + 1]))
            if hi > lo:
                rows = slice(lo - start, hi - start)
                up = sam.postprocess_masks(low_res[rows].float(), (size, size), out_sizes[t])
                masks = (up[:, 0] > logit_threshold) & keep[rows, None, None]
                composers[t].add(masks, indices=np.arange(lo - starts[t], hi - starts[t]))
            t += 1
        if progress is not None:
            progress(stop - start)
    return [(c.labels(), np.arange(n, dtype=np.int64)) for c, n in zip(composers, counts, strict=True)]
