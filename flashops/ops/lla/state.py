"""The decode statistics of LLA and how partial ones combine (shared by the decode paths).

For one query q against a set of keys, with weights w_j = exp(scale * q . k_j - m), the exact D x D
statistics are the normalizer l = sum w_j, the weighted sums k_sum = sum w_j k_j, v_sum = sum w_j v_j and
second moments kk = sum w_j k_j k_j^T, vk = sum w_j v_j k_j^T. Statistics of disjoint key sets (splits of the
KV cache, or consecutive chunks) combine by rescaling each to a common max m* with exp(m - m*) and adding:
the same online rescaling as flash-decoding. From the combined statistics the output is one D x D solve:

    k_bar = k_sum / l,  v_bar = v_sum / l,  A = kk / l - k_bar k_bar^T + lambda I,  z = A^{-1} (k_bar - q)
    o = v_bar - (vk / l - v_bar k_bar^T) z = v_bar (1 + k_bar . z) - (vk / l) z
"""

from __future__ import annotations

import torch


def combine_partials(q, m, l, k_sum, v_sum, kk, vk, lam, *, log2: bool = False):
    """Combine statistics over the last "split" axis and return the LLA output.

    The key moments may be taken about any origin c (keys k - c) if q is given as q - c too.
    q [..., D] fp32; m, l [..., S]; k_sum, v_sum [..., S, D]; kk, vk [..., S, D, D]; lam [...].
    ``log2``: m is in log2 units (the Triton kernels' exp2 domain). A query with no key gives 0.
    """
    m_max = m.amax(dim=-1, keepdim=True)
    m_max = m_max.masked_fill(torch.isneginf(m_max), 0.0)
    scale = torch.exp2(m - m_max) if log2 else torch.exp(m - m_max)  # 0 for an empty split (m = -inf)
    total = (l * scale).sum(-1)
    k_sum = (k_sum * scale[..., None]).sum(-2)
    v_sum = (v_sum * scale[..., None]).sum(-2)
    kk = (kk * scale[..., None, None]).sum(-3)
    vk = (vk * scale[..., None, None]).sum(-3)
    seen = total > 0
    norm = torch.where(seen, total, torch.ones_like(total))[..., None]
    k_bar, v_bar = k_sum / norm, v_sum / norm
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    system = kk / norm[..., None] - k_bar[..., :, None] * k_bar[..., None, :] + lam[..., None, None] * eye
    z = torch.linalg.solve_ex(system, (k_bar - q)[..., None])[0][..., 0]
    out = v_bar * (1.0 + (k_bar * z).sum(-1, keepdim=True)) - torch.matmul(vk / norm[..., None], z[..., None])[..., 0]
    return torch.where(seen[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
