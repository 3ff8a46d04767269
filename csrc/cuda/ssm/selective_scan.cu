// selective_scan (Mamba-1), forward and backward, per channel d and state n:
//
//   dt_t = softplus(delta_t + delta_bias) (or without softplus)
//   h_t  = exp(dt_t A[d, n]) h_{t-1} + dt_t B_t[n] u_t
//   y_t  = sum_n C_t[n] h_t[n] + D u_t,   out_t = y_t silu(z_t)
//
// One block per (batch, channel) walks time in chunks of kThreads * kItems steps; a thread owns kItems consecutive
// steps. For each state n the block scans the maps h -> gate h + x of the chunk (block_exclusive_scan: warp
// shuffles, then one map per warp), the state entering the chunk comes from shared memory, and y accumulates over
// n in registers. The forward pass saves the state entering every chunk ([B, D, N, chunks]).
//
// The backward pass visits the chunks from the last. For each n it recomputes the chunk's states from the saved
// one, then runs the adjoint backwards as a reverse block scan of mu_t = gate_t (C_t dy_t + mu_{t+1}), so that
// lambda_t = dL/dh_t = C_t dy_t + mu_{t+1} needs no gate of a neighbouring step; mu carries into the previous chunk
// and is d initial_state at the start. Per-channel gradients (du, ddelta, dz) are written directly; dA, dD and
// d delta_bias are summed over the block and written per (batch, channel) for the launcher to add (no atomics).
// dB and dC sum over every channel that shares B and C: each block adds its chunk into fp32 buffers with atomics,
// after regrouping the values in shared memory so that consecutive threads hit consecutive addresses.

#include "common.cuh"

namespace flashops {

// dt of a thread's steps (0 on padding) and the raw delta + bias that the softplus derivative needs.
template <int kItems, typename input_t>
__device__ __forceinline__ void load_steps(const input_t* delta_row, int64 first, int64 length, float bias,
                                           int softplus_dt, float (&raw)[kItems], float (&dt)[kItems]) {
  load_run<kItems>(delta_row, first, length, 0.f, raw);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    raw[i] += bias;
    const float value = softplus_dt ? softplus(raw[i]) : raw[i];
    dt[i] = first + i < length ? value : 0.f;  // padding steps are identity maps: exp(0 A) = 1, x = 0
  }
}

