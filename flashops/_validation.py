"""Input checks shared by the public ops: each error names the argument, what it got and what it needs."""

from __future__ import annotations

import torch

# float64 is accepted everywhere: the PyTorch backends compute in it (gradcheck), the Triton backends decline it.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, layout: str | None = None):
    """A tensor of rank ``ndim`` and one of ``dtypes``, with a contiguous last dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{name} must have {ndim} dimensions{shape}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride(-1) == 1), got strides {t.stride()}"
        )
    return t


def check_same(names_tensors, attr: str):
    """All given tensors (``None`` entries skipped) agree on ``attr``: "device" or "dtype"."""
    items = [(n, t) for n, t in names_tensors if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(first, attr):
            raise ValueError(
                f"{name} has {attr} {getattr(t, attr)} but {first_name} has {getattr(first, attr)}; "
                f"they must match"
            )


def check_cu_seqlens(name: str, cu, total: int, device):
    """Cumulative sequence lengths ``[N + 1]``, int32 or int64 (fla and torch users pass int64); returns them
    as the int32 tensor the kernels read."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu.dtype}")
    if total >= 2**31:
        raise ValueError(f"{name}: the packed length {total} does not fit int32 offsets")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with N+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != torch.device(device):
        raise ValueError(f"{name} is on device {cu.device} but the inputs are on {device}")
    if not torch.compiler.is_compiling() and cu.device.type != "meta":
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if last != total:
            raise ValueError(f"{name}[-1] must equal the packed length {total}, got {last}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    return cu.to(torch.int32)  # fits: 0 <= values <= total < 2**31


def values_on_host(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be checked for free: a plain CPU tensor in eager mode. Reading a GPU tensor
    would sync the host with the device on every call (and cannot happen under torch.compile or CUDA-graph
    capture), so value checks run on CPU tensors only; the ops document what out-of-domain values give
    elsewhere."""
    return (t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling())


def check_values(name: str, t: torch.Tensor, ok: torch.Tensor, need: str):
    """Raise a ValueError naming the first entry of ``t`` where ``ok`` is False (call it where
    :func:`values_on_host`)."""
    if t.numel() and not bool(ok.all()):
        index = tuple(int(i) for i in (~ok).nonzero()[0])
        raise ValueError(f"{name} must be {need}, got {float(t.detach()[index])} at index {index}")


def check_dim(name: str, value: int, lo: int, hi: int, what: str = "head dim"):
    if not lo <= value <= hi:
        raise ValueError(f"{name} has {what} {value}; supported {what}s are {lo}..{hi}")


def check_attention_inputs(q, k, v=None, *, names=("q", "k", "v"), layout: str = "[B, T, H, D]",
                           max_head_dim: int = 256):
    """q ``[B, Tq, H, D]`` and k (and v) ``[B, Tk, Hkv, D]``: same device and dtype, ``H % Hkv == 0``,
    head dim 1..max_head_dim. ``v`` may be omitted (ops that only need q and k)."""
    named = tuple((n, t) for n, t in zip(names, (q, k, v)) if t is not None)
    for name, t in named:
        check_tensor(name, t, ndim=4, layout=layout)
    check_same(named, "device")
    check_same(named, "dtype")
    nq, nk, nv = names
    if v is not None and k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nq} and {nk} must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    h, h_kv = q.shape[2], k.shape[2]
    if h_kv == 0 or h % h_kv:
        raise ValueError(
            f"the number of query heads ({h}) must be a multiple of the number of key/value heads ({h_kv})")
    check_dim(nq, q.shape[-1], 1, max_head_dim)


def pick_scale(softmax_scale, scale):
    """``softmax_scale=`` (flash-attn's name) and ``scale=`` (SDPA's and fla's) are one argument: either, not both."""
    if scale is None:
        return softmax_scale
    if softmax_scale is not None:
        raise TypeError(f"pass softmax_scale= or its alias scale=, not both (got {softmax_scale!r} and {scale!r})")
    return scale
