// linear_scan: out_t = gate_t * out_{t-1} + x_t (or out_{t+1} when reversed) along the rows of [B, D, L] tensors,
// real (kWidth = 1) or complex (kWidth = 2: (re, im) pairs interleaved). One kernel serves both passes:
//
//   forward:  gate = a, x = b, out = h, carried from initial_state.
//   backward: the adjoint g_t = dh_t + conj(a_{t+1}) g_{t+1} is the same scan run the other way with the gate
//             read one step ahead (gate_shift = +1, or -1 for a reversed forward) and conjugated; with `dgate` it
//             also writes the gate gradient da_t = g_t conj(h_{t-1}), h_{t-1} read from `prev` (`prev_init` at
//             the scan's start). db = g is `out`.
//
// One block per row walks the row in chunks of kThreads * kItems positions, aligned at 0. A thread holds kItems
// consecutive positions: it composes their maps, a block-wide scan of the threads' maps (warp shuffles, then one
// map per warp) gives the map before each thread, and the state carried from the previous chunk enters through
// it. A reversed scan visits the chunks from the last and runs every scan in reverse thread order. Positions past
// the end are identity maps (gate 1, x 0), so a partial chunk needs no other care. Everything is fp32.

#include "common.cuh"

namespace flashops {

template <int kWidth, typename T>
__device__ __forceinline__ void load_state(const T* p, float& re, float& im) {
  re = to_float(p[0]);
  im = kWidth == 2 ? to_float(p[1]) : 0.f;
}

template <int kThreads, int kItems, typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) linear_scan_kernel(
    // pointers: [B, D, L] (x kWidth) rows with unit time stride; init / prev_init [B, D] (x kWidth); may be null
    const T* __restrict__ gate, const T* __restrict__ x, const T* __restrict__ init, T* __restrict__ out,
    const T* __restrict__ prev, const T* __restrict__ prev_init, T* __restrict__ dgate,
    // strides (elements) of the batch and channel dimensions
    int64 stride_gate_b, int64 stride_gate_d, int64 stride_x_b, int64 stride_x_d, int64 stride_init_b,
    int64 stride_init_d, int64 stride_out_b, int64 stride_out_d, int64 stride_prev_b, int64 stride_prev_d,
    int64 stride_prev_init_b, int64 stride_prev_init_d, int64 stride_dgate_b, int64 stride_dgate_d,
    // sizes and switches
    int dim, int length, int reverse, int gate_shift, int conj_gate) {
  constexpr bool kComplex = kWidth == 2;
  using Map = typename Choose<kComplex, ComplexAffine, Affine>::type;
  constexpr int kChunk = kThreads * kItems;
  __shared__ Map warp_totals[kThreads / 32];

  const int64 b = blockIdx.x / dim;
  const int64 d = blockIdx.x % dim;
  const T* gate_row = gate + b * stride_gate_b + d * stride_gate_d;
  const T* x_row = x + b * stride_x_b + d * stride_x_d;
  T* out_row = out + b * stride_out_b + d * stride_out_d;
  const bool grad_gate = dgate != nullptr;

  float carry_re = 0.f, carry_im = 0.f;
  if (init != nullptr) load_state<kWidth>(init + b * stride_init_b + d * stride_init_d, carry_re, carry_im);
  float start_re = 0.f, start_im = 0.f;  // the state before the scan's first step (for the gate gradient)
  if (grad_gate && prev_init != nullptr)
    load_state<kWidth>(prev_init + b * stride_prev_init_b + d * stride_prev_init_d, start_re, start_im);

  const int chunks = static_cast<int>(ceil_div(length, kChunk));
  for (int k = 0; k < chunks; ++k) {
    const int chunk = reverse ? chunks - 1 - k : k;
    const int64 first = static_cast<int64>(chunk) * kChunk + threadIdx.x * kItems;
    float g_re[kItems], g_im[kItems], v_re[kItems], v_im[kItems];
    // the gate of step t is gate[t + shift]: 0 where that is outside the row (nothing is carried in there)
    load_pairs<kItems, kWidth>(gate_row, first + gate_shift, length, 0.f, 0.f, g_re, g_im);
    load_pairs<kItems, kWidth>(x_row, first, length, 0.f, 0.f, v_re, v_im);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (first + i >= length) g_re[i] = 1.f;  // padding: identity (x is 0 there; g_im too)
      if (kComplex && conj_gate) g_im[i] = -g_im[i];
    }
    // the composition of this thread's maps, in scan order
    Map mine = Map::identity();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = reverse ? kItems - 1 - j : j;
      if constexpr (kComplex) {
        mine = compose(mine, ComplexAffine{g_re[i], g_im[i], v_re[i], v_im[i]});
      } else {
        mine = compose(mine, Affine{g_re[i], v_re[i]});
      }
    }
    Map total;
    const Map before = block_exclusive_scan<kThreads>(mine, reverse, warp_totals, total);
    // the state entering this thread's first step (in scan order), then its steps one by one; v becomes the states
    if constexpr (kComplex) {
      float h_re = before.ar * carry_re - before.ai * carry_im + before.br;
      float h_im = before.ar * carry_im + before.ai * carry_re + before.bi;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = reverse ? kItems - 1 - j : j;
        const float next_re = g_re[i] * h_re - g_im[i] * h_im + v_re[i];
        h_im = g_re[i] * h_im + g_im[i] * h_re + v_im[i];
        h_re = next_re;
        v_re[i] = h_re;
        v_im[i] = h_im;
      }
      const float next_re = total.ar * carry_re - total.ai * carry_im + total.br;
      carry_im = total.ar * carry_im + total.ai * carry_re + total.bi;
      carry_re = next_re;
    } else {
      float h = before.apply(carry_re);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = reverse ? kItems - 1 - j : j;
        h = g_re[i] * h + v_re[i];
        v_re[i] = h;
      }
      carry_re = total.apply(carry_re);
    }
    store_pairs<kItems, kWidth>(out_row, first, length, v_re, v_im);
    if (grad_gate) {
      // dgate_t = out_t * conj(prev[t - shift]); outside the row prev is the state before the scan's start
      float p_re[kItems], p_im[kItems];
      const T* prev_row = prev + b * stride_prev_b + d * stride_prev_d;
      load_pairs<kItems, kWidth>(prev_row, first - gate_shift, length, start_re, start_im, p_re, p_im);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if constexpr (kComplex) {
          const float r = v_re[i] * p_re[i] + v_im[i] * p_im[i];
          v_im[i] = v_im[i] * p_re[i] - v_re[i] * p_im[i];
          v_re[i] = r;
        } else {
          v_re[i] *= p_re[i];
        }
      }
      store_pairs<kItems, kWidth>(dgate + b * stride_dgate_b + d * stride_dgate_d, first, length, v_re, v_im);
    }
  }
}

}  // namespace flashops
