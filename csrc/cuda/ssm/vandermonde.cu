// The S4D Vandermonde kernel K[c, h, l] = scale Re(sum_n W[c, h, n] z[h, n]^l), z = exp(X), and its backward
// reductions; complex numbers are (re, im) fp32 pairs. The [H, N, L] matrix of powers is never stored.
//
// Powers: z^l = exp(Re(X) l) (cos(Im(X) l) + i sin(Im(X) l)) evaluated directly at the first of a run of
// consecutive l, then advanced by one multiplication by z per step. The exponent X l is rounded once in fp32;
// its rounding error (recovered exactly with an fma) is put back to first order, so a phase of 10^6 radians
// keeps fp32 accuracy instead of losing it to the rounding of the product.

#include "common.cuh"

namespace flashops {

// exp(X l) = (re, im) for X = (xr, xi), with the product X l corrected for its own rounding.
__device__ __forceinline__ void power_at(float xr, float xi, float l, float& re, float& im) {
  const float mag_hi = xr * l;
  const float mag_lo = fmaf(xr, l, -mag_hi);
  const float phase_hi = xi * l;
  const float phase_lo = fmaf(xi, l, -phase_hi);
  const float magnitude = exp2f(mag_hi * kLog2e) * (1.f + mag_lo);
  float s, c;
  sincosf(phase_hi, &s, &c);
  re = magnitude * (c - phase_lo * s);
  im = magnitude * (s + phase_lo * c);
}

// Each thread computes kSpan consecutive l for kCopies copies of one head h; W is read from shared memory.
template <int kThreads, int kSpan, int kCopies>
__global__ void __launch_bounds__(kThreads) vandermonde_fwd_kernel(
    // x [H, N, 2] and w [C, H, N, 2] fp32 contiguous; k [C, H, L] fp32 contiguous
    const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ k,
    int n_copies, int n_heads, int n_state, int length, float scale) {
  float* x_shared = dynamic_shared_memory<float>();   // [N, 2] X
  float* z_shared = x_shared + 2 * n_state;           // [N, 2] exp(X)
  float* w_shared = z_shared + 2 * n_state;           // [kCopies, N, 2]
  const int64 h = blockIdx.y;
  const int copy0 = blockIdx.z * kCopies;
  for (int n = threadIdx.x; n < n_state; n += kThreads) {
    const float xr = x[(h * n_state + n) * 2], xi = x[(h * n_state + n) * 2 + 1];
    x_shared[2 * n] = xr;
    x_shared[2 * n + 1] = xi;
    power_at(xr, xi, 1.f, z_shared[2 * n], z_shared[2 * n + 1]);
#pragma unroll
    for (int c = 0; c < kCopies; ++c) {
      const bool present = copy0 + c < n_copies;
      const int64 at = ((static_cast<int64>(copy0 + c) * n_heads + h) * n_state + n) * 2;
      w_shared[(c * n_state + n) * 2] = present ? w[at] : 0.f;
      w_shared[(c * n_state + n) * 2 + 1] = present ? w[at + 1] : 0.f;
    }
  }
  __syncthreads();
  const int64 first = (static_cast<int64>(blockIdx.x) * kThreads + threadIdx.x) * kSpan;
  float acc[kCopies][kSpan];
#pragma unroll
  for (int c = 0; c < kCopies; ++c)
#pragma unroll
    for (int j = 0; j < kSpan; ++j) acc[c][j] = 0.f;
  for (int n = 0; n < n_state; ++n) {
    float pr, pi;
    power_at(x_shared[2 * n], x_shared[2 * n + 1], static_cast<float>(first), pr, pi);
    const float zr = z_shared[2 * n], zi = z_shared[2 * n + 1];
#pragma unroll
    for (int j = 0; j < kSpan; ++j) {
#pragma unroll
      for (int c = 0; c < kCopies; ++c)
        acc[c][j] += w_shared[(c * n_state + n) * 2] * pr - w_shared[(c * n_state + n) * 2 + 1] * pi;
      const float next = pr * zr - pi * zi;
      pi = pr * zi + pi * zr;
      pr = next;
    }
  }
#pragma unroll
  for (int c = 0; c < kCopies; ++c) {
    if (copy0 + c >= n_copies) break;
#pragma unroll
    for (int j = 0; j < kSpan; ++j) acc[c][j] *= scale;
    store_run<kSpan>(k + (static_cast<int64>(copy0 + c) * n_heads + h) * length, first, length, acc[c]);
  }
}

// Partial sums over one range of l, for every copy c of head h and state n of this block:
//   S0[c, h, n] = sum_l G[c, h, l] conj(z^l),   S1[c, h, n] = sum_l G[c, h, l] l conj(z^l)
// A block is 32 states x kLanes lanes of l: lane j takes l = lo + j, lo + j + kLanes, ... (steps of z^kLanes, with
// a direct evaluation every kAnchor steps), and the lanes' sums are added in shared memory at the end.
template <int kLanes, int kCopies>
__global__ void __launch_bounds__(32 * kLanes) vandermonde_bwd_kernel(
    // x [H, N, 2] fp32 contiguous; g [C, H, L] fp32 contiguous; partial sums s0, s1 [splits, C, H, N, 2]
    const float* __restrict__ x, const float* __restrict__ g, float* __restrict__ s0, float* __restrict__ s1,
    int n_copies, int n_heads, int n_state, int length, int l_per_split) {
  constexpr int kAnchor = 32;
  __shared__ float partial[kLanes][kCopies][4][32];
  const int local = threadIdx.x & 31;
  const int lane = threadIdx.x >> 5;
  const int n = blockIdx.x * 32 + local;
  const int64 h = blockIdx.y;
  const int split = blockIdx.z;
  const bool active = n < n_state;
  const float xr = active ? x[(h * n_state + n) * 2] : 0.f;
  const float xi = active ? x[(h * n_state + n) * 2 + 1] : 0.f;
  float step_r, step_i;  // z^kLanes
  power_at(xr, xi, static_cast<float>(kLanes), step_r, step_i);
  const int64 lo = static_cast<int64>(split) * l_per_split;
  const int64 hi = min(lo + l_per_split, static_cast<int64>(length));
  for (int copy0 = 0; copy0 < n_copies; copy0 += kCopies) {
    float a0r[kCopies], a0i[kCopies], a1r[kCopies], a1i[kCopies];
#pragma unroll
    for (int c = 0; c < kCopies; ++c) a0r[c] = a0i[c] = a1r[c] = a1i[c] = 0.f;
    float pr = 0.f, pi = 0.f;
    int since_anchor = kAnchor;
    for (int64 l = lo + lane; l < hi; l += kLanes) {
      if (since_anchor == kAnchor) {
        power_at(xr, xi, static_cast<float>(l), pr, pi);
        since_anchor = 0;
      }
      const float lf = static_cast<float>(l);
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy0 + c < n_copies) {
          const float gv = g[(static_cast<int64>(copy0 + c) * n_heads + h) * length + l];
          a0r[c] += gv * pr;  // G conj(p)
          a0i[c] -= gv * pi;
          a1r[c] += gv * lf * pr;
          a1i[c] -= gv * lf * pi;
        }
      }
      const float next = pr * step_r - pi * step_i;
      pi = pr * step_i + pi * step_r;
      pr = next;
      ++since_anchor;
    }
#pragma unroll
    for (int c = 0; c < kCopies; ++c) {
      partial[lane][c][0][local] = a0r[c];
      partial[lane][c][1][local] = a0i[c];
      partial[lane][c][2][local] = a1r[c];
      partial[lane][c][3][local] = a1i[c];
    }
    __syncthreads();
    if (lane == 0 && active) {
#pragma unroll
      for (int c = 0; c < kCopies; ++c) {
        if (copy0 + c >= n_copies) break;
        float sums[4] = {0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < kLanes; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) sums[q] += partial[j][c][q][local];
        const int64 at = (((static_cast<int64>(split) * n_copies + copy0 + c) * n_heads + h) * n_state + n) * 2;
        s0[at] = sums[0];
        s0[at + 1] = sums[1];
        s1[at] = sums[2];
        s1[at + 1] = sums[3];
      }
    }
    __syncthreads();  // `partial` is free for the next copies
  }
}

}  // namespace flashops
