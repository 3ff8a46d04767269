// What every flashops CUDA kernel shares: element types and their conversions to fp32, loads and stores of a
// thread's run of consecutive items (16-byte vectors when the run is whole and aligned), the scan of affine maps
// h -> a h + b across a warp and a block, and block reductions.
//
// The files under csrc/cuda/ are plain CUDA C++ (no torch headers). flashops/_cuda.py compiles each one with
// NVRTC on first use for the device's architecture; template instances are named in the launchers
// (flashops/ops/*/cuda_*.py), and kernels take pointers, int64 strides, int sizes and float scalars only.

#pragma once

#ifndef FLASHOPS_CUDA_EMULATION  // tests/tools/cuda_emulator provides these types on the host
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace flashops {

using int64 = long long;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// ----------------------------------------------------------------------------------------- element types
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

#ifndef FLASHOPS_CUDA_EMULATION
// Dynamic shared memory of the launch (its size is the launch's shared-memory argument).
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char flashops_dynamic_shared[];
  return reinterpret_cast<T*>(flashops_dynamic_shared);
}
#endif

// ------------------------------------------------------------------------------------------ small math
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + exp2f(-x * kLog2e)); }

// log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|).
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(exp2f(-fabsf(x) * kLog2e)); }

__device__ __forceinline__ int64 ceil_div(int64 a, int64 b) { return (a + b - 1) / b; }

// std::conditional without the standard library (NVRTC has no default include path).
template <bool kFirst, typename A, typename B>
struct Choose {
  using type = A;
};
template <typename A, typename B>
struct Choose<false, A, B> {
  using type = B;
};

// ------------------------------------------------------------------------ runs of consecutive items
// A thread owns kItems consecutive positions of a row: row[first .. first + kItems). Positions outside
// [0, length) read as `fill` and are not written. Whole, 16-byte-aligned runs move as 16-byte vectors.
template <int kItems, typename T>
__device__ __forceinline__ bool vector_run(const T* row, int64 first, int64 length) {
  constexpr int kPerVector = 16 / sizeof(T);
  return kItems % kPerVector == 0 && first >= 0 && first + kItems <= length &&
         (reinterpret_cast<unsigned long long>(row + first) & 15ull) == 0;
}

template <int kItems, typename T>
__device__ __forceinline__ void load_run(const T* row, int64 first, int64 length, float fill, float (&out)[kItems]) {
  constexpr int kPerVector = 16 / sizeof(T);
  if (vector_run<kItems>(row, first, length)) {
    const uint4* vectors = reinterpret_cast<const uint4*>(row + first);
#pragma unroll
    for (int v = 0; v < kItems / kPerVector; ++v) {
      const uint4 raw = vectors[v];
      T values[kPerVector];
      memcpy(values, &raw, sizeof(raw));
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) out[v * kPerVector + j] = to_float(values[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64 p = first + i;
      out[i] = (p >= 0 && p < length) ? to_float(row[p]) : fill;
    }
  }
}

template <int kItems, typename T>
__device__ __forceinline__ void store_run(T* row, int64 first, int64 length, const float (&in)[kItems]) {
  constexpr int kPerVector = 16 / sizeof(T);
  if (vector_run<kItems>(row, first, length)) {
    uint4* vectors = reinterpret_cast<uint4*>(row + first);
#pragma unroll
    for (int v = 0; v < kItems / kPerVector; ++v) {
      T values[kPerVector];
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) values[j] = from_float<T>(in[v * kPerVector + j]);
      uint4 raw;
      memcpy(&raw, values, sizeof(raw));
      vectors[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64 p = first + i;
      if (p >= 0 && p < length) row[p] = from_float<T>(in[i]);
    }
  }
}

// Complex runs: (re, im) pairs interleaved in memory (torch.view_as_real), kWidth = 2 values per position.
template <int kItems, int kWidth, typename T>
__device__ __forceinline__ void load_pairs(const T* row, int64 first, int64 length, float fill_re, float fill_im,
                                           float (&re)[kItems], float (&im)[kItems]) {
  if constexpr (kWidth == 1) {
    load_run<kItems>(row, first, length, fill_re, re);
#pragma unroll
    for (int i = 0; i < kItems; ++i) im[i] = 0.f;
  } else {
    float flat[2 * kItems];
    load_run<2 * kItems>(row, 2 * first, 2 * length, 0.f, flat);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool inside = first + i >= 0 && first + i < length;
      re[i] = inside ? flat[2 * i] : fill_re;
      im[i] = inside ? flat[2 * i + 1] : fill_im;
    }
  }
}

