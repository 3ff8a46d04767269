"""Chunk indexing shared by the chunked Triton kernels (linear attention today): which sequence, batch row and
tokens a program's chunk covers, dense or packed (varlen), tile loads and stores on ``[B, T, H, D]`` tensors,
per-chunk state buffers, and the chunk-local cumulative sum of log-gates.

A sequence is cut into chunks of ``chunk`` positions; chunks never straddle sequences. Dense inputs
``[B, T, H, D]`` have ``B * ceil(T / chunk)`` chunks, numbered sequence by sequence. Packed inputs
``[1, total, H, D]`` with ``cu_seqlens`` get a chunk table that maps a global chunk index to (sequence, chunk in
sequence), and per-sequence offsets into it (:class:`ChunkLayout`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton_utils import config, launcher, strides


class ChunkLayout:
    """How chunks of ``chunk`` positions map to sequences: dense [B, T] or packed with cu_seqlens.

    Kernel arguments: ``CU`` (cu_seqlens), ``CHUNK_IDX`` (``index``: int32 [total, 2] of (sequence, chunk in
    sequence)), ``CHUNK_OFF`` (``offsets``: int32 [N + 1], first global chunk of each sequence), ``seqlen``
    (T; 0 for packed inputs, whose lengths come from CU), ``n_chunks`` (chunks per dense sequence)."""

    def __init__(self, q: torch.Tensor, cu_seqlens, chunk: int):
        self.varlen = cu_seqlens is not None
        dummy = q  # stands in for the pointers that dense inputs never read
        if not self.varlen:
            self.n_seq, self.seqlen = q.shape[0], q.shape[1]
            self.n_chunks = triton.cdiv(self.seqlen, chunk)
            self.total = self.n_seq * self.n_chunks
            self.cu, self.index, self.offsets = dummy, dummy, dummy
            return
        cu = cu_seqlens.to(torch.int64)
        counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
        offsets = torch.zeros_like(cu)
        offsets[1:] = torch.cumsum(counts, 0)
        self.total = int(offsets[-1])
        seq = torch.repeat_interleave(torch.arange(counts.numel(), device=q.device), counts, output_size=self.total)
        local = torch.arange(self.total, device=q.device) - offsets[seq]
        self.n_seq, self.seqlen, self.n_chunks = cu_seqlens.numel() - 1, 0, 1
        self.cu = cu_seqlens
        self.index = torch.stack([seq, local], dim=1).to(torch.int32).contiguous() if self.total else dummy
        self.offsets = offsets.to(torch.int32)

    def chunk_args(self) -> dict:
        """The layout arguments of a kernel with one program per chunk."""
        return dict(CU=self.cu, CHUNK_IDX=self.index, seqlen=self.seqlen, n_chunks=self.n_chunks,
                    IS_VARLEN=self.varlen)

    def sequence_args(self) -> dict:
        """The layout arguments of a kernel with one program per sequence (it walks the sequence's chunks)."""
        return dict(CU=self.cu, CHUNK_OFF=self.offsets, seqlen=self.seqlen, n_chunks=self.n_chunks,
                    IS_VARLEN=self.varlen)


# --------------------------------------------------------------------------------------------- coordinates
@triton.jit
def chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN: tl.constexpr):
    """(sequence, batch row, first token of the sequence, its length, chunk index in it) of global chunk
    ``pid_c``. Dense inputs: sequence == batch row, tokens start at 0."""
    if IS_VARLEN:
        n = tl.load(CHUNK_IDX + pid_c * 2)
        i = tl.load(CHUNK_IDX + pid_c * 2 + 1)
        bos = tl.load(CU + n)
        seqlen = tl.load(CU + n + 1) - bos
        b = 0
    else:
        i = pid_c % n_chunks
        n = pid_c // n_chunks
        b = n
        bos = 0
    return n, b, bos, seqlen, i


