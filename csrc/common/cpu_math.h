// Branch-free float math for CPU kernels: written so that GCC and Clang vectorize loops that call it with the
// baseline instruction set (SSE2 on x86-64, NEON on arm64), without -ffast-math or -march flags.
// Double versions call the C library: fp64 runs are for accuracy checks, not speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace flashops::cpu {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x) within ~2 ulp. x = k ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2, so k ln2_hi is exact),
// e^r by its Taylor polynomial to degree 7 (truncation < 6e-9 relative), then scaled by 2^k. 2^k is applied
// as two normal powers of two, so results near the overflow threshold stay finite; below the smallest
// normal float (x < -87.33) the result is flushed to 0 (subnormal gates would only slow the recurrences).
// NaN propagates; +inf -> inf; -inf -> 0.
inline float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;      // 16 significant bits: k * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;  // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;              // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -88.0f ? -88.0f : (x > 89.0f ? 89.0f : x);  // NaN passes through unchanged
  const float shifted = xc * kLog2e + kRound;
  const int32_t k = float_to_bits(shifted) - float_to_bits(kRound);
  const float kf = shifted - kRound;
  const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k_half = k >> 1;
  const float scale_a = bits_to_float((k_half + 127) << 23);
  const float scale_b = bits_to_float((k - k_half + 127) << 23);
  const float result = p * scale_a * scale_b;
  return x < -87.33654f ? 0.0f : result;
}

inline double exp_approx(double x) { return std::exp(x); }

// log(1 + y) for y >= 0 (the only use: softplus), within a few ulp: m = 1 + y split as 2^e * f with
// f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(s) with s = (f - 1) / (f + 1), |s| < 0.172, by its odd series
// to s^9; the rounding error of 1 + y is added back as (y - (m - 1)) / m.
inline float log1p_nonneg(float y) {
  constexpr float kLn2 = 0.693147180559945309f;
  const float m = 1.0f + y;
  const int32_t bits = float_to_bits(m);
  // exponent of m, bumped by one when the mantissa is above sqrt(2) (0x3504f3 = mantissa bits of sqrt 2)
  const int32_t e = ((bits + (0x3f800000 - 0x3f3504f3)) >> 23) - 127;
  const float f = bits_to_float(bits - (e << 23));
  const float s = (f - 1.0f) / (f + 1.0f);
  const float s2 = s * s;
  float q = 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  const float correction = (y - (m - 1.0f)) / m;
  const float result = 2.0f * s * q + static_cast<float>(e) * kLn2 + correction;
  return y == std::numeric_limits<float>::infinity() ? y : result;
}

inline double log1p_nonneg(double y) { return std::log1p(y); }

// softplus as torch.nn.functional.softplus (beta 1, threshold 20): x above 20 is returned as is.
template <typename T>
inline T softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  const T pos = x > T(0) ? x : T(0);
  const T smooth = pos + log1p_nonneg(exp_approx(-ax));
  return x > T(20) ? x : smooth;
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

}  // namespace flashops::cpu