template <int kThreads, int kItems, typename input_t, typename weight_t>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(
    // inputs: u, delta, z [B, D, L] and B, C [B, G, N, L] (unit time stride); A [D, N], D, delta_bias [D] and
    // initial_state [B, D, N] fp32 contiguous. z, D, delta_bias and initial_state may be null.
    const input_t* __restrict__ u, const input_t* __restrict__ delta, const float* __restrict__ A,
    const weight_t* __restrict__ B, const weight_t* __restrict__ C, const float* __restrict__ D,
    const input_t* __restrict__ z, const float* __restrict__ delta_bias, const float* __restrict__ initial_state,
    // outputs: out [B, D, L] contiguous; last_state [B, D, N] and saved [B, D, N, chunks] fp32 contiguous
    input_t* __restrict__ out, float* __restrict__ last_state, float* __restrict__ saved,
    // strides (elements)
    int64 stride_u_b, int64 stride_u_d, int64 stride_delta_b, int64 stride_delta_d, int64 stride_z_b,
    int64 stride_z_d, int64 stride_B_b, int64 stride_B_g, int64 stride_B_n, int64 stride_C_b, int64 stride_C_g,
    int64 stride_C_n,
    // sizes and switches
    int dim, int n_groups, int n_state, int length, int softplus_dt) {
  constexpr int kChunk = kThreads * kItems;
  __shared__ Affine warp_totals[kThreads / 32];
  float* a_log2 = dynamic_shared_memory<float>();  // [N] A[d, n] log2(e)
  float* state = a_log2 + n_state;                  // [N] the state entering the current chunk

  const int64 b = blockIdx.x / dim;
  const int64 d = blockIdx.x % dim;
  const int64 g = d / (dim / n_groups);
  const int64 row = b * dim + d;  // of the [B, D, ...] fp32 buffers
  for (int n = threadIdx.x; n < n_state; n += kThreads) {
    a_log2[n] = A[d * n_state + n] * kLog2e;
    state[n] = initial_state != nullptr ? initial_state[row * n_state + n] : 0.f;
  }
  const float bias = delta_bias != nullptr ? delta_bias[d] : 0.f;
  const float skip = D != nullptr ? D[d] : 0.f;
  const input_t* u_row = u + b * stride_u_b + d * stride_u_d;
  const input_t* delta_row = delta + b * stride_delta_b + d * stride_delta_d;
  const weight_t* B_rows = B + b * stride_B_b + g * stride_B_g;
  const weight_t* C_rows = C + b * stride_C_b + g * stride_C_g;
  input_t* out_row = out + row * length;

  const int chunks = static_cast<int>(ceil_div(length, kChunk));
  for (int chunk = 0; chunk < chunks; ++chunk) {
    __syncthreads();  // `state` holds the state entering this chunk (written by thread 0 of the previous one)
    for (int n = threadIdx.x; n < n_state; n += kThreads) saved[(row * n_state + n) * chunks + chunk] = state[n];
    const int64 first = static_cast<int64>(chunk) * kChunk + threadIdx.x * kItems;
    float u_in[kItems], raw[kItems], dt[kItems], y[kItems];
    load_run<kItems>(u_row, first, length, 0.f, u_in);
    load_steps<kItems>(delta_row, first, length, bias, softplus_dt, raw, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) y[i] = 0.f;
    for (int n = 0; n < n_state; ++n) {
      float b_in[kItems], c_in[kItems], gate[kItems];
      load_run<kItems>(B_rows + n * stride_B_n, first, length, 0.f, b_in);
      load_run<kItems>(C_rows + n * stride_C_n, first, length, 0.f, c_in);
      Affine mine = Affine::identity();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        gate[i] = exp2f(dt[i] * a_log2[n]);
        b_in[i] *= dt[i] * u_in[i];  // b_in now holds x = dt B u
        mine = compose(mine, Affine{gate[i], b_in[i]});
      }
      const float entering = state[n];  // read before the scan's barrier; thread 0 overwrites it after
      Affine total;
      const Affine before = block_exclusive_scan<kThreads>(mine, false, warp_totals, total);
      float h = before.apply(entering);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = gate[i] * h + b_in[i];
        y[i] += c_in[i] * h;
      }
      if (threadIdx.x == 0) state[n] = total.apply(entering);
    }
    if (z != nullptr) {
      float z_in[kItems];
      load_run<kItems>(z + b * stride_z_b + d * stride_z_d, first, length, 0.f, z_in);
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] = (y[i] + skip * u_in[i]) * z_in[i] * sigmoid(z_in[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] += skip * u_in[i];
    }
    store_run<kItems>(out_row, first, length, y);
  }
  __syncthreads();
  for (int n = threadIdx.x; n < n_state; n += kThreads) last_state[row * n_state + n] = state[n];
}

