"""Fast paths that keep the labels: bf16 autocast, fused attention, ``torch.compile`` / CUDA graphs.

One frozen value, :class:`Acceleration`, says which fast paths a call may take; :meth:`Acceleration.resolve`
turns it into a :class:`Plan` for the model's device (``"auto"`` means: bf16 + fused attention on CUDA,
fp32 + fused attention elsewhere). Inference (:mod:`cellsam_core.inference`) asks the plan for three things:

* **precision**: ``torch.autocast`` to bfloat16 around the two ViT image encoders, CellFinder's
  transformer and the transformer of SAM's mask decoder. Mask logits, their upsampling and every
  threshold stay in float32 (bf16 logits would move mask borders; see ``tests/test_acceleration.py``).
* **attention**: segment-anything's attention modules computed by
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU, a fused
  flash kernel on a CPU: 1.3-1.9x faster ViT-B attention and 15 % faster mask decoding than the written-out
  ``softmax(q k^T) v``, ``benchmarks/bench_decode.py``). The
  image encoder's decomposed relative-position term becomes SDPA's additive float mask, computed as
  segment-anything computes it; the mask decoder's attention has no bias. The swap replaces the
  ``forward`` of each attention instance of the given module (reversible, per model, never global), so
  state dicts and weights are untouched.
* **compile**: ``torch.compile`` of the encoders and of both transformers, fixed shapes;
  ``"reduce-overhead"`` adds CUDA graphs. Compiled callables are cached per module and mode for the life
  of the process.

Nothing here changes what is computed, only how: fp32 SDPA equals the reference attention to float
rounding, and bf16 changes labels only at mask borders (tolerances in ``docs/model.md``).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from segment_anything.modeling import image_encoder as sam_image_encoder
from segment_anything.modeling import transformer as sam_transformer
from torch import nn

__all__ = [
    "Acceleration",
    "Plan",
    "attention_mode",
    "rel_pos_bias",
    "set_attention",
]

PrecisionSetting = Literal["auto", "float32", "bfloat16"]
AttentionSetting = Literal["auto", "reference", "sdpa"]
CompileSetting = Literal["off", "default", "reduce-overhead", "max-autotune"]


class Acceleration(BaseModel):
    """Which fast paths inference may take. The defaults keep fp32 on a CPU (fused attention, same labels)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: PrecisionSetting = Field(
        "auto",
        description="Autocast dtype of the ViT encoders, CellFinder's transformer and SAM's mask-decoder "
        "transformer: 'bfloat16', 'float32' (none), or 'auto' (bfloat16 on CUDA, float32 elsewhere).",
    )
    attention: AttentionSetting = Field(
        "auto",
        description="segment-anything attention through scaled_dot_product_attention ('sdpa'), or as "
        "written ('reference'); 'auto': sdpa (fp32 SDPA equals the written-out attention to float "
        "rounding and is faster on CPUs too).",
    )
    compile: CompileSetting = Field(
        "off",
        description="torch.compile mode of the encoders and transformers ('reduce-overhead' adds CUDA "
        "graphs); 'off' runs eager. Each new batch shape compiles once (tens of seconds per module).",
    )

    def resolve(self, device: torch.device | str) -> Plan:
        """The concrete plan for ``device``: ``"auto"`` is bf16 on CUDA only, fused attention everywhere."""
        device = torch.device(device)
        on_cuda = device.type == "cuda"
        precision = self.precision if self.precision != "auto" else ("bfloat16" if on_cuda else "float32")
        attention = self.attention if self.attention != "auto" else "sdpa"
        return Plan(
            device=device,
            autocast_dtype=torch.bfloat16 if precision == "bfloat16" else None,
            sdpa=attention == "sdpa",
            compile_mode=None if self.compile == "off" else self.compile,
        )


