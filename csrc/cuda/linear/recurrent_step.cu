// One decoding step of linear attention (lightning_attention_step, gated_linear_attention_step), per (b, h):
//
//   S1 = diag(decay) S0 + k^T v,  o = scale q S1,   decay = exp(max(g, floor)) (GLA) or exp(-min(slope, -floor))
//
// and its backward. The state [K, V] (fp32, row-major) is read once and written once; everything else is a few
// vectors. One block of 4 warps per (b, h): warp w takes the rows k = w, w + 4, ...; a lane owns the columns
// 4 lane .. 4 lane + 3 and 128 + 4 lane .. 128 + 4 lane + 3 (V <= 256), read and written as 16-byte vectors.
// Sums over the columns (dq, dk, dg) are warp reductions; sums over the rows (o, dv) are added across the warps in
// shared memory. g below the floor acts as the floor (a NaN stays NaN) and its gradient is 0 there.

#include "common.cuh"

namespace flashops {

constexpr int kStepWarps = 4;
constexpr int kStepThreads = 32 * kStepWarps;
constexpr int kMaxHeadDim = 256;

template <typename T, typename gate_t>
__device__ __forceinline__ void load_step_vectors(const T* q, const T* k, const gate_t* g, const float* slopes,
                                                  int64 h, int k_dim, float log_gate_floor, float* q_shared,
                                                  float* k_shared, float* decay_shared, float* g_shared) {
  for (int i = threadIdx.x; i < k_dim; i += kStepThreads) {
    q_shared[i] = to_float(q[i]);
    k_shared[i] = to_float(k[i]);
    const float log_gate = g != nullptr ? to_float(g[i]) : -slopes[h];
    g_shared[i] = log_gate;
    decay_shared[i] = expf(log_gate < log_gate_floor ? log_gate_floor : log_gate);
  }
  __syncthreads();
}

// The lane's 8 columns of a [V] vector or of one state row, in two runs of 4.
template <typename T>
__device__ __forceinline__ void load_columns(const T* row, int v_dim, float (&out)[2][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int half = 0; half < 2; ++half) load_run<4>(row, 128 * half + 4 * lane, v_dim, 0.f, out[half]);
}

template <typename T>
__device__ __forceinline__ void store_columns(T* row, int v_dim, const float (&in)[2][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int half = 0; half < 2; ++half) store_run<4>(row, 128 * half + 4 * lane, v_dim, in[half]);
}

// Adds the warps' column sums (partial[warp][column]) and writes them, times `scale`, to out[column].
template <typename T>
__device__ __forceinline__ void store_column_sums(float (*partial)[kMaxHeadDim], const float (&mine)[2][4],
                                                  int v_dim, float scale, T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[warp][128 * half + 4 * lane + j] = mine[half][j];
  __syncthreads();
  for (int c = threadIdx.x; c < v_dim; c += kStepThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kStepWarps; ++w) sum += partial[w][c];
    out[c] = from_float<T>(scale * sum);
  }
}

template <typename T, typename gate_t>
__global__ void __launch_bounds__(kStepThreads) recurrent_step_fwd_kernel(
    // q, k, g [B, H, K] and v [B, H, V] (unit last stride); slopes [H] fp32 (when g is null); state [B, H, K, V]
    // fp32 contiguous or null (zeros)
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const gate_t* __restrict__ g,
    const float* __restrict__ slopes, const float* __restrict__ state,
    // outputs: o [B, H, V] contiguous, new_state [B, H, K, V] fp32 contiguous
    T* __restrict__ o, float* __restrict__ new_state,
    // strides (elements) of the batch and head dimensions
    int64 stride_q_b, int64 stride_q_h, int64 stride_k_b, int64 stride_k_h, int64 stride_v_b, int64 stride_v_h,
    int64 stride_g_b, int64 stride_g_h,
    // sizes and scalars
    int heads, int k_dim, int v_dim, float scale, float log_gate_floor) {
  __shared__ float q_shared[kMaxHeadDim], k_shared[kMaxHeadDim], decay_shared[kMaxHeadDim], g_shared[kMaxHeadDim];
  __shared__ float partial[kStepWarps][kMaxHeadDim];
  const int64 bh = blockIdx.x;
  const int64 b = bh / heads, h = bh % heads;
  load_step_vectors(q + b * stride_q_b + h * stride_q_h, k + b * stride_k_b + h * stride_k_h,
                    g != nullptr ? g + b * stride_g_b + h * stride_g_h : g, slopes, h, k_dim, log_gate_floor,
                    q_shared, k_shared, decay_shared, g_shared);
  float v_in[2][4], o_acc[2][4] = {};
  load_columns(v + b * stride_v_b + h * stride_v_h, v_dim, v_in);
  for (int row = threadIdx.x >> 5; row < k_dim; row += kStepWarps) {
    const int64 offset = (bh * k_dim + row) * v_dim;
    float s[2][4] = {};
    if (state != nullptr) load_columns(state + offset, v_dim, s);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[half][j] = decay_shared[row] * s[half][j] + k_shared[row] * v_in[half][j];
        o_acc[half][j] += q_shared[row] * s[half][j];
      }
    store_columns(new_state + offset, v_dim, s);
  }
  store_column_sums(partial, o_acc, v_dim, scale, o + bh * v_dim);
}

