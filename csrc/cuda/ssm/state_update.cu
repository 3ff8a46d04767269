// selective_state_update: one recurrent step of the selective scan, per (b, d) and state n:
//
//   dt = softplus(dt + dt_bias) (or without softplus);  s'_n = exp(dt A[d, n]) s_n + dt x B[n]
//   y  = (sum_n C[n] s'_n + D x) silu(z)
//
// and its backward. The state [B, D, N] is read once and written once. `lanes` consecutive threads (a power of
// two up to 32, within one warp) share a channel: lane j takes the states j, j + lanes, ..., so a warp reads
// consecutive addresses, and the sums over n are shuffle reductions inside the group. The backward writes its
// per-channel shares of dA (summed over the batch), dB and dC (summed over the channels of a group) for the
// launcher to add up (no atomics).

#include "common.cuh"

namespace flashops {

constexpr int kUpdateThreads = 128;

// Sum over the `lanes` threads of a channel group (every lane of the warp must call it).
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

struct Channel {
  bool active;
  int64 b, d, g, row;  // row = b * dim + d
  int lane;            // within the channel's group
};

__device__ __forceinline__ Channel channel_of_thread(int rows, int dim, int n_groups, int lanes) {
  const int64 index = (static_cast<int64>(blockIdx.x) * kUpdateThreads + threadIdx.x) / lanes;
  Channel c;
  c.active = index < rows;
  c.row = c.active ? index : 0;
  c.b = c.row / dim;
  c.d = c.row % dim;
  c.g = c.d / (dim / n_groups);
  c.lane = threadIdx.x % lanes;
  return c;
}

// sum_n C[n] s'_n over this lane's states (the group sums it), writing s'_n to new_state when that is not null.
template <typename weight_t>
__device__ __forceinline__ float readout(const Channel& c, int n_state, int lanes, float step, float x_in,
                                         const float* A, const float* s_row, const weight_t* B_row,
                                         const weight_t* C_row, float* new_state) {
  float partial = 0.f;
  for (int n = c.lane; n < n_state && c.active; n += lanes) {
    const float updated = exp2f(step * A[c.d * n_state + n] * kLog2e) * s_row[n] + step * x_in * to_float(B_row[n]);
    if (new_state != nullptr) new_state[c.row * n_state + n] = updated;
    partial += to_float(C_row[n]) * updated;
  }
  return partial;
}

template <typename input_t, typename weight_t>
__global__ void __launch_bounds__(kUpdateThreads) selective_state_update_fwd_kernel(
    // state [B, D, N] fp32 (unit state stride); x, dt, z [B, D]; A [D, N], D, dt_bias [D] fp32 contiguous;
    // B, C [B, G, N] (unit state stride). z, D and dt_bias may be null.
    const float* __restrict__ state, const input_t* __restrict__ x, const input_t* __restrict__ dt,
    const float* __restrict__ A, const weight_t* __restrict__ B, const weight_t* __restrict__ C,
    const float* __restrict__ D, const input_t* __restrict__ z, const float* __restrict__ dt_bias,
    // outputs: y [B, D] contiguous, new_state [B, D, N] fp32 contiguous
    input_t* __restrict__ y, float* __restrict__ new_state,
    // strides (elements)
    int64 stride_state_b, int64 stride_state_d, int64 stride_x_b, int64 stride_x_d, int64 stride_dt_b,
    int64 stride_dt_d, int64 stride_z_b, int64 stride_z_d, int64 stride_B_b, int64 stride_B_g, int64 stride_C_b,
    int64 stride_C_g,
    // sizes and switches
    int rows, int dim, int n_groups, int n_state, int lanes, int softplus_dt) {
  const Channel c = channel_of_thread(rows, dim, n_groups, lanes);
  float x_in = 0.f, step = 0.f;
  if (c.active) {
    x_in = to_float(x[c.b * stride_x_b + c.d * stride_x_d]);
    step = to_float(dt[c.b * stride_dt_b + c.d * stride_dt_d]) + (dt_bias != nullptr ? dt_bias[c.d] : 0.f);
    if (softplus_dt) step = softplus(step);
  }
  const float* s_row = state + c.b * stride_state_b + c.d * stride_state_d;
  const weight_t* B_row = B + c.b * stride_B_b + c.g * stride_B_g;
  const weight_t* C_row = C + c.b * stride_C_b + c.g * stride_C_g;
  const float total =
      group_sum(readout(c, n_state, lanes, step, x_in, A, s_row, B_row, C_row, new_state), lanes);
  if (c.active && c.lane == 0) {
    float out = total + (D != nullptr ? D[c.d] : 0.f) * x_in;
    if (z != nullptr) {
      const float gate = to_float(z[c.b * stride_z_b + c.d * stride_z_d]);
      out *= gate * sigmoid(gate);
    }
    y[c.row] = from_float<input_t>(out);
  }
}

template <typename input_t, typename weight_t>
__global__ void __launch_bounds__(kUpdateThreads) selective_state_update_bwd_kernel(
    // dy [B, D] contiguous, d_new_state [B, D, N] fp32 contiguous or null; the forward inputs as there
    const input_t* __restrict__ dy, const float* __restrict__ d_new_state, const float* __restrict__ state,
    const input_t* __restrict__ x, const input_t* __restrict__ dt, const float* __restrict__ A,
    const weight_t* __restrict__ B, const weight_t* __restrict__ C, const float* __restrict__ D,
    const input_t* __restrict__ z, const float* __restrict__ dt_bias,
    // gradients, contiguous: d_state [B, D, N] fp32; dx, ddt, dz [B, D] (dz null without z); per-channel shares
    // dA_part, dB_part, dC_part [B, D, N] and dD_part, dbias_part [B, D] fp32
    float* __restrict__ d_state, input_t* __restrict__ dx, input_t* __restrict__ ddt, input_t* __restrict__ dz,
    float* __restrict__ dA_part, float* __restrict__ dB_part, float* __restrict__ dC_part,
    float* __restrict__ dD_part, float* __restrict__ dbias_part,
    // strides (elements)
    int64 stride_state_b, int64 stride_state_d, int64 stride_x_b, int64 stride_x_d, int64 stride_dt_b,
    int64 stride_dt_d, int64 stride_z_b, int64 stride_z_d, int64 stride_B_b, int64 stride_B_g, int64 stride_C_b,
    int64 stride_C_g,
    // sizes and switches
    int rows, int dim, int n_groups, int n_state, int lanes, int softplus_dt) {
  const Channel c = channel_of_thread(rows, dim, n_groups, lanes);
  float x_in = 0.f, raw = 0.f, step = 0.f, g_out = 0.f, z_in = 0.f;
  if (c.active) {
    x_in = to_float(x[c.b * stride_x_b + c.d * stride_x_d]);
    raw = to_float(dt[c.b * stride_dt_b + c.d * stride_dt_d]) + (dt_bias != nullptr ? dt_bias[c.d] : 0.f);
    step = softplus_dt ? softplus(raw) : raw;
    g_out = to_float(dy[c.row]);
    if (z != nullptr) z_in = to_float(z[c.b * stride_z_b + c.d * stride_z_d]);
  }
  const float skip = c.active && D != nullptr ? D[c.d] : 0.f;
  const float* s_row = state + c.b * stride_state_b + c.d * stride_state_d;
  const weight_t* B_row = B + c.b * stride_B_b + c.g * stride_B_g;
  const weight_t* C_row = C + c.b * stride_C_b + c.g * stride_C_g;
  // y before the gate, for dz
  const float y0 = group_sum(readout(c, n_state, lanes, step, x_in, A, s_row, B_row, C_row,
                                     static_cast<float*>(nullptr)),
                             lanes) + skip * x_in;
  const float s = sigmoid(z_in);
  const float dy0 = z != nullptr ? g_out * z_in * s : g_out;  // dL/dy before the gate
  float d_step = 0.f, dx_partial = 0.f;
  for (int n = c.lane; n < n_state && c.active; n += lanes) {
    const float a = A[c.d * n_state + n];
    const float gate = exp2f(step * a * kLog2e);
    const float b_in = to_float(B_row[n]);
    const float updated = gate * s_row[n] + step * x_in * b_in;
    const float d_later = d_new_state != nullptr ? d_new_state[c.row * n_state + n] : 0.f;
    const float d_updated = dy0 * to_float(C_row[n]) + d_later;
    const int64 at = c.row * n_state + n;
    d_state[at] = gate * d_updated;
    dC_part[at] = dy0 * updated;
    dB_part[at] = d_updated * step * x_in;
    const float d_gate = d_updated * s_row[n] * gate;  // dL/d(dt A) through exp
    dA_part[at] = d_gate * step;
    d_step += d_gate * a + d_updated * b_in * x_in;
    dx_partial += d_updated * step * b_in;
  }
  d_step = group_sum(d_step, lanes);
  dx_partial = group_sum(dx_partial, lanes);
  if (c.active && c.lane == 0) {
    const float d_raw = softplus_dt ? d_step * sigmoid(raw) : d_step;
    dx[c.row] = from_float<input_t>(dx_partial + dy0 * skip);
    ddt[c.row] = from_float<input_t>(d_raw);
    dD_part[c.row] = dy0 * x_in;
    dbias_part[c.row] = d_raw;
    if (z != nullptr) dz[c.row] = from_float<input_t>(g_out * y0 * s * (1.f + z_in * (1.f - s)));
  }
}

}  // namespace flashops