@dataclass(frozen=True)
class Plan:
    """An :class:`Acceleration` resolved for one device.

    Attributes
    ----------
    device : torch.device
    autocast_dtype : torch.dtype or None
        Lower-precision dtype for ``torch.autocast``; None runs in the model's own dtype.
    sdpa : bool
        Whether segment-anything's attention runs through SDPA.
    compile_mode : str or None
        ``torch.compile`` mode, or None (eager).
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    sdpa: bool
    compile_mode: str | None

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs (their outputs are overwritten by the next replay)."""
        return self.compile_mode == "reduce-overhead"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` to :attr:`autocast_dtype` on this device, or nothing."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            yield

    def call(self, module: nn.Module, method: str = "forward") -> Callable[..., Any]:
        """``module.<method>``, compiled with :attr:`compile_mode` when one is set (cached per module)."""
        if self.compile_mode is None:
            return getattr(module, method)
        fn = _compiled(module, method, self.compile_mode)
        if not self.cuda_graphs:
            return fn

        def replay(*args: Any, **kwargs: Any) -> Any:
            # A new graph step per call; outputs are cloned because the next replay reuses their memory.
            torch.compiler.cudagraph_mark_step_begin()
            return _clone_tensors(fn(*args, **kwargs))

        return replay


# Compiled callables, per module and (method, mode). The compiled function keeps its module alive, so an
# entry lives as long as the process: compile the models a process serves, not throwaway ones.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def _compiled(module: nn.Module, method: str, mode: str) -> Callable[..., Any]:
    cache = _COMPILED.setdefault(module, {})
    key = (method, mode)
    if key not in cache:
        cache[key] = torch.compile(getattr(module, method), mode=mode, dynamic=False)
    return cache[key]


def _clone_tensors(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_tensors(o) for o in out)
    return out


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """segment-anything's decomposed relative-position term as an additive attention mask.

    segment-anything adds ``q · R_h[i_h - j_h]`` and ``q · R_w[i_w - j_w]`` (unscaled query, embeddings
    looked up by ``get_rel_pos``) to the scaled logits ``(q / √d) · k`` of query token ``i = (i_h, i_w)``
    and key token ``j = (j_h, j_w)``. Returned as one tensor, that term is SDPA's float ``attn_mask``.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, heads, h * w, d)`` queries (before scaling).
    rel_pos_h, rel_pos_w : torch.Tensor
        ``(2h - 1, d)`` and ``(2w - 1, d)`` relative-position embeddings of the attention module.
    size : (int, int)
        ``(h, w)`` of the token grid (a window, or the whole grid for global attention).

    Returns
    -------
    torch.Tensor
        ``(B, heads, h * w, h * w)`` in ``q``'s dtype. Its last dimension is padded in memory to a
        multiple of 16 elements (the returned tensor is a view), which the fused GPU kernels need.
    """
    h, w = size
    bsz, heads, n, d = q.shape
    r_h = sam_image_encoder.get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (h, h, d)
    r_w = sam_image_encoder.get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # (w, w, d)
    r_q = q.reshape(bsz, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)  # (B, heads, h, w, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)  # (B, heads, h, w, w)
    padded = -(-n // 16) * 16
    out = torch.empty(bsz, heads, n, padded, dtype=q.dtype, device=q.device)[..., :n]
    torch.add(rel_h[..., :, None], rel_w[..., None, :], out=out.view(bsz, heads, h, w, h, w))
    return out


def _vit_attention_sdpa(self: sam_image_encoder.Attention, x: torch.Tensor) -> torch.Tensor:
    """``segment_anything...image_encoder.Attention.forward`` through SDPA (same inputs and outputs)."""
    bsz, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(bsz, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, d)
    mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # default scale = d ** -0.5
    return self.proj(out.transpose(1, 2).reshape(bsz, h, w, -1))


def _decoder_attention_sdpa(
    self: sam_transformer.Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``segment_anything...transformer.Attention.forward`` (mask decoder) through SDPA."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    out = F.scaled_dot_product_attention(q, k, v)  # segment-anything scales by 1 / sqrt(d) too
    return self.out_proj(self._recombine_heads(out))


_SDPA_FORWARDS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    sam_image_encoder.Attention: _vit_attention_sdpa,
    sam_transformer.Attention: _decoder_attention_sdpa,
}


def set_attention(module: nn.Module, sdpa: bool) -> int:
    """Route every segment-anything attention inside ``module`` through SDPA, or back to its own code.

    Only the ``forward`` of those instances changes (an instance attribute, removed again by
    ``sdpa=False``); parameters, buffers and ``state_dict`` keys stay as they are. Idempotent.

    Returns
    -------
    int
        The number of attention modules found.
    """
    count = 0
    for sub in module.modules():
        fast = _SDPA_FORWARDS.get(type(sub))
        if fast is None:
            continue
        count += 1
        if sdpa:
            current = sub.__dict__.get("forward")
            if getattr(current, "__func__", None) is not fast:
                sub.forward = types.MethodType(fast, sub)
        else:
            sub.__dict__.pop("forward", None)
    return count


def attention_mode(module: nn.Module) -> Literal["sdpa", "reference", "mixed", "none"]:
    """How the segment-anything attention modules inside ``module`` currently run."""
    modes = {"forward" in sub.__dict__ for sub in module.modules() if type(sub) in _SDPA_FORWARDS}
    if not modes:
        return "none"
    if len(modes) > 1:
        return "mixed"
    return "sdpa" if modes.pop() else "reference"
