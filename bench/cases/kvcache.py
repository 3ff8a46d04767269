"""KV-cache decoding: flashops.flash_attention_with_kvcache vs torch SDPA, flash-attn and FlashInfer.

One new query per sequence (Tq = 1) against a cache of T keys per sequence, every sequence full, nothing appended
(a timed call must not change its inputs). GQA 8:1 (H = 32, Hkv = 4), D = 128; ``page`` = 0 is a contiguous
``[B, T, Hkv, D]`` cache, else a paged one (each sequence's pages in shuffled order inside its own range).
Sweeps (fwd only, inference):
  GPU full:  bf16, contiguous at B in {1, 4, 16, 64} x T in {1k, 4k, 16k, 64k, 128k}; paged with pages of 16 and
             256 keys at B in {1, 16, 64} x T in {16k, 128k}.
  GPU quick: bf16, contiguous at B in {1, 16} x T in {4k, 32k}; paged (16) at B = 16, T = 32k.
  CPU quick: fp32, H = 8, Hkv = 1, D = 64, B in {1, 4}, T = 512, contiguous and paged (16).
  CPU full:  fp32, H = 8, Hkv = 1, D = 64, B in {1, 8} x T in {1k, 4k, 16k}, contiguous and paged (16).
Bytes (the figure of merit, GB/s): the K and V every provider must read plus q and out,
``(2*B*T*Hkv + 2*B*H)*D*e``. FLOPs: ``4*B*H*T*D``.
The check runs on the last sequence (its pages only, for paged caches): every sequence is computed the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import flashops
from flashops.ops.attention import reference as attention_reference

from ..registry import Op, Provider, Unsupported, case, flashops_providers, module_missing

OP = "flash_attention_with_kvcache"
GPU_HEADS, GPU_KV_HEADS, GPU_DIM = 32, 4, 128
CPU_HEADS, CPU_KV_HEADS, CPU_DIM = 8, 1, 64


# ------------------------------------------------------------------------------------------------- cases
def _cases(dtype, heads, kv_heads, dim, points) -> list:
    return [case(OP, dtype, ("fwd",), B=b, T=t, H=heads, Hkv=kv_heads, D=dim, page=page) for b, t, page in points]


def cases(sweep: str, device: torch.device) -> list:
    if device.type == "cuda":
        if sweep == "quick":
            points = [(b, t, 0) for b in (1, 16) for t in (4096, 32768)] + [(16, 32768, 16)]
        else:
            points = [(b, t, 0) for b in (1, 4, 16, 64) for t in (1024, 4096, 16384, 65536, 131072)]
            points += [(b, t, page) for page in (16, 256) for b in (1, 16, 64) for t in (16384, 131072)]
        return _cases(torch.bfloat16, GPU_HEADS, GPU_KV_HEADS, GPU_DIM, points)
    if sweep == "quick":
        points = [(b, 512, page) for page in (0, 16) for b in (1, 4)]
    else:
        points = [(b, t, page) for page in (0, 16) for b in (1, 8) for t in (1024, 4096, 16384)]
    return _cases(torch.float32, CPU_HEADS, CPU_KV_HEADS, CPU_DIM, points)


def _pages_per_sequence(c) -> int:
    return c["T"] // c["page"]


def make_inputs(c, device, generator) -> dict:
    b, t, h, h_kv, d = c["B"], c["T"], c["H"], c["Hkv"], c["D"]
    draw = lambda *shape: torch.randn(shape, generator=generator, device=device).to(c.dtype)  # noqa: E731
    inputs = {"q": draw(b, 1, h, d), "cache_seqlens": torch.full((b,), t, dtype=torch.int32, device=device)}
    if not c["page"]:
        return {**inputs, "k_cache": draw(b, t, h_kv, d), "v_cache": draw(b, t, h_kv, d)}
    per_seq = _pages_per_sequence(c)
    order = torch.stack([torch.randperm(per_seq, generator=generator, device=device) for _ in range(b)])
    table = (order + per_seq * torch.arange(b, device=device)[:, None]).to(torch.int32)
    pages = (b * per_seq, c["page"], h_kv, d)
    return {**inputs, "k_pages": draw(*pages), "v_pages": draw(*pages), "block_table": table}


def _contiguous(inputs, c):
    """k and v ``[B, T, Hkv, D]`` (paged caches gathered through the block table)."""
    if not c["page"]:
        return inputs["k_cache"], inputs["v_cache"]
    table = inputs["block_table"].long()
    return tuple(inputs[name][table].flatten(1, 2) for name in ("k_pages", "v_pages"))


def reference(inputs, c, upcast):
    k, v = _contiguous(inputs, c)
    out, _ = attention_reference.attention(inputs["q"], k, v, causal=True, upcast=upcast)
    return out


def check_slice(c, device):
    """The last sequence: its query, cache (or pages, renumbered) and output."""
    per_seq = _pages_per_sequence(c) if c["page"] else 0

    def narrow(name, x):
        if name in ("k_pages", "v_pages"):
            return x[-per_seq:]
        if name == "block_table":
            return x[-1:] - per_seq * (c["B"] - 1)
        return x[-1:]

    return narrow, "checked on the last sequence"


def flops(c, mode) -> float:
    return 4.0 * c["B"] * c["H"] * c["T"] * c["D"]


def bytes_moved(c, mode) -> float:
    element = torch.empty((), dtype=c.dtype).element_size()
    return (2 * c["B"] * c["T"] * c["Hkv"] + 2 * c["B"] * c["H"]) * c["D"] * element


# --------------------------------------------------------------------------------------------- providers
def _flashops(inputs, c, backend):
    if c["page"]:
        return flashops.flash_attention_with_kvcache(inputs["q"], inputs["k_pages"], inputs["v_pages"],
                                                     cache_seqlens=inputs["cache_seqlens"],
                                                     block_table=inputs["block_table"], backend=backend)
    return flashops.flash_attention_with_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"],
                                                 cache_seqlens=inputs["cache_seqlens"], backend=backend)


def _contiguous_only(what):
    def supports(c, mode, device):
        return f"{what} reads contiguous caches only" if c["page"] else None
    return supports


def _sdpa(inputs, c):
    q, k, v = inputs["q"], inputs["k_cache"], inputs["v_cache"]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)


def _gpu_half(library, page_multiple=None):
    def supports(c, mode, device):
        if device.type != "cuda":
            return f"{library} runs on CUDA only"
        if c.dtype not in (torch.float16, torch.bfloat16):
            return f"{library} needs fp16 or bf16, not {c.dtype_name}"
        if page_multiple and c["page"] % page_multiple:
            return f"{library} needs pages of a multiple of {page_multiple} keys, not {c['page']}"
        return None
    return supports


def _flash_attn(inputs, c):
    from flash_attn import flash_attn_with_kvcache

    if c["page"]:
        return flash_attn_with_kvcache(inputs["q"], inputs["k_pages"], inputs["v_pages"],
                                       cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
                                       causal=True)
    return flash_attn_with_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"],
                                   cache_seqlens=inputs["cache_seqlens"], causal=True)


_FLASHINFER_PLANS: dict = {}


def _flashinfer(inputs, c):
    """FlashInfer's batch decode over paged NHD caches; a contiguous cache is one page per sequence. The plan
    (host-side scheduling) is made once per case, outside the timed calls, as a server would."""
    import flashinfer

    b, t = c["B"], c["T"]
    device = inputs["q"].device
    key = (c.params, c.dtype, str(device))
    if key not in _FLASHINFER_PLANS:
        _FLASHINFER_PLANS.clear()  # one case at a time: do not keep workspaces of earlier cases alive
        page = c["page"] or t
        per_seq = t // page
        indices = (inputs["block_table"].flatten() if c["page"] else
                   torch.arange(b, dtype=torch.int32, device=device))
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(128 * 2**20, dtype=torch.uint8, device=device), "NHD")
        wrapper.plan(torch.arange(b + 1, dtype=torch.int32, device=device) * per_seq, indices,
                     torch.full((b,), page, dtype=torch.int32, device=device), c["H"], c["Hkv"], c["D"], page,
                     pos_encoding_mode="NONE", q_data_type=c.dtype, kv_data_type=c.dtype)
        _FLASHINFER_PLANS[key] = wrapper
    caches = (inputs["k_pages"], inputs["v_pages"]) if c["page"] else (inputs["k_cache"], inputs["v_cache"])
    out = _FLASHINFER_PLANS[key].run(inputs["q"][:, 0], caches)
    if out.shape != (b, c["H"], c["D"]):
        raise Unsupported(f"unexpected FlashInfer output shape {tuple(out.shape)}")
    return out[:, None]


PROVIDERS = [
    *flashops_providers("attention_kvcache", _flashops, lambda c: {"head_dim": c["D"], "paged": bool(c["page"])}),
    Provider("sdpa", _sdpa, supports=_contiguous_only("SDPA"), errors_are_skips=True),
    Provider("flash-attn", _flash_attn, unavailable=module_missing("flash_attn"),
             supports=_gpu_half("flash-attn", page_multiple=256), errors_are_skips=True),
    Provider("flashinfer", _flashinfer, unavailable=module_missing("flashinfer"), supports=_gpu_half("FlashInfer"),
             errors_are_skips=True),
]

OPS = [
    Op(
        name=OP,
        family="attention",
        cases=cases,
        make_inputs=make_inputs,
        reference=reference,
        flops=flops,
        flop_formula="fwd = 4*B*H*T*D (one query per sequence, T cached keys)",
        providers=PROVIDERS,
        x="T",
        panels=("B", "page"),
        check_slice=check_slice,
        bytes_moved=bytes_moved,
        byte_formula="K and V read once plus q and out: (2*B*T*Hkv + 2*B*H)*D*e",
    ),
]