template <int kItems, int kWidth, typename T>
__device__ __forceinline__ void store_pairs(T* row, int64 first, int64 length, const float (&re)[kItems],
                                            const float (&im)[kItems]) {
  if constexpr (kWidth == 1) {
    store_run<kItems>(row, first, length, re);
  } else {
    float flat[2 * kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      flat[2 * i] = re[i];
      flat[2 * i + 1] = im[i];
    }
    store_run<2 * kItems>(row, 2 * first, 2 * length, flat);
  }
}

// ------------------------------------------------------------------------------------------ affine maps
// h -> a h + b. compose(earlier, later) is the map that applies `earlier` first: (a1 a2, a2 b1 + b2).
struct Affine {
  float a, b;
  __device__ __forceinline__ static Affine identity() { return {1.f, 0.f}; }
  __device__ __forceinline__ float apply(float h) const { return a * h + b; }
};

__device__ __forceinline__ Affine compose(const Affine& earlier, const Affine& later) {
  return {earlier.a * later.a, later.a * earlier.b + later.b};
}

__device__ __forceinline__ Affine shuffle(const Affine& x, int lane) {
  return {__shfl_sync(kFullMask, x.a, lane), __shfl_sync(kFullMask, x.b, lane)};
}

// The complex version: a, b and h complex (re, im).
struct ComplexAffine {
  float ar, ai, br, bi;
  __device__ __forceinline__ static ComplexAffine identity() { return {1.f, 0.f, 0.f, 0.f}; }
};

__device__ __forceinline__ ComplexAffine compose(const ComplexAffine& e, const ComplexAffine& l) {
  return {e.ar * l.ar - e.ai * l.ai, e.ar * l.ai + e.ai * l.ar,  // a1 a2
          l.ar * e.br - l.ai * e.bi + l.br, l.ar * e.bi + l.ai * e.br + l.bi};  // a2 b1 + b2
}

__device__ __forceinline__ ComplexAffine shuffle(const ComplexAffine& x, int lane) {
  return {__shfl_sync(kFullMask, x.ar, lane), __shfl_sync(kFullMask, x.ai, lane),
          __shfl_sync(kFullMask, x.br, lane), __shfl_sync(kFullMask, x.bi, lane)};
}

// Exclusive scan of one map per thread across the block, in scan order: thread 0 first, or with `reverse`
// the last thread first. Returns the composition of the maps of the threads before this one (identity for the
// first) and sets `total` to the composition of all of them (the same in every thread). `warp_totals` is shared
// memory for kThreads / 32 maps; the scan synchronizes the block twice, so every thread must call it.
template <int kThreads, typename Map>
__device__ __forceinline__ Map block_exclusive_scan(Map x, bool reverse, Map* warp_totals, Map& total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int step = reverse ? -1 : 1;  // lane - step is the previous lane in scan order
  Map inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int source = lane - step * offset;
    const Map earlier = shuffle(inclusive, source & 31);
    if (source >= 0 && source < 32) inclusive = compose(earlier, inclusive);
  }
  const int previous = lane - step;
  Map exclusive = shuffle(inclusive, previous & 31);
  if (previous < 0 || previous >= 32) exclusive = Map::identity();
  if (lane == (reverse ? 0 : 31)) warp_totals[warp] = inclusive;
  __syncthreads();
  Map before = Map::identity();
  Map all = Map::identity();
#pragma unroll
  for (int k = 0; k < kWarps; ++k) {
    const int w = reverse ? kWarps - 1 - k : k;
    if (reverse ? w > warp : w < warp) before = compose(before, warp_totals[w]);
    all = compose(all, warp_totals[w]);
  }
  __syncthreads();  // warp_totals is free for the next scan
  total = all;
  return compose(before, exclusive);
}

// ----------------------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, returned to every thread; `scratch` is shared memory for kThreads / 32 floats. Two
// block synchronizations: every thread must call it.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int kWarps = kThreads / 32;
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

}  // namespace flashops
