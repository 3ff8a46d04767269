"""KV-cache attention for decoding: ``flash_attention_with_kvcache`` over contiguous or paged caches.

One custom op, ``flashops::attention_kvcache``, appends the new keys/values into the caches in place (it is
declared as mutating them) and attends; its fake kernel gives ``torch.compile(fullgraph=True)`` the output
shapes, which depend on q's shape only. Backends: Triton split-KV ("flash-decoding", ``triton_kvcache.py``)
and a chunked PyTorch path (``pytorch_kvcache.py``), both implementing ``args.KVCacheBackend``; the oracle is
``reference.attention_with_kvcache``.

Nothing here reads tensor values on a GPU: index checks that would need a host synchronization run where
they are free (CPU tensors) or when ``FLASHOPS_CHECK_INDICES=1`` asks for them, so a decode step can be
captured in a CUDA graph.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from ... import _dispatch
from ..._custom_ops import BACKEND, OpArgs, eager
from ..._triton_utils import triton_reasons
from ..._validation import FLOAT_DTYPES, check_dim, check_same, check_tensor, pick_scale
from .args import KVCacheArgs, KVCacheBackend, cache_capacity

OP = "attention_kvcache"
MAX_HEAD_DIM = 256
PAGE_MULTIPLE = 16
_LAYOUT = "[B, T, H, D]"
_CACHE_LAYOUT = "[B, Tmax, Hkv, D] (or paged [num_pages, page_size, Hkv, D])"


# ----------------------------------------------------------------------------------------------- backends
def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    return triton_reasons(req.device, req.dtype)


_dispatch.register(OP, _dispatch.Backend(
    "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__package__}.triton_kvcache",
    "split-KV decoding: GQA groups packed into one tile, splits merged by log-sum-exp; paged caches"))
_dispatch.register(OP, _dispatch.Backend(
    "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__package__}.pytorch_kvcache",
    "chunked online-softmax PyTorch over the cache (linear memory; CPU and fallback)"))
_dispatch.register_probe(OP, lambda device, dtype: _dispatch.Request(device, dtype, {"head_dim": 128}))


# --------------------------------------------------------------------------------------------- custom op
# The argument list, written once: the query, the caches (written in place), the new keys/values, the fields of
# KVCacheArgs.
_ARGS = OpArgs.fields(KVCacheArgs)
KVCACHE_ARGS = (OpArgs(("q", Tensor), ("k_cache", Tensor), ("v_cache", Tensor), ("k", Optional[Tensor]),
                       ("v", Optional[Tensor])) + _ARGS + BACKEND)


def _run_kvcache(a) -> tuple[Tensor, Tensor]:
    backend: KVCacheBackend = _dispatch.get(OP, a.backend).load()
    return backend.forward(a.q, a.k_cache, a.v_cache, a.k, a.v, KVCacheArgs(**_ARGS.pick(a)))


def _kvcache_fake(a) -> tuple[Tensor, Tensor]:
    b, t_q, h, _ = a.q.shape
    return torch.empty_like(a.q), a.q.new_empty((b, h, t_q), dtype=torch.float32)


_kvcache, _kvcache_impl = KVCACHE_ARGS.custom_op("flashops::attention_kvcache", _run_kvcache, fake=_kvcache_fake,
                                                 returns=tuple[Tensor, Tensor], mutates=("k_cache", "v_cache"))
_kvcache_call = eager(_kvcache, _kvcache_impl)


# ------------------------------------------------------------------------------------------- validation
def _inspectable(t: Tensor) -> bool:
    """Whether checking ``t``'s values is free (CPU) or asked for, and possible (not traced, not fake)."""
    if torch.compiler.is_compiling() or t.is_meta or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    return t.device.type == "cpu" or os.environ.get("FLASHOPS_CHECK_INDICES", "0") not in ("", "0")