template <typename T, typename gate_t>
__global__ void __launch_bounds__(kStepThreads) recurrent_step_bwd_kernel(
    // the forward inputs as there; dout [B, H, V] contiguous; d_new_state [B, H, K, V] fp32 contiguous or null
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const gate_t* __restrict__ g,
    const float* __restrict__ slopes, const float* __restrict__ state, const T* __restrict__ dout,
    const float* __restrict__ d_new_state,
    // gradients, contiguous: dq, dk [B, H, K], dv [B, H, V], dg [B, H, K] (null with slopes), d_state
    // [B, H, K, V] fp32 (null without a state)
    T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv, gate_t* __restrict__ dg, float* __restrict__ d_state,
    // strides (elements) of the batch and head dimensions
    int64 stride_q_b, int64 stride_q_h, int64 stride_k_b, int64 stride_k_h, int64 stride_v_b, int64 stride_v_h,
    int64 stride_g_b, int64 stride_g_h,
    // sizes and scalars
    int heads, int k_dim, int v_dim, float scale, float log_gate_floor) {
  __shared__ float q_shared[kMaxHeadDim], k_shared[kMaxHeadDim], decay_shared[kMaxHeadDim], g_shared[kMaxHeadDim];
  __shared__ float partial[kStepWarps][kMaxHeadDim];
  const int64 bh = blockIdx.x;
  const int64 b = bh / heads, h = bh % heads;
  load_step_vectors(q + b * stride_q_b + h * stride_q_h, k + b * stride_k_b + h * stride_k_h,
                    g != nullptr ? g + b * stride_g_b + h * stride_g_h : g, slopes, h, k_dim, log_gate_floor,
                    q_shared, k_shared, decay_shared, g_shared);
  float v_in[2][4], do_in[2][4], dv_acc[2][4] = {};
  load_columns(v + b * stride_v_b + h * stride_v_h, v_dim, v_in);
  load_columns(dout + bh * v_dim, v_dim, do_in);
  const int lane = threadIdx.x & 31;
  for (int row = threadIdx.x >> 5; row < k_dim; row += kStepWarps) {
    const int64 offset = (bh * k_dim + row) * v_dim;
    float prev[2][4] = {}, d_new[2][4] = {};
    if (state != nullptr) load_columns(state + offset, v_dim, prev);
    if (d_new_state != nullptr) load_columns(d_new_state + offset, v_dim, d_new);
    float dq_sum = 0.f, dk_sum = 0.f, dg_sum = 0.f;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float updated = decay_shared[row] * prev[half][j] + k_shared[row] * v_in[half][j];
        d_new[half][j] += scale * q_shared[row] * do_in[half][j];  // dL/dS1
        dq_sum += updated * do_in[half][j];
        dk_sum += d_new[half][j] * v_in[half][j];
        dg_sum += d_new[half][j] * prev[half][j];
        dv_acc[half][j] += d_new[half][j] * k_shared[row];
        d_new[half][j] *= decay_shared[row];  // dL/dS0
      }
    if (d_state != nullptr) store_columns(d_state + offset, v_dim, d_new);
    dq_sum = warp_sum(dq_sum);
    dk_sum = warp_sum(dk_sum);
    dg_sum = warp_sum(dg_sum);
    if (lane == 0) {
      dq[bh * k_dim + row] = from_float<T>(scale * dq_sum);
      dk[bh * k_dim + row] = from_float<T>(dk_sum);
      if (dg != nullptr) {
        const float log_gate = g_shared[row];
        dg[bh * k_dim + row] = from_float<gate_t>(log_gate < log_gate_floor ? 0.f : decay_shared[row] * dg_sum);
      }
    }
  }
  store_column_sums(partial, dv_acc, v_dim, 1.f, dv + bh * v_dim);
}

}  // namespace flashops