@triton.jit
def chunk_rows(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """(batch row, first token of the sequence, its length, first token of the chunk, tokens in the chunk,
    row offsets [BT], row mask [BT]) of global chunk ``pid_c``."""
    n, b, bos, seqlen, i = chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    length = tl.minimum(seqlen - t0, BT)
    offs_t = tl.arange(0, BT)
    return b, bos, seqlen, t0, length, offs_t, offs_t < length


@triton.jit
def sequence_chunks(n, CU, CHUNK_OFF, seqlen, n_chunks, IS_VARLEN: tl.constexpr):
    """(batch row, first token, length, global index of its first chunk, number of chunks) of sequence n."""
    if IS_VARLEN:
        bos = tl.load(CU + n)
        seqlen = tl.load(CU + n + 1) - bos
        first = tl.load(CHUNK_OFF + n)
        count = tl.load(CHUNK_OFF + n + 1) - first
        b = 0
    else:
        bos = 0
        first = n * n_chunks
        count = n_chunks
        b = n
    return b, bos, seqlen, first, count


# ---------------------------------------------------------------------------------------------- addressing
@triton.jit
def row_base(PTR, b, bos, t0, h, stride_b, stride_t, stride_h):
    """Pointer to row t0 of the sequence starting at token ``bos`` of batch row b, head h (int64 offsets)."""
    return (PTR + tl.cast(b, tl.int64) * stride_b + tl.cast(bos + t0, tl.int64) * stride_t
            + tl.cast(h, tl.int64) * stride_h)


@triton.jit
def buffer_base(PTR, b, bos, t0, h, seqlen, row_stride, head_stride):
    """Row t0 of a buffer allocated here as contiguous [B, T, H, X] (row_stride = H * X, head_stride = X);
    seqlen is T for dense inputs (varlen inputs have a single batch row)."""
    return PTR + (tl.cast(b, tl.int64) * seqlen + tl.cast(bos + t0, tl.int64)) * row_stride + h * head_stride


@triton.jit
def tile_mask(row_ok, col_ok, EVEN_COL: tl.constexpr):
    """Mask of an [R, C] tile contiguous along C. When C is known to be in bounds (EVEN_COL) only the rows are
    masked: a mask that varies along the contiguous dimension stops loads and stores from vectorizing."""
    if EVEN_COL:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & col_ok[None, :]
    return mask


@triton.jit
def tile_mask_t(row_ok, col_ok, EVEN_COL: tl.constexpr):
    """Mask of the transposed tile [C, R] (still contiguous along C)."""
    if EVEN_COL:
        mask = row_ok[None, :]
    else:
        mask = col_ok[:, None] & row_ok[None, :]
    return mask


@triton.jit
def load_tile(base, stride_t, offs_t, t_ok, offs_d, d_ok, EVEN_D: tl.constexpr):
    """[BT, BD] tile of rows offs_t (stride stride_t) and contiguous columns offs_d; zeros where masked."""
    return tl.load(base + offs_t[:, None] * stride_t + offs_d[None, :], mask=tile_mask(t_ok, d_ok, EVEN_D),
                   other=0.0)


@triton.jit
def load_tile_t(base, stride_t, offs_t, t_ok, offs_d, d_ok, EVEN_D: tl.constexpr):
    """The transposed tile [BD, BT]."""
    return tl.load(base + offs_t[None, :] * stride_t + offs_d[:, None], mask=tile_mask_t(t_ok, d_ok, EVEN_D),
                   other=0.0)


@triton.jit
def state_ptrs(HS, chunk, h, num_heads, offs_k, offs_v, K_DIM: tl.constexpr, V_DIM: tl.constexpr):
    """[BK, BV] pointers into a per-chunk state buffer [chunks, H, K, V]."""
    base = HS + tl.cast(chunk * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    return base + offs_k[:, None] * V_DIM + offs_v[None, :]


@triton.jit
def state_ptrs_t(HS, chunk, h, num_heads, offs_k, offs_v, K_DIM: tl.constexpr, V_DIM: tl.constexpr):
    """[BV, BK] pointers (transposed view) into a per-chunk state buffer."""
    base = HS + tl.cast(chunk * num_heads + h, tl.int64) * (K_DIM * V_DIM)
    return base + offs_k[None, :] * V_DIM + offs_v[:, None]


# --------------------------------------------------------------------------------------------- gate cumsum
@launcher(configs=lambda args: (config(4, 3, BK=min(64, max(16, triton.next_power_of_2(args["K_DIM"])))),),
          interpreted=config(1, 1, BK=16),
          heuristics={"EVEN_K": lambda args: args["K_DIM"] % args["BK"] == 0})
@triton.jit
def chunk_cumsum_fwd_kernel(
    # pointers
    G, GC, CU, CHUNK_IDX,
    # strides
    stride_gb, stride_gt, stride_gh,
    # sizes
    seqlen, n_chunks, num_heads,
    # meta-parameters
    K_DIM: tl.constexpr, FLOOR: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """gc = inclusive cumsum of max(g, FLOOR) from the start of each chunk (fp32, [B, T, H, K] contiguous); a
    positive (out of domain) log-gate is NaN."""
    pid_c, pid_k, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b, bos, seqlen, i = chunk_coords(pid_c, CU, CHUNK_IDX, seqlen, n_chunks, IS_VARLEN)
    t0 = i * BT
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    t_ok = t0 + offs_t < seqlen
    k_ok = offs_k < K_DIM
    g = load_tile(row_base(G, b, bos, t0, h, stride_gb, stride_gt, stride_gh), stride_gt, offs_t, t_ok, offs_k, k_ok,
                  EVEN_K)
    g = g.to(tl.float32)
    g = tl.where(g < FLOOR, FLOOR, g)  # NaN stays NaN
    g = tl.where(g > 0, float("nan"), g)  # out of domain: NaN from here on, as on every backend
    gc = tl.cumsum(g, axis=0)
    gc_base = buffer_base(GC, b, bos, t0, h, seqlen, num_heads * K_DIM, K_DIM)
    tl.store(gc_base + offs_t[:, None] * (num_heads * K_DIM) + offs_k[None, :], gc, mask=tile_mask(t_ok, k_ok, EVEN_K))


def gate_cumsum(g: torch.Tensor, layout: ChunkLayout, chunk: int, floor: float) -> torch.Tensor:
    """Chunk-local inclusive cumulative sums of the log-gates g [B, T, H, K], each gate floored at ``floor``
    (fp32 [B, T, H, K])."""
    heads, d_k = g.shape[2], g.shape[3]
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    chunk_cumsum_fwd_kernel.launch(
        lambda meta: (layout.total, triton.cdiv(d_k, meta["BK"]), heads),
        G=g, GC=gc, **strides("g", g, "bth"), num_heads=heads, K_DIM=d_k, FLOOR=floor, BT=chunk,
        **layout.chunk_args())
    return gc