def _check_index_tensor(name: str, t, shape: tuple, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 (or int64), got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("any" if n is None else str(n) for n in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device} but q is on {device}")
    return t.to(torch.int32).contiguous()  # the kernels index with int32 (a copy only for int64 input)


def _check_caches(q, k_cache, v_cache, k, v, block_table):
    dtypes = FLOAT_DTYPES + (torch.float64,)
    check_tensor("q", q, ndim=4, dtypes=dtypes, layout=_LAYOUT)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=dtypes, layout=_CACHE_LAYOUT)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=dtypes, layout=_CACHE_LAYOUT)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    new = (("k", k), ("v", v)) if k is not None else ()
    for name, t in new:
        check_tensor(name, t, ndim=4, dtypes=dtypes, layout="[B, Tnew, Hkv, D]")
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), *new)
    check_same(named, "device")
    check_same(named, "dtype")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, _, h, d = q.shape
    h_kv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"q and k_cache must have the same head dim, got {d} and {k_cache.shape[3]}")
    check_dim("q", d, 1, MAX_HEAD_DIM)
    if h_kv == 0 or h % h_kv:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the number of key/value heads "
                         f"in k_cache ({h_kv})")
    if k is not None:
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != b or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k must have shape [{b}, Tnew, {h_kv}, {d}] (q's batch, the cache's heads and head "
                             f"dim), got {tuple(k.shape)}")
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache must hold one sequence per batch entry of q ({b}), got shape "
                             f"{tuple(k_cache.shape)}; pass block_table for a paged cache")
        return None
    page_size = k_cache.shape[1]
    if page_size < PAGE_MULTIPLE or page_size % PAGE_MULTIPLE:
        raise ValueError(f"the page size of a paged cache (k_cache.shape[1]) must be a positive multiple of "
                         f"{PAGE_MULTIPLE}, got {page_size}")
    return _check_index_tensor("block_table", block_table, (b, None), q.device)


