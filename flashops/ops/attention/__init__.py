"""Exact softmax attention (FlashAttention): public functions, input checks, autograd wiring.

Every entry point funnels into one pair of custom ops, ``flashops::attention_fwd`` and
``flashops::attention_bwd``, so that ``torch.compile(fullgraph=True)`` traces through without a graph break
and the backward of every variant (causal, windows, softcap, ALiBi, dropout, block-sparse, varlen, GQA,
additive masks) is the same code. The log-sum-exp output is differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import _dispatch
from ..._custom_ops import BACKEND, OpArgs, eager, register_autograd
from ..._numerics import compute_dtype
from ..._triton_utils import triton_reasons
from ..._validation import check_attention_inputs, check_cu_seqlens, check_tensor, pick_scale
from .args import AttentionArgs, AttentionBackend
from .dropout import draw_seed
from .kvcache import flash_attention_with_kvcache

OP = "attention"
MAX_HEAD_DIM = 256
_LAYOUT = "[B, T, H, D]"


# ----------------------------------------------------------------------------------------------- backends
def _torch_supports(req: _dispatch.Request) -> list:
    return []


def _triton_supports(req: _dispatch.Request) -> list:
    reasons = triton_reasons(req.device, req.dtype)
    if req.get("bias_grad"):
        reasons.append("a gradient for attn_mask is computed only by the torch backend")
    block = req.get("block_size")
    if block is not None and (block[0] % 16 or block[1] % 16):
        reasons.append(f"block-sparse block_size must be multiples of 16, got {tuple(block)}")
    return reasons


_dispatch.register(OP, _dispatch.Backend(
    "triton", _dispatch.PRIORITY_TRITON, _triton_supports, f"{__name__}.triton",
    "Triton FlashAttention-2 style kernels (forward, backward without atomics)"))
_dispatch.register(OP, _dispatch.Backend(
    "torch", _dispatch.PRIORITY_TORCH, _torch_supports, f"{__name__}.pytorch",
    "chunked online-softmax PyTorch (linear memory; CPU and fallback)"))
_dispatch.register_probe(OP, lambda device, dtype: _dispatch.Request(device, dtype, {"head_dim": 128}))


# --------------------------------------------------------------------------------------------- custom ops
# The argument lists of the two custom ops, written once: q, k, v and the fields of AttentionArgs.
_QKV = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor))
_ARGS = OpArgs.fields(AttentionArgs)
FWD_ARGS = _QKV + _ARGS + BACKEND
BWD_ARGS = (OpArgs(("dout", Tensor), ("dlse", Optional[Tensor])) + _QKV + OpArgs(("out", Tensor), ("lse", Tensor))
            + _ARGS + OpArgs(("want_dbias", bool)) + BACKEND)


def _backend(a) -> AttentionBackend:
    return _dispatch.get(OP, a.backend).load()


def _run_attention_fwd(a) -> tuple[Tensor, Tensor]:
    return _backend(a).forward(a.q, a.k, a.v, AttentionArgs(**_ARGS.pick(a)))


def _attention_fwd_fake(a) -> tuple[Tensor, Tensor]:
    q = a.q
    lse_shape = (q.shape[2], q.shape[1]) if a.cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(lse_shape, dtype=compute_dtype(q.dtype))
    return torch.empty_like(q), lse


def _run_attention_bwd(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias = _backend(a).backward(a.dout, a.dlse, a.q, a.k, a.v, a.out, a.lse,
                                             AttentionArgs(**_ARGS.pick(a)), a.want_dbias)
    # A custom op returns tensors only: an empty one stands for "no bias gradient".
    return dq, dk, dv, dbias if dbias is not None else a.q.new_empty(0)


def _attention_bwd_fake(a) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dbias = torch.empty_like(a.bias, memory_format=torch.contiguous_format) if a.want_dbias else a.q.new_empty(0)
    return torch.empty_like(a.q), torch.empty_like(a.k), torch.empty_like(a.v), dbias


_attention_fwd, _attention_fwd_impl = FWD_ARGS.custom_op(
    "flashops::attention_fwd", _run_attention_fwd, fake=_attention_fwd_fake, returns=tuple[Tensor, Tensor])
_attention_bwd, _attention_bwd_impl = BWD_ARGS.custom_op(
    "flashops::attention_bwd", _run_attention_bwd, fake=_attention_bwd_fake,
    returns=tuple[Tensor, Tensor, Tensor, Tensor])
_attention_bwd_call = eager(_attention_bwd, _attention_bwd_impl)


def _setup_context(ctx, inputs, output):
    FWD_ARGS.save(ctx, inputs, output)


def _backward(ctx, dout, dlse):
    a, (out, lse) = FWD_ARGS.saved(ctx)
    want_dbias = a.bias is not None and FWD_ARGS.needs_grad(ctx, "bias")
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias = _attention_bwd_call(*BWD_ARGS.values(
        dout=dout, dlse=dlse, out=out, lse=lse, want_dbias=want_dbias, **FWD_ARGS.pick(a)))
    return FWD_ARGS.grads(q=dq, k=dk, v=dv, bias=dbias if want_dbias else None)


_attention = register_autograd(_attention_fwd, _attention_fwd_impl, _backward, _setup_context)


# ------------------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, packed: bool):
    layout = "[1, total, H, D] (or [total, H, D])" if packed else _LAYOUT
    check_attention_inputs(q, k, v, layout=layout, max_head_dim=MAX_HEAD_DIM)


def _window(causal: bool, window_size) -> tuple[Optional[int], Optional[int]]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), got {window_size!r}")
    left, right = window_size
    left = None if left < 0 else left
    right = None if right < 0 else right
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _check_slopes(alibi_slopes, batch: int, heads: int, device):
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(
            f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on device {alibi_slopes.device} but q is on {device}")
    return alibi_slopes.contiguous()


def _check_block_mask(block_mask, block_size, batch, heads, t_q, t_k, device):
    if block_mask is None:
        return None, (128, 128)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2
            and all(isinstance(x, int) and x > 0 for x in block_size)):
        raise ValueError(f"block_size must be a pair of positive ints (block_m, block_n), got {block_size!r}")
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype not in (torch.bool, torch.int8, torch.uint8, torch.int32):
        raise TypeError(f"block_mask must be bool (or 0/1 integers), got {block_mask.dtype}")
    bm, bn = block_size
    want = (-(-t_q // bm), -(-t_k // bn))
    if (block_mask.dim() != 4 or tuple(block_mask.shape[-2:]) != want
            or block_mask.shape[0] not in (1, batch) or block_mask.shape[1] not in (1, heads)):
        raise ValueError(
            f"block_mask must have shape [{batch} or 1, {heads} or 1, {want[0]}, {want[1]}] for block_size "
            f"{tuple(block_size)}, got {tuple(block_mask.shape)}")
    if block_mask.device != device:
        raise ValueError(f"block_mask is on device {block_mask.device} but q is on {device}")
    return block_mask.to(torch.bool).contiguous(), (bm, bn)


def _scalars(softmax_scale, softcap, dropout_p, head_dim):
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 disables it), got {softcap!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(softmax_scale), float(softcap), float(dropout_p)


def _seed(dropout_p: float, device, generator) -> Optional[Tensor]:
    return draw_seed(device, generator) if dropout_p > 0.0 else None


def _run(q, k, v, *, args: AttentionArgs, deterministic, backend):
    features = {
        "head_dim": q.shape[-1],
        "varlen": args.varlen,
        "bias_grad": args.bias is not None and args.bias.requires_grad,
        "block_size": (args.block_m, args.block_n) if args.block_mask is not None else None,
        "dropout": args.dropout_p > 0,
        "deterministic": bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
    }
    chosen = _dispatch.select(OP, _dispatch.Request(q.device, q.dtype, features), backend)
    # vars() of the dataclass instance: its fields by name (cheaper than reading them one by one)
    return _attention(*FWD_ARGS.values(q=q, k=k, v=v, **vars(args), backend=chosen.name))


# ------------------------------------------------------------------------------------------ public API
def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, *, scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
    deterministic: bool = False, block_mask: Optional[Tensor] = None, block_size: Sequence[int] = (128, 128),
    generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
):
    """Exact softmax attention, IO-aware (FlashAttention-2 tiling with an online softmax).

    ``dropout_p, softmax_scale, causal`` may be passed by position, in the order of flash-attn's
    ``flash_attn_func``; every other option is keyword-only.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA).
            fp16, bf16 or fp32 (fp64 on the torch backend); D from 1 to 256 (any, powers of two are fastest);
            stride(-1) == 1.
        causal: mask keys after the query. With ``Tq != Tk`` the mask is aligned bottom-right
            (query i sees keys j <= i + Tk - Tq), as in flash-attn.
        softmax_scale: multiplies q.k; default ``1/sqrt(D)``. ``scale=`` (SDPA's name) is the same argument.
        window_size: ``(left, right)`` sliding window around the bottom-right diagonal; -1 = unlimited.
        softcap: if > 0, logits become ``softcap * tanh(logits / softcap)`` (Gemma-2 style).
        alibi_slopes: fp32 ``[H]`` or ``[B, H]``; adds ``-slope * |i + Tk - Tq - j|`` to the logits.
        dropout_p: dropout on the attention probabilities (training). The mask is a counter-based hash of
            a seed drawn from ``generator``, so the backward pass regenerates it.
        return_lse: also return the log-sum-exp ``[B, H, Tq]`` (fp32, fp64 for fp64 inputs; natural log; -inf
            for a row with no visible key). It is differentiable: a gradient on it flows into q and k.
        deterministic: request a deterministic backward. Every current backend is deterministic
            (no atomics), so this only restricts backend choice if a non-deterministic one is added.
        block_mask: optional block-sparse mask ``[B|1, H|1, ceil(Tq/bm), ceil(Tk/bn)]`` (bool, True =
            compute the block), combined with the other masks; cost scales with its density.
        block_size: ``(bm, bn)`` of ``block_mask``.
        backend: force a backend (``"triton"``, ``"torch"``); default: the first that supports the inputs.

    Returns:
        ``out`` ``[B, Tq, H, D]`` in the input dtype, or ``(out, lse)`` if ``return_lse``.
        A row that sees no key (e.g. causal with Tq > Tk) gives zeros.

    Example:
        >>> q, k, v = (torch.randn(2, 1024, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> out = flashops.flash_attention(q, k, v, causal=True)
    """
    _check_qkv(q, k, v, packed=False)
    b, t_q, h, d = q.shape
    t_k = k.shape[1]
    left, right = _window(causal, window_size)
    scale, softcap, dropout_p = _scalars(pick_scale(softmax_scale, scale), softcap, dropout_p, d)
    block_mask, (bm, bn) = _check_block_mask(block_mask, block_size, b, h, t_q, t_k, q.device)
    args = AttentionArgs(
        softmax_scale=scale, window_left=left, window_right=right, softcap=softcap, dropout_p=dropout_p,
        seed=_seed(dropout_p, q.device, generator), alibi_slopes=_check_slopes(alibi_slopes, b, h, q.device),
        block_mask=block_mask, block_m=bm, block_n=bn, max_seqlen_q=t_q, max_seqlen_k=t_k)
    out, lse = _run(q, k, v, args=args, deterministic=deterministic, backend=backend)
    return (out, lse) if return_lse else out


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, *,
                           block_size: Sequence[int] = (128, 128), **kwargs):
    """Block-sparse exact attention (FlashAttention paper, section 3.3): only the blocks where
    ``block_mask`` ``[B|1, H|1, ceil(Tq/bm), ceil(Tk/bn)]`` is True are computed. Other arguments as in
    :func:`flash_attention` (causal, windows, etc. combine with the block mask)."""
    if block_mask is None:
        raise ValueError("block_sparse_attention needs a block_mask")
    return flash_attention(q, k, v, block_mask=block_mask, block_size=block_size, **kwargs)


def _max_seqlen(name, cu, given):
    if given is None:
        if torch.compiler.is_compiling():
            raise ValueError(f"{name} must be given under torch.compile (it cannot be read from cu_seqlens)")
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if not isinstance(given, int) or given < 0:
        raise ValueError(f"{name} must be a non-negative int, got {given!r}")
    if not torch.compiler.is_compiling() and cu.numel() > 1:
        actual = int((cu[1:] - cu[:-1]).max())
        if actual > given:
            raise ValueError(f"{name}={given} is smaller than the longest sequence ({actual})")
    return given


def flash_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, *, scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
    return_lse: bool = False, deterministic: bool = False, block_mask: Optional[Tensor] = None,
    block_size: Sequence[int] = (128, 128), generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
):
    """Exact attention over packed variable-length sequences (positional arguments as flash-attn's
    ``flash_attn_varlen_func``: ``..., max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal``).

    Args:
        q: ``[1, total_q, H, D]`` or ``[total_q, H, D]`` (flash-attn layout); k, v likewise with total_k
            and Hkv heads. Sequence n holds rows ``cu_seqlens[n]:cu_seqlens[n+1]``.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 ``[N + 1]`` cumulative lengths starting at 0 (empty sequences
            are allowed).
        max_seqlen_q, max_seqlen_k: the longest sequence (computed from cu_seqlens when omitted; required
            under torch.compile).
        alibi_slopes: ``[H]`` or ``[N, H]``. block_mask: ``[N|1, H|1, ceil(max_q/bm), ceil(max_k/bn)]``,
            indexed per sequence from its first row.
        Other arguments as in :func:`flash_attention`; causal and windows apply per sequence,
        bottom-right aligned.

    Returns:
        ``out`` in the layout of q, or ``(out, lse)`` with lse fp32 ``[H, total_q]``.
    """
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _check_qkv(q, k, v, packed=True)
    if q.shape[0] != 1:
        raise ValueError(f"packed q must have batch size 1 ([1, total, H, D]), got shape {tuple(q.shape)}")
    cu_seqlens_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[1], q.device)
    cu_seqlens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[1], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    n_seq, h, d = cu_seqlens_q.numel() - 1, q.shape[2], q.shape[3]
    max_q = _max_seqlen("max_seqlen_q", cu_seqlens_q, max_seqlen_q)
    max_k = _max_seqlen("max_seqlen_k", cu_seqlens_k, max_seqlen_k)
    left, right = _window(causal, window_size)
    scale, softcap, dropout_p = _scalars(pick_scale(softmax_scale, scale), softcap, dropout_p, d)
    block_mask, (bm, bn) = _check_block_mask(block_mask, block_size, n_seq, h, max_q, max_k, q.device)
    args = AttentionArgs(
        softmax_scale=scale, window_left=left, window_right=right, softcap=softcap, dropout_p=dropout_p,
        seed=_seed(dropout_p, q.device, generator), alibi_slopes=_check_slopes(alibi_slopes, n_seq, h, q.device),
        block_mask=block_mask, block_m=bm, block_n=bn, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_q, max_seqlen_k=max_k)
    out, lse = _run(q, k, v, args=args, deterministic=deterministic, backend=backend)
    if squeeze:
        out = out.squeeze(0)
    return (out, lse) if return_lse else out


def _sdpa_bias(attn_mask: Tensor, target: tuple, dtype) -> Tensor:
    """An SDPA ``attn_mask`` (bool True = attend, or additive float) broadcastable to ``target`` =
    ``[*lead, H, L, S]`` (``[*lead, L, S]`` for 3-D inputs, which have one head) as an additive bias
    ``[B|1, H|1, L|1, S|1]`` over the flattened batch ``B = prod(lead)``. A float mask stays differentiable:
    its broadcast dimensions stay 1, so the backward sums over them."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    elif attn_mask.is_floating_point():
        bias = attn_mask
    else:
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if len(shape) > len(target) or any(n not in (1, t) for n, t in zip(reversed(shape), reversed(target))):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to {target}")
    bias = bias.reshape((1,) * (len(target) - len(shape)) + shape)
    if len(target) == 3:
        bias = bias.unsqueeze(-3)
    n_lead = bias.dim() - 3
    if any(n != 1 for n in bias.shape[:n_lead]):
        # Batch dimensions the mask varies over: broadcast to the query's, then flatten them together.
        bias = bias.expand(*target[:n_lead], *bias.shape[n_lead:])
    bias = bias.reshape(math.prod(bias.shape[:n_lead]), *bias.shape[n_lead:])
    if bias.stride(-1) != 1 and bias.shape[-1] > 1:
        bias = bias.contiguous()
    return bias


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
         softcap: float = 0.0, return_lse: bool = False, backend: Optional[str] = None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and semantics: query ``[..., Hq, L, E]``, key ``[..., H, S, E]``, value ``[..., H, S, Ev]``
    (any number of leading batch dimensions, the same for all three; 3-D inputs ``[N, L, E]`` have one head;
    ``Ev`` may differ from ``E``), a boolean ``attn_mask`` where True means "attend", or a float mask added
    to the logits, broadcastable to ``[..., Hq, L, S]`` (it may require grad, which the torch backend
    computes), ``is_causal`` aligned top-left as in PyTorch, ``enable_gqa`` for fewer key/value heads.
    One difference: a query row that sees no key returns zeros instead of NaN. Extra keyword-only
    arguments: ``softcap`` (> 0: logits become ``softcap * tanh(logits / softcap)`` before the mask is added,
    as Gemma-2 does), ``return_lse`` also returns the differentiable log-sum-exp ``[..., Hq, L]`` (fp32; fp64
    for fp64 inputs); ``backend`` forces a backend.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, layout="[..., H, L, E]")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dimensions [..., L, E], got shape {tuple(t.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError("sdpa: attn_mask must be None when is_causal=True (as in PyTorch)")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same number of dimensions, got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    lead = tuple(query.shape[:-3]) if query.dim() > 3 else tuple(query.shape[:-2])
    e, e_v = query.shape[-1], value.shape[-1]
    scale_, softcap, dropout_p = _scalars(scale, softcap, dropout_p, e)

    def heads_view(x):  # [..., H, L, E] -> [B, L, H, E] (a view)
        x = x.unsqueeze(-3) if x.dim() == 3 else x
        return x.reshape(math.prod(x.shape[:-3]), *x.shape[-3:]).transpose(1, 2)

    q, k, v = heads_view(query), heads_view(key), heads_view(value)
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise ValueError(f"query has {q.shape[2]} heads and key {k.shape[2]}: pass enable_gqa=True for GQA")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key and value must match in every dimension but the last, got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    # Value head dim != query head dim: zero-pad the narrower side (zeros change neither q.k nor p @ v).
    if e_v < e:
        v = F.pad(v, (0, e - e_v))
    elif e_v > e:
        q, k = F.pad(q, (0, e_v - e)), F.pad(k, (0, e_v - e))
    _check_qkv(q, k, v, packed=False)
    b, t_q, h, d = q.shape
    t_k = k.shape[1]
    target = (*lead, t_q, t_k) if query.dim() == 3 else (*lead, h, t_q, t_k)
    bias = None if attn_mask is None else _sdpa_bias(attn_mask, target, q.dtype)
    args = AttentionArgs(
        softmax_scale=scale_, window_right=(t_q - t_k) if is_causal else None, softcap=softcap,
        dropout_p=dropout_p, seed=_seed(dropout_p, q.device, None), bias=bias, max_seqlen_q=t_q, max_seqlen_k=t_k)
    out, lse = _run(q, k, v, args=args, deterministic=False, backend=backend)
    out = out[..., :e_v].transpose(1, 2)  # [B, H, L, Ev]
    if query.dim() == 3:
        out, lse = out.squeeze(1), lse.squeeze(1)
    else:
        out, lse = out.reshape(*lead, h, t_q, e_v), lse.reshape(*lead, h, t_q)
    return (out, lse) if return_lse else out


__all__ = ["flash_attention", "flash_attention_varlen", "block_sparse_attention", "sdpa",
           "flash_attention_with_kvcache"]
