// The S4 Cauchy kernel over conjugate-pair halves and its backward reductions; complex numbers are (re, im) fp32
// pairs. With r1 = 1 / (z_l - w_n) and r2 = 1 / (z_l - conj(w_n)):
//
//   out[m, g, l] = sum_n v[m, g, n] r1^p + conj(v[m, g, n]) r2^p      (p = 1; p = 2 is minus the z-derivative)
//
// The reciprocals depend on (g, n, l) only, so a thread computes them once for its l and applies them to kRows
// rows m at a time. The [.., N, L] matrix of reciprocals is never stored.

#include "common.cuh"

namespace flashops {

// 1 / (re + i im), correctly rounded reciprocal of the squared modulus (no overflow short of |.|^2 > FLT_MAX).
__device__ __forceinline__ void reciprocal(float re, float im, float& out_re, float& out_im) {
  const float inverse = __frcp_rn(re * re + im * im);
  out_re = re * inverse;
  out_im = -im * inverse;
}

template <int kThreads, int kRows, int kSquared>
__global__ void __launch_bounds__(kThreads) cauchy_fwd_kernel(
    // v [M, G, N, 2], z [L, 2], w [G, N, 2] fp32 contiguous; out [M, G, L, 2] fp32 contiguous
    const float* __restrict__ v, const float* __restrict__ z, const float* __restrict__ w, float* __restrict__ out,
    int n_rows, int n_groups, int n_state, int length) {
  float* w_shared = dynamic_shared_memory<float>();  // [N, 2]
  float* v_shared = w_shared + 2 * n_state;           // [kRows, N, 2]
  const int64 g = blockIdx.y;
  const int row0 = blockIdx.z * kRows;
  for (int n = threadIdx.x; n < n_state; n += kThreads) {
    w_shared[2 * n] = w[(g * n_state + n) * 2];
    w_shared[2 * n + 1] = w[(g * n_state + n) * 2 + 1];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool present = row0 + r < n_rows;
      const int64 at = ((static_cast<int64>(row0 + r) * n_groups + g) * n_state + n) * 2;
      v_shared[(r * n_state + n) * 2] = present ? v[at] : 0.f;
      v_shared[(r * n_state + n) * 2 + 1] = present ? v[at + 1] : 0.f;
    }
  }
  __syncthreads();
  const int64 l = static_cast<int64>(blockIdx.x) * kThreads + threadIdx.x;
  if (l >= length) return;  // no barrier follows
  const float zr = z[2 * l], zi = z[2 * l + 1];
  float acc_r[kRows], acc_i[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc_r[r] = acc_i[r] = 0.f;
  for (int n = 0; n < n_state; ++n) {
    const float wr = w_shared[2 * n], wi = w_shared[2 * n + 1];
    float r1r, r1i, r2r, r2i;
    reciprocal(zr - wr, zi - wi, r1r, r1i);
    reciprocal(zr - wr, zi + wi, r2r, r2i);
    if (kSquared) {
      const float s1r = r1r * r1r - r1i * r1i, s2r = r2r * r2r - r2i * r2i;
      r1i = 2.f * r1r * r1i;
      r2i = 2.f * r2r * r2i;
      r1r = s1r;
      r2r = s2r;
    }
    const float sum_r = r1r + r2r, diff_i = r1i - r2i, sum_i = r1i + r2i, diff_r = r1r - r2r;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {  // v r1 + conj(v) r2
      const float vr = v_shared[(r * n_state + n) * 2], vi = v_shared[(r * n_state + n) * 2 + 1];
      acc_r[r] += vr * sum_r - vi * diff_i;
      acc_i[r] += vr * sum_i + vi * diff_r;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (row0 + r >= n_rows) break;
    const int64 at = ((static_cast<int64>(row0 + r) * n_groups + g) * length + l) * 2;
    out[at] = acc_r[r];
    out[at + 1] = acc_i[r];
  }
}

// Partial sums over one range of l, for the rows m of this block and the states n of its 32 columns:
//   dv[m, g, n] = T1 + conj(T2),  dw_m[g, n] = conj(v) (S1 + conj(S2)),
//   T_k = sum_l G[m, g, l] conj(r_k),  S_k = sum_l G[m, g, l] conj(r_k)^2   (torch's conjugate convention)
// A block is 32 states x kLanes lanes of l (lane j takes l = lo + j, lo + j + kLanes, ...); the lanes' sums are
// added in shared memory. Grid: (state tiles, groups, row tiles x splits of L).
template <int kLanes, int kRows>
__global__ void __launch_bounds__(32 * kLanes) cauchy_bwd_kernel(
    // grad [M, G, L, 2], v [M, G, N, 2], z [L, 2], w [G, N, 2] fp32 contiguous; dv, dw [splits, M, G, N, 2]
    const float* __restrict__ grad, const float* __restrict__ v, const float* __restrict__ z,
    const float* __restrict__ w, float* __restrict__ dv, float* __restrict__ dw, int n_rows, int n_groups,
    int n_state, int length, int splits, int l_per_split) {
  __shared__ float partial[kLanes][kRows][8][32];
  const int local = threadIdx.x & 31;
  const int lane = threadIdx.x >> 5;
  const int n = blockIdx.x * 32 + local;
  const int64 g = blockIdx.y;
  const int row0 = (blockIdx.z / splits) * kRows;
  const int split = blockIdx.z % splits;
  const bool active = n < n_state;
  const float wr = active ? w[(g * n_state + n) * 2] : 0.f;
  const float wi = active ? w[(g * n_state + n) * 2 + 1] : 1.f;  // inactive columns: any finite reciprocal
  float acc[kRows][8];  // T1, T2, S1, S2 as (re, im)
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[r][q] = 0.f;
  const int64 lo = static_cast<int64>(split) * l_per_split;
  const int64 hi = min(lo + l_per_split, static_cast<int64>(length));
  for (int64 l = lo + lane; l < hi; l += kLanes) {
    const float zr = z[2 * l], zi = z[2 * l + 1];
    float r1r, r1i, r2r, r2i;
    reciprocal(zr - wr, zi - wi, r1r, r1i);
    reciprocal(zr - wr, zi + wi, r2r, r2i);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (row0 + r < n_rows) {
        const int64 at = ((static_cast<int64>(row0 + r) * n_groups + g) * length + l) * 2;
        const float gr = grad[at], gi = grad[at + 1];
        const float a1r = gr * r1r + gi * r1i, a1i = gi * r1r - gr * r1i;  // G conj(r1)
        const float a2r = gr * r2r + gi * r2i, a2i = gi * r2r - gr * r2i;  // G conj(r2)
        acc[r][0] += a1r;
        acc[r][1] += a1i;
        acc[r][2] += a2r;
        acc[r][3] += a2i;
        acc[r][4] += a1r * r1r + a1i * r1i;  // G conj(r1)^2
        acc[r][5] += a1i * r1r - a1r * r1i;
        acc[r][6] += a2r * r2r + a2i * r2i;
        acc[r][7] += a2i * r2r - a2r * r2i;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int q = 0; q < 8; ++q) partial[lane][r][q][local] = acc[r][q];
  __syncthreads();
  if (lane != 0 || !active) return;  // no barrier follows
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (row0 + r >= n_rows) break;
    float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < kLanes; ++j)
#pragma unroll
      for (int q = 0; q < 8; ++q) sum[q] += partial[j][r][q][local];
    const int64 row = static_cast<int64>(row0 + r) * n_groups + g;
    const int64 at = ((static_cast<int64>(split) * n_rows * n_groups + row) * n_state + n) * 2;
    const float vr = v[(row * n_state + n) * 2], vi = v[(row * n_state + n) * 2 + 1];
    const float sr = sum[4] + sum[6], si = sum[5] - sum[7];  // S1 + conj(S2)
    dv[at] = sum[0] + sum[2];                                 // T1 + conj(T2)
    dv[at + 1] = sum[1] - sum[3];
    dw[at] = vr * sr + vi * si;                               // conj(v) (S1 + conj(S2))
    dw[at + 1] = vr * si - vi * sr;
  }
}

}  // namespace flashops