def _check_values(seqlens: Tensor, leftpad: Optional[Tensor], block_table: Optional[Tensor], t_new: int,
                  capacity: int, num_pages: int, page_size: int):
    """Index values (where reading them is free, see _inspectable): lengths fit the cache, pages exist."""
    if seqlens.numel() == 0 or not _inspectable(seqlens):
        return
    end = seqlens.long() + t_new
    if bool((seqlens < 0).any()) or bool((end > capacity).any()):
        raise ValueError(f"cache_seqlens + Tnew (the new tokens in k) must lie in [0, {capacity}] (the cache "
                         f"capacity), got cache_seqlens {seqlens.tolist()} with Tnew = {t_new}")
    start = torch.zeros_like(end)
    if leftpad is not None:
        if bool((leftpad < 0).any()) or bool((leftpad > end).any()):
            raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens + Tnew], got {leftpad.tolist()} "
                             f"for lengths {end.tolist()}")
        start = leftpad.long()
    if block_table is not None:
        pages = torch.arange(block_table.shape[1], device=block_table.device)
        used = (pages >= start[:, None] // page_size) & (pages < (end[:, None] + page_size - 1) // page_size)
        ids = block_table[used]
        if bool(((ids < 0) | (ids >= num_pages)).any()):
            raise ValueError(f"block_table entries of the pages in use must lie in [0, {num_pages}) (the number "
                             f"of pages in k_cache), got {sorted(set(ids.tolist()))}")


# ------------------------------------------------------------------------------------------ public API
def flash_attention_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None, *,
    cache_seqlens: Union[Tensor, int], cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
    causal: bool = True, softmax_scale: Optional[float] = None, scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0, return_lse: bool = False, backend: Optional[str] = None,
):
    """Attention of a few new queries against a KV cache (decoding), appending the new keys/values in place.

    Args:
        q: ``[B, Tq, H, D]``, the new queries (Tq = 1 for plain decoding, more for speculative decoding or
            chunked prefill). fp16, bf16 or fp32 (fp64 on the torch backend); D from 1 to 256.
        k_cache, v_cache: contiguous ``[B, Tmax, Hkv, D]``, or paged ``[num_pages, page_size, Hkv, D]`` with
            ``block_table``; ``H % Hkv == 0`` (GQA/MQA). Only stride(-1) == 1 is required (a transposed
            ``[B, Hkv, T, D]`` buffer works as is).
        k, v: optional ``[B, Tnew, Hkv, D]``: written into the caches in place at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Tnew - 1`` before attending. Nothing else in the caches
            changes. The caller advances ``cache_seqlens`` afterwards.
        cache_seqlens: int32 ``[B]`` (or one int for all): tokens already in each sequence's cache. The
            queries attend to keys ``[cache_leftpad[b], cache_seqlens[b] + Tnew)``. Index tensors may also be
            int64 (converted to int32, a copy per call).
        cache_leftpad: optional int32 ``[B]``: first valid slot of each sequence (left-padded batches); slots
            before it are never read.
        block_table: int32 ``[B, max_pages]``: position p of sequence b lives in page
            ``block_table[b, p // page_size]``, row ``p % page_size``. Pages may come in any order and may be
            shared between sequences (prefix caching); entries past a sequence's last page are never read.
            The page size must be a multiple of 16. Appended slots must not be shared.
        causal: the new queries see the cache and, bottom-right aligned, each other: query t of sequence b
            sees keys ``j <= cache_seqlens[b] + Tnew - Tq + t``.
        softmax_scale, window_size, softcap, alibi_slopes: as in :func:`flashops.flash_attention` (windows and
            ALiBi distances are measured from the same bottom-right diagonal). ``scale=`` (SDPA's name) is the
            same as ``softmax_scale=``: either, not both.
        num_splits: split each sequence's keys over this many programs (Triton backend), merged by their
            log-sum-exps; 0 chooses from the batch, heads, cache capacity and SM count (never from the values
            of ``cache_seqlens``, so a CUDA graph stays valid); 1 disables splitting.
        return_lse: also return the log-sum-exp ``[B, H, Tq]`` (fp32, natural log, -inf for a query that sees
            no key).
        backend: ``"triton"`` or ``"torch"``; default: the first that supports the inputs.

    Returns:
        ``out`` ``[B, Tq, H, D]`` in q's dtype (0 for a query that sees no key), or ``(out, lse)``.

    Inference only: raises under autograd. No host synchronization: index values are checked only where that
    is free (CPU tensors) or with ``FLASHOPS_CHECK_INDICES=1``; on a GPU, out-of-range indices are undefined
    behaviour, as in flash-attn.

    Example:
        >>> k_cache = torch.zeros(4, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
        >>> v_cache = torch.zeros_like(k_cache)
        >>> lengths = torch.zeros(4, dtype=torch.int32, device="cuda")
        >>> out = flashops.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths)
        >>> lengths += k.shape[1]
    """
    from . import _check_slopes, _scalars, _window  # the checks flash_attention uses (imported late: no cycle)

    block_table = _check_caches(q, k_cache, v_cache, k, v, block_table)
    b, t_q, h, d = q.shape
    t_new = 0 if k is None else k.shape[1]
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, Tensor)):
        raise TypeError(f"cache_seqlens must be an int32 tensor [B] or an int, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = _check_index_tensor("cache_seqlens", cache_seqlens, (b,), q.device)
    if cache_leftpad is not None:
        cache_leftpad = _check_index_tensor("cache_leftpad", cache_leftpad, (b,), q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")
    _check_values(cache_seqlens, cache_leftpad, block_table, t_new, cache_capacity(k_cache, block_table),
                  k_cache.shape[0], k_cache.shape[1])
    left, right = _window(causal, window_size)
    scale, softcap, _ = _scalars(pick_scale(softmax_scale, scale), softcap, 0.0, d)
    slopes = _check_slopes(alibi_slopes, b, h, q.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, slopes)):
        raise RuntimeError("flash_attention_with_kvcache is inference-only (no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or use flash_attention for training")
    features = {"head_dim": d, "paged": block_table is not None}
    chosen = _dispatch.select(OP, _dispatch.Request(q.device, q.dtype, features), backend)
    out, lse = _kvcache_call(*KVCACHE_ARGS.values(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
        block_table=block_table, alibi_slopes=slopes, softmax_scale=scale, window_left=left, window_right=right,
        softcap=softcap, num_splits=num_splits, backend=chosen.name))
    return (out, lse) if return_lse else out


__all__ = ["flash_attention_with_kvcache"]