template <int kThreads, int kItems, typename input_t, typename weight_t>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(
    // the forward pass's inputs (as there) and what it saved; dout [B, D, L] (unit time stride), dlast [B, D, N]
    // fp32 contiguous or null
    const input_t* __restrict__ dout, const float* __restrict__ dlast, const input_t* __restrict__ u,
    const input_t* __restrict__ delta, const float* __restrict__ A, const weight_t* __restrict__ B,
    const weight_t* __restrict__ C, const float* __restrict__ D, const input_t* __restrict__ z,
    const float* __restrict__ delta_bias, const float* __restrict__ saved,
    // gradients: du, ddelta, dz [B, D, L] contiguous (dz null without z); dB, dC [B, G, N, L] fp32 contiguous and
    // zeroed (summed over channels with atomics); dA_part [B, D, N], dD_part and dbias_part [B, D] fp32 (summed over
    // the batch by the launcher); dinitial [B, D, N] fp32 or null
    input_t* __restrict__ du, input_t* __restrict__ ddelta, input_t* __restrict__ dz, float* __restrict__ dB,
    float* __restrict__ dC, float* __restrict__ dA_part, float* __restrict__ dD_part, float* __restrict__ dbias_part,
    float* __restrict__ dinitial,
    // strides (elements)
    int64 stride_dout_b, int64 stride_dout_d, int64 stride_u_b, int64 stride_u_d, int64 stride_delta_b,
    int64 stride_delta_d, int64 stride_z_b, int64 stride_z_d, int64 stride_B_b, int64 stride_B_g, int64 stride_B_n,
    int64 stride_C_b, int64 stride_C_g, int64 stride_C_n,
    // sizes and switches
    int dim, int n_groups, int n_state, int length, int softplus_dt) {
  constexpr int kChunk = kThreads * kItems;
  __shared__ Affine warp_totals[kThreads / 32];
  __shared__ float scratch[kThreads / 32];
  float* a_row = dynamic_shared_memory<float>();  // [N] A[d, n]
  float* mu = a_row + n_state;                     // [N] the adjoint entering the current chunk from its end
  float* dA_sum = mu + n_state;                    // [N] dA of this (batch, channel), summed over chunks
  float* regroup_B = dA_sum + n_state;             // [kChunk] dB of the chunk, regrouped for the atomics
  float* regroup_C = regroup_B + kChunk;           // [kChunk] dC likewise

  const int64 b = blockIdx.x / dim;
  const int64 d = blockIdx.x % dim;
  const int64 g = d / (dim / n_groups);
  const int64 row = b * dim + d;
  for (int n = threadIdx.x; n < n_state; n += kThreads) {
    a_row[n] = A[d * n_state + n];
    mu[n] = dlast != nullptr ? dlast[row * n_state + n] : 0.f;
    dA_sum[n] = 0.f;
  }
  const float bias = delta_bias != nullptr ? delta_bias[d] : 0.f;
  const float skip = D != nullptr ? D[d] : 0.f;
  const input_t* u_row = u + b * stride_u_b + d * stride_u_d;
  const input_t* delta_row = delta + b * stride_delta_b + d * stride_delta_d;
  const input_t* dout_row = dout + b * stride_dout_b + d * stride_dout_d;
  const weight_t* B_rows = B + b * stride_B_b + g * stride_B_g;
  const weight_t* C_rows = C + b * stride_C_b + g * stride_C_g;
  float* dB_rows = dB + (b * n_groups + g) * n_state * length;
  float* dC_rows = dC + (b * n_groups + g) * n_state * length;
  float dD_local = 0.f, dbias_local = 0.f;

  const int chunks = static_cast<int>(ceil_div(length, kChunk));
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    __syncthreads();  // mu and dA_sum hold what the later chunk left
    const int64 first = static_cast<int64>(chunk) * kChunk + threadIdx.x * kItems;
    float u_in[kItems], raw[kItems], dt[kItems], g_out[kItems], dy[kItems], z_in[kItems];
    load_run<kItems>(u_row, first, length, 0.f, u_in);
    load_steps<kItems>(delta_row, first, length, bias, softplus_dt, raw, dt);
    load_run<kItems>(dout_row, first, length, 0.f, g_out);
    if (z != nullptr) {
      load_run<kItems>(z + b * stride_z_b + d * stride_z_d, first, length, 0.f, z_in);
#pragma unroll
      for (int i = 0; i < kItems; ++i) dy[i] = g_out[i] * z_in[i] * sigmoid(z_in[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) dy[i] = g_out[i];
    }
    float du_acc[kItems], ddt_acc[kItems], y_acc[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) du_acc[i] = ddt_acc[i] = y_acc[i] = 0.f;

    for (int n = 0; n < n_state; ++n) {
      const float a = a_row[n];
      const float a_log2 = a * kLog2e;  // as the forward pass computes the gates
      float b_in[kItems], c_in[kItems], gate[kItems], x[kItems], h_prev[kItems];
      load_run<kItems>(B_rows + n * stride_B_n, first, length, 0.f, b_in);
      load_run<kItems>(C_rows + n * stride_C_n, first, length, 0.f, c_in);
      // the chunk's states again, from the state saved at its start
      Affine forward = Affine::identity();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        gate[i] = exp2f(dt[i] * a_log2);
        x[i] = dt[i] * u_in[i] * b_in[i];
        forward = compose(forward, Affine{gate[i], x[i]});
      }
      const float entering_state = saved[(row * n_state + n) * chunks + chunk];
      Affine total;
      const Affine before = block_exclusive_scan<kThreads>(forward, false, warp_totals, total);
      float h = before.apply(entering_state);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h_prev[i] = h;
        h = gate[i] * h + x[i];
      }
      // the adjoint, last step first: mu_t = gate_t (C_t dy_t + mu_{t+1})
      Affine backward = Affine::identity();
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = kItems - 1 - j;
        backward = compose(backward, Affine{gate[i], gate[i] * c_in[i] * dy[i]});
      }
      const float entering_adjoint = mu[n];  // read before the scan's barrier; thread 0 overwrites it after
      const Affine later = block_exclusive_scan<kThreads>(backward, true, warp_totals, total);
      float m = later.apply(entering_adjoint);
      float dA_local = 0.f;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = kItems - 1 - j;
        const float lambda = c_in[i] * dy[i] + m;       // dL/dh_t
        const float h_i = gate[i] * h_prev[i] + x[i];
        const float q = lambda * gate[i] * h_prev[i];    // lambda_t exp(dt_t A) h_{t-1}
        dA_local += q * dt[i];
        ddt_acc[i] += lambda * b_in[i] * u_in[i] + q * a;
        du_acc[i] += lambda * b_in[i] * dt[i];
        y_acc[i] += c_in[i] * h_i;
        m = gate[i] * lambda;
        regroup_B[threadIdx.x * kItems + i] = lambda * dt[i] * u_in[i];
        regroup_C[threadIdx.x * kItems + i] = h_i * dy[i];
      }
      if (threadIdx.x == 0) mu[n] = total.apply(entering_adjoint);
      const float dA_chunk = block_sum<kThreads>(dA_local, scratch);  // its barriers also publish the regroup
      if (threadIdx.x == 0) dA_sum[n] += dA_chunk;
      // consecutive threads add consecutive steps (the next writes to regroup_* follow this state's barriers)
      const int64 chunk_start = static_cast<int64>(chunk) * kChunk;
      const int64 state_row = static_cast<int64>(n) * length + chunk_start;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int local = j * kThreads + threadIdx.x;
        if (chunk_start + local < length) {
          atomicAdd(dB_rows + state_row + local, regroup_B[local]);
          atomicAdd(dC_rows + state_row + local, regroup_C[local]);
        }
      }
    }

    float du_out[kItems], ddt_out[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool inside = first + i < length;
      du_out[i] = du_acc[i] + dy[i] * skip;
      dD_local += dy[i] * u_in[i];
      ddt_out[i] = inside ? ddt_acc[i] * (softplus_dt ? sigmoid(raw[i]) : 1.f) : 0.f;
      dbias_local += ddt_out[i];
    }
    store_run<kItems>(du + row * length, first, length, du_out);
    store_run<kItems>(ddelta + row * length, first, length, ddt_out);
    if (z != nullptr) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float s = sigmoid(z_in[i]);
        y_acc[i] = g_out[i] * (y_acc[i] + skip * u_in[i]) * s * (1.f + z_in[i] * (1.f - s));  // dz
      }
      store_run<kItems>(dz + row * length, first, length, y_acc);
    }
  }
  const float dD_total = block_sum<kThreads>(dD_local, scratch);
  const float dbias_total = block_sum<kThreads>(dbias_local, scratch);
  if (threadIdx.x == 0) {
    dD_part[row] = dD_total;
    dbias_part[row] = dbias_total;
  }
  for (int n = threadIdx.x; n < n_state; n += kThreads) {
    dA_part[row * n_state + n] = dA_sum[n];
    if (dinitial != nullptr) dinitial[row * n_state + n] = mu[n];
  }
}

}  // namespace flashops
