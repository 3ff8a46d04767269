// CPU kernels of the ssm scans (flashops/ops/ssm: linear_scan, selective_scan), forward and backward.
//
// A scan is sequential in time, so each recurrence is a chain of dependent multiply-adds. The kernels advance
// kLanes channels (rows) together: the innermost loop runs over those independent channels, which gives the
// CPU independent work per step (and SIMD lanes where the data allow). at::parallel_for splits the blocks of
// channels across threads. Everything is computed in fp32 (fp64 for fp64 inputs); fp16/bf16 are converted
// on load and store.
//
// The selective-scan backward recomputes the states of one segment of `spacing` steps at a time from the
// states the forward saved at the segment starts, so its temporaries are O(spacing * N) per channel block.
// dB and dC sum over the channels that share B and C: each thread accumulates into its own partial buffer
// (a fixed, contiguous range of channel blocks per thread), and the buffers are added in thread order
// afterwards, so the result does not depend on scheduling (no atomics, no races).

#include "scan_cpu.h"

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "../common/cpu_math.h"

namespace flashops::ssm {
namespace {

using cpu::exp_approx;

constexpr int kLanes = 8;
// Below this many scalar steps per parallel_for task, threads cost more than they bring.
constexpr int64_t kGrainSteps = 1 << 15;
// Forward tile of the selective scan: a multiple of every state spacing.
constexpr int64_t kForwardTile = 64;

// Mirrors state_spacing() in flashops/ops/ssm/common.py: the custom op's fake kernel derives the shape of the
// saved states from it, so every backend saves at the same spacing.
int64_t state_spacing(int64_t n_state) {
  int64_t block = 1;
  while (block < n_state) block <<= 1;
  return block <= 32 ? 32 : (block <= 64 ? 16 : 8);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "flashops cpp backend: ", name, " must be a CPU tensor, got ", t.device());
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Calls fn(first_row, n_rows, buffer) for blocks of kLanes consecutive rows (the last block may be shorter), in
// parallel; buffer: `buffer_size` scratch values of type T for the calling thread.
template <typename T, typename F>
void parallel_row_blocks(int64_t rows, int64_t steps_per_row, const F& fn, int64_t buffer_size) {
  const int64_t blocks = ceil_div(rows, kLanes);
  const int64_t grain = std::max<int64_t>(1, kGrainSteps / std::max<int64_t>(1, kLanes * steps_per_row));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(static_cast<size_t>(buffer_size));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = block * kLanes;
      fn(row0, std::min<int64_t>(kLanes, rows - row0), buffer.data());
    }
  });
}

// ----------------------------------------------------------------------------------------------- linear scan
// Consecutive rows are one row length apart (a multiple of 4 KiB for power-of-two lengths), so stepping a block
// of rows in lockstep straight from memory would make every access of a step fall into the same cache set.
// Instead each tile of kLinearTile steps is copied into lane-major buffers ([step][component][lane], contiguous
// in the lanes), the recurrences run there, and the results are copied back row by row.
constexpr int64_t kLinearTile = 128;

// Steps [first, first + count) of a row-major block of `rows` rows (kWidth values per step) to lane-major.
template <typename scalar_t, typename acc_t, int kWidth>
void gather_tile(const scalar_t* src, int64_t rows, int64_t length, int64_t first, int64_t count, acc_t* tile) {
  for (int64_t c = 0; c < kLanes; ++c) {
    if (c >= rows) {  // lanes past the block's rows run on zeros
      for (int64_t j = 0; j < count * kWidth; ++j) tile[j * kLanes + c] = acc_t(0);
      continue;
    }
    const scalar_t* row = src + (c * length + first) * kWidth;
    for (int64_t j = 0; j < count * kWidth; ++j) tile[j * kLanes + c] = static_cast<acc_t>(row[j]);
  }
}

template <typename scalar_t, typename acc_t, int kWidth>
void scatter_tile(const acc_t* tile, int64_t rows, int64_t length, int64_t first, int64_t count, scalar_t* dst) {
  for (int64_t c = 0; c < rows; ++c) {
    scalar_t* row = dst + (c * length + first) * kWidth;
    for (int64_t j = 0; j < count * kWidth; ++j) row[j] = static_cast<scalar_t>(tile[j * kLanes + c]);
  }
}

// The time range [first, first + count) of the tile that holds scan steps [s0, s0 + count).
int64_t tile_start(int64_t s0, int64_t count, int64_t length, bool reverse) {
  return reverse ? length - s0 - count : s0;
}

// h_t = a_t h_{t-1} + b_t (reverse: h_{t+1}) for a block of up to kLanes rows; kWidth = 2: (re, im) pairs.
template <typename scalar_t, typename acc_t, int kWidth>
void linear_scan_block_fwd(const scalar_t* a, const scalar_t* b, const scalar_t* h0, scalar_t* out, int64_t rows,
                           int64_t length, bool reverse, acc_t* buffer) {
  acc_t* __restrict ta = buffer;
  acc_t* __restrict tb = buffer + kLinearTile * kWidth * kLanes;  // b in, states out
  acc_t re[kLanes], im[kLanes];
  for (int c = 0; c < kLanes; ++c) {
    re[c] = (h0 && c < rows) ? static_cast<acc_t>(h0[c * kWidth]) : acc_t(0);
    im[c] = (kWidth == 2 && h0 && c < rows) ? static_cast<acc_t>(h0[c * kWidth + kWidth - 1]) : acc_t(0);
  }
  for (int64_t s0 = 0; s0 < length; s0 += kLinearTile) {
    const int64_t count = std::min(kLinearTile, length - s0), first = tile_start(s0, count, length, reverse);
    gather_tile<scalar_t, acc_t, kWidth>(a, rows, length, first, count, ta);
    gather_tile<scalar_t, acc_t, kWidth>(b, rows, length, first, count, tb);
    for (int64_t step = 0; step < count; ++step) {
      const int64_t j = (reverse ? count - 1 - step : step) * kWidth * kLanes;
      if constexpr (kWidth == 2) {
        for (int c = 0; c < kLanes; ++c) {
          const acc_t ar = ta[j + c], ai = ta[j + kLanes + c];
          const acc_t nr = ar * re[c] - ai * im[c] + tb[j + c];
          const acc_t ni = ar * im[c] + ai * re[c] + tb[j + kLanes + c];
          re[c] = tb[j + c] = nr;
          im[c] = tb[j + kLanes + c] = ni;
        }
      } else {
        for (int c = 0; c < kLanes; ++c) re[c] = tb[j + c] = ta[j + c] * re[c] + tb[j + c];
      }
    }
    scatter_tile<scalar_t, acc_t, kWidth>(tb, rows, length, first, count, out);
  }
}

// The adjoint runs against the scan: g_t = dh_t + conj(a_next) g_next, db_t = g_t, da_t = g_t conj(h_prev),
// d initial_state = conj(a_first) g_first ("next" / "prev": the neighbouring steps in scan order).
template <typename scalar_t, typename acc_t, int kWidth>
void linear_scan_block_bwd(const scalar_t* dh, const scalar_t* a, const scalar_t* h, const scalar_t* h0,
                           scalar_t* da, scalar_t* db, scalar_t* dh0, int64_t rows, int64_t length, bool reverse,
                           acc_t* buffer) {
  const int64_t tile = kLinearTile * kWidth * kLanes;
  acc_t* __restrict tg = buffer;             // dh in, g out (= db)
  acc_t* __restrict ta = buffer + tile;      // a
  acc_t* __restrict tp = buffer + 2 * tile;  // previous states in, da out
  acc_t gr[kLanes] = {}, gi[kLanes] = {}, nr[kLanes] = {}, ni[kLanes] = {};
  const int64_t tiles = ceil_div(length, kLinearTile);
  for (int64_t k = tiles - 1; k >= 0; --k) {
    const int64_t s0 = k * kLinearTile;
    const int64_t count = std::min(kLinearTile, length - s0), first = tile_start(s0, count, length, reverse);
    gather_tile<scalar_t, acc_t, kWidth>(dh, rows, length, first, count, tg);
    gather_tile<scalar_t, acc_t, kWidth>(a, rows, length, first, count, ta);
    // previous states: h one step earlier in scan order (time t - 1, or t + 1 when reversed); at the start of
    // the scan that is h0 (0 without one). Gather the shifted range, clipped to [0, length), then fill the ends.
    const int64_t shift = reverse ? 1 : -1;
    const int64_t lo = std::max<int64_t>(first + shift, 0), hi = std::min(first + shift + count, length);
    for (int64_t c = 0; c < kLanes; ++c) {
      for (int64_t j = 0; j < count * kWidth; ++j) tp[j * kLanes + c] = acc_t(0);
      if (c >= rows) continue;
      const scalar_t* row = h + (c * length + lo) * kWidth;
      acc_t* dst = tp + (lo - first - shift) * kWidth * kLanes + c;
      for (int64_t j = 0; j < (hi - lo) * kWidth; ++j) dst[j * kLanes] = static_cast<acc_t>(row[j]);
      if (h0 && hi - lo < count) {  // the step before the scan's first step
        const int64_t j = first + shift < 0 ? 0 : count - 1;
        for (int w = 0; w < kWidth; ++w) tp[(j * kWidth + w) * kLanes + c] = static_cast<acc_t>(h0[c * kWidth + w]);
      }
    }
    for (int64_t step = count - 1; step >= 0; --step) {
      const int64_t j = (reverse ? count - 1 - step : step) * kWidth * kLanes;
      if constexpr (kWidth == 2) {
        for (int c = 0; c < kLanes; ++c) {
          const acc_t g_re = tg[j + c] + (nr[c] * gr[c] + ni[c] * gi[c]);
          const acc_t g_im = tg[j + kLanes + c] + (nr[c] * gi[c] - ni[c] * gr[c]);
          const acc_t pr = tp[j + c], pi = tp[j + kLanes + c];
          tg[j + c] = gr[c] = g_re;
          tg[j + kLanes + c] = gi[c] = g_im;
          tp[j + c] = g_re * pr + g_im * pi;
          tp[j + kLanes + c] = g_im * pr - g_re * pi;
          nr[c] = ta[j + c];
          ni[c] = ta[j + kLanes + c];
        }
      } else {
        for (int c = 0; c < kLanes; ++c) {
          gr[c] = tg[j + c] = tg[j + c] + nr[c] * gr[c];
          tp[j + c] = gr[c] * tp[j + c];
          nr[c] = ta[j + c];
        }
      }
    }
    scatter_tile<scalar_t, acc_t, kWidth>(tg, rows, length, first, count, db);
    scatter_tile<scalar_t, acc_t, kWidth>(tp, rows, length, first, count, da);
  }
  if (dh0) {
    for (int64_t c = 0; c < rows; ++c) {
      dh0[c * kWidth] = static_cast<scalar_t>(nr[c] * gr[c] + ni[c] * gi[c]);
      if constexpr (kWidth == 2) dh0[c * kWidth + 1] = static_cast<scalar_t>(nr[c] * gi[c] - ni[c] * gr[c]);
    }
  }
}

void check_linear(const at::Tensor& a, const at::Tensor& b) {
  check_cpu(a, "a");
  check_cpu(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
              "flashops cpp backend: a and b must have the same shape and dtype, got ", a.sizes(), " ",
              a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(b.dim() == 3 || (b.dim() == 4 && b.size(3) == 2),
              "flashops cpp backend: linear_scan takes [B, D, L] or [B, D, L, 2], got ", b.sizes());
}

}  // namespace

at::Tensor linear_scan_fwd(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& initial_state,
                           bool reverse) {
  check_linear(a, b);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor h0 = initial_state ? initial_state->to(b.scalar_type()).contiguous() : at::Tensor();
  at::Tensor out = at::empty(b.sizes(), b.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = b.size(0) * b.size(1), length = b.size(2);
  const bool pairs = b.dim() == 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "flashops_linear_scan_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = ac.const_data_ptr<scalar_t>();
    const scalar_t* pb = bc.const_data_ptr<scalar_t>();
    const scalar_t* ph0 = ptr_or_null<scalar_t>(h0);
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto width) {
      constexpr int w = decltype(width)::value;
      parallel_row_blocks<acc_t>(rows, length, [&](int64_t row0, int64_t n_rows, acc_t* buffer) {
        const int64_t at_row = row0 * length * w;
        linear_scan_block_fwd<scalar_t, acc_t, w>(pa + at_row, pb + at_row, ph0 ? ph0 + row0 * w : nullptr,
                                                  po + at_row, n_rows, length, reverse, buffer);
      }, 2 * kLinearTile * w * kLanes);
    };
    if (pairs) {
      run(std::integral_constant<int, 2>());
    } else {
      run(std::integral_constant<int, 1>());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> linear_scan_bwd(
    const at::Tensor& dh, const at::Tensor& a, const at::Tensor& h, const std::optional<at::Tensor>& initial_state,
    bool reverse) {
  check_linear(a, h);
  check_cpu(dh, "dh");
  TORCH_CHECK(dh.sizes() == h.sizes(), "flashops cpp backend: dh must have h's shape ", h.sizes(), ", got ",
              dh.sizes());
  const at::Tensor dhc = dh.to(a.scalar_type()).contiguous(), ac = a.contiguous(), hc = h.contiguous();
  const at::Tensor h0 = initial_state ? initial_state->to(a.scalar_type()).contiguous() : at::Tensor();
  at::Tensor da = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor db = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dh0 = h0.defined() ? at::empty(h0.sizes(), h0.options()) : at::Tensor();
  const int64_t rows = a.size(0) * a.size(1), length = a.size(2);
  const bool pairs = a.dim() == 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "flashops_linear_scan_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdh = dhc.const_data_ptr<scalar_t>();
    const scalar_t* pa = ac.const_data_ptr<scalar_t>();
    const scalar_t* ph = hc.const_data_ptr<scalar_t>();
    const scalar_t* ph0 = ptr_or_null<scalar_t>(h0);
    scalar_t* pda = da.mutable_data_ptr<scalar_t>();
    scalar_t* pdb = db.mutable_data_ptr<scalar_t>();
    scalar_t* pdh0 = dh0.defined() ? dh0.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto width) {
      constexpr int w = decltype(width)::value;
      parallel_row_blocks<acc_t>(rows, length, [&](int64_t row0, int64_t n_rows, acc_t* buffer) {
        const int64_t at_row = row0 * length * w;
        linear_scan_block_bwd<scalar_t, acc_t, w>(pdh + at_row, pa + at_row, ph + at_row,
                                                  ph0 ? ph0 + row0 * w : nullptr, pda + at_row, pdb + at_row,
                                                  pdh0 ? pdh0 + row0 * w : nullptr, n_rows, length, reverse, buffer);
      }, 3 * kLinearTile * w * kLanes);
    };
    if (pairs) {
      run(std::integral_constant<int, 2>());
    } else {
      run(std::integral_constant<int, 1>());
    }
  });
  std::optional<at::Tensor> dh0_out;
  if (dh0.defined()) dh0_out = dh0.to(initial_state->scalar_type());
  return {da, db, dh0_out};
}

// -------------------------------------------------------------------------------------------- selective scan
namespace {

// Problem sizes and the work split: a task is one block of up to kLanes channels of one (batch, group); the
// channels of a block share B and C.
struct SelectiveShape {
  int64_t batch, dim, length, n_state, groups, dim_per_group, blocks_per_group, spacing, n_saved;

  int64_t tasks() const { return batch * groups * blocks_per_group; }
  int64_t batch_group(int64_t task) const { return task / blocks_per_group; }
  int64_t first_channel(int64_t task) const {
    return (batch_group(task) % groups) * dim_per_group + (task % blocks_per_group) * kLanes;
  }
  int64_t lanes(int64_t task) const {
    return std::min<int64_t>(kLanes, dim_per_group - (task % blocks_per_group) * kLanes);
  }
};

SelectiveShape selective_shape(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B) {
  SelectiveShape s{};
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.length = u.size(2);
  s.n_state = A.size(1);
  s.groups = B.dim() == 4 ? B.size(1) : 1;
  TORCH_CHECK(s.groups > 0 && s.dim % s.groups == 0, "flashops cpp backend: groups ", s.groups,
              " must divide D=", s.dim);
  s.dim_per_group = s.dim / s.groups;
  s.blocks_per_group = ceil_div(s.dim_per_group, kLanes);
  s.spacing = state_spacing(s.n_state);
  s.n_saved = ceil_div(s.length, s.spacing);
  return s;
}

// Float inputs of the selective scan, converted: sequences in scalar_t, everything else in acc_t.
template <typename scalar_t, typename acc_t>
struct SelectiveInputs {
  const scalar_t *u, *delta, *z;
  const acc_t *A, *B, *C, *skip, *bias, *h0;  // B, C: [batch, groups, N, L]; skip: the D vector
  bool softplus;
};

// Loads the per-step values of one block of channels for steps [t0, t0 + steps) into lane-major tiles
// ([step][lane]; lanes past the block's channels are zeros, which keeps them inert): u, raw = delta + bias,
// dt, dt * u, and optionally z. Also B and C of the steps, step-major ([step][state]).
template <typename scalar_t, typename acc_t>
struct StepTiles {
  acc_t *u, *raw, *dt, *dtu, *z, *B, *C;

  void load(const SelectiveInputs<scalar_t, acc_t>& in, const SelectiveShape& s, int64_t b, int64_t channel0,
            int64_t lanes, int64_t t0, int64_t steps) const {
    const int64_t group = channel0 / s.dim_per_group;
    const acc_t* Bg = in.B + (b * s.groups + group) * s.n_state * s.length + t0;
    const acc_t* Cg = in.C + (b * s.groups + group) * s.n_state * s.length + t0;
    for (int64_t n = 0; n < s.n_state; ++n) {
      for (int64_t t = 0; t < steps; ++t) {
        B[t * s.n_state + n] = Bg[n * s.length + t];
        C[t * s.n_state + n] = Cg[n * s.length + t];
      }
    }
    for (int64_t c = 0; c < kLanes; ++c) {
      const bool live = c < lanes;
      const int64_t row = ((b * s.dim) + channel0 + c) * s.length + t0;
      const acc_t bias = (live && in.bias) ? in.bias[channel0 + c] : acc_t(0);
      for (int64_t t = 0; t < steps; ++t) {
        u[t * kLanes + c] = live ? static_cast<acc_t>(in.u[row + t]) : acc_t(0);
        raw[t * kLanes + c] = live ? static_cast<acc_t>(in.delta[row + t]) + bias : acc_t(0);
        if (z) z[t * kLanes + c] = live ? static_cast<acc_t>(in.z[row + t]) : acc_t(0);
      }
    }
    if (in.softplus) {
      for (int64_t i = 0; i < steps * kLanes; ++i) dt[i] = cpu::softplus(raw[i]);
    } else {
      for (int64_t i = 0; i < steps * kLanes; ++i) dt[i] = raw[i];
    }
    for (int64_t i = 0; i < steps * kLanes; ++i) dtu[i] = dt[i] * u[i];
  }
};

// Carves named arrays out of one allocation per thread.
template <typename T>
class Arena {
 public:
  explicit Arena(int64_t size) : storage_(static_cast<size_t>(size)) {}
  void reset() { used_ = 0; }
  T* take(int64_t n) {
    T* p = storage_.data() + used_;
    used_ += n;
    TORCH_INTERNAL_ASSERT(used_ <= static_cast<int64_t>(storage_.size()));
    return p;
  }

 private:
  std::vector<T> storage_;
  int64_t used_ = 0;
};

template <typename scalar_t, typename acc_t>
void selective_forward_task(const SelectiveInputs<scalar_t, acc_t>& in, const SelectiveShape& s, int64_t task,
                            Arena<acc_t>& arena, scalar_t* out, acc_t* last, acc_t* saved) {
  const int64_t N = s.n_state, T = kForwardTile;
  const int64_t b = s.batch_group(task) / s.groups, channel0 = s.first_channel(task), lanes = s.lanes(task);
  acc_t* __restrict h = arena.take(N * kLanes);
  acc_t* __restrict A = arena.take(N * kLanes);
  acc_t* __restrict y = arena.take(T * kLanes);
  StepTiles<scalar_t, acc_t> tile{arena.take(T * kLanes), arena.take(T * kLanes), arena.take(T * kLanes),
                                  arena.take(T * kLanes),  in.z ? arena.take(T * kLanes) : nullptr,
                                  arena.take(T * N),       arena.take(T * N)};
  acc_t skip[kLanes] = {};
  for (int64_t c = 0; c < lanes; ++c) skip[c] = in.skip ? in.skip[channel0 + c] : acc_t(0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < kLanes; ++c) {
      const bool live = c < lanes;
      const int64_t channel = channel0 + c;
      A[n * kLanes + c] = live ? in.A[channel * N + n] : acc_t(0);
      h[n * kLanes + c] = (live && in.h0) ? in.h0[(b * s.dim + channel) * N + n] : acc_t(0);
    }
  }
  for (int64_t t0 = 0; t0 < s.length; t0 += T) {
    const int64_t steps = std::min(T, s.length - t0);
    tile.load(in, s, b, channel0, lanes, t0, steps);
    for (int64_t t = 0; t < steps; ++t) {
      if ((t0 + t) % s.spacing == 0) {
        const int64_t k = (t0 + t) / s.spacing;
        for (int64_t c = 0; c < lanes; ++c) {
          for (int64_t n = 0; n < N; ++n) saved[((b * s.dim + channel0 + c) * N + n) * s.n_saved + k] = h[n * kLanes + c];
        }
      }
      const acc_t* __restrict dt = tile.dt + t * kLanes;
      const acc_t* __restrict dtu = tile.dtu + t * kLanes;
      acc_t* __restrict yt = y + t * kLanes;
      for (int c = 0; c < kLanes; ++c) yt[c] = acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        const acc_t bn = tile.B[t * N + n], cn = tile.C[t * N + n];
        acc_t* __restrict hn = h + n * kLanes;
        const acc_t* __restrict an = A + n * kLanes;
        for (int c = 0; c < kLanes; ++c) {
          hn[c] = exp_approx(dt[c] * an[c]) * hn[c] + dtu[c] * bn;
          yt[c] += hn[c] * cn;
        }
      }
    }
    // y + D u, gated by silu(z), in place (lane-major), then written row by row
    for (int64_t t = 0; t < steps; ++t) {
      acc_t* __restrict yt = y + t * kLanes;
      const acc_t* __restrict ut = tile.u + t * kLanes;
      for (int c = 0; c < kLanes; ++c) yt[c] += skip[c] * ut[c];
      if (in.z) {
        const acc_t* __restrict zt = tile.z + t * kLanes;
        for (int c = 0; c < kLanes; ++c) yt[c] *= zt[c] * cpu::sigmoid(zt[c]);
      }
    }
    for (int64_t c = 0; c < lanes; ++c) {
      scalar_t* out_row = out + (b * s.dim + channel0 + c) * s.length + t0;
      for (int64_t t = 0; t < steps; ++t) out_row[t] = static_cast<scalar_t>(y[t * kLanes + c]);
    }
  }
  for (int64_t c = 0; c < lanes; ++c) {
    for (int64_t n = 0; n < N; ++n) last[(b * s.dim + channel0 + c) * N + n] = h[n * kLanes + c];
  }
}

int64_t forward_arena_size(const SelectiveShape& s) { return s.n_state * kLanes * 2 + kForwardTile * (kLanes * 6 + s.n_state * 2); }

int64_t backward_arena_size(const SelectiveShape& s) {
  const int64_t S = s.spacing, N = s.n_state;
  return N * kLanes * 3                  // A, mu, dA
         + S * N * 2                     // B, C tiles
         + S * kLanes * 11               // per-step lane tiles
         + (S + 1) * N * kLanes          // states
         + S * N * kLanes * 3;           // gates, dB and dC per lane
}

// Gradient buffers one task writes to: its rows of the per-batch partials, and the dB / dC partial sums of the
// thread (indexed by batch-group relative to the thread's first one).
template <typename scalar_t, typename acc_t>
struct SelectiveGrads {
  const scalar_t* dout;
  const acc_t *dlast, *saved;
  scalar_t *du, *ddelta, *dz;
  acc_t *dA, *dskip, *dbias, *dh0;  // dA [batch, D, N], dskip / dbias [batch, D]: summed over batch later
};

template <typename scalar_t, typename acc_t>
void selective_backward_task(const SelectiveInputs<scalar_t, acc_t>& in, const SelectiveGrads<scalar_t, acc_t>& gr,
                             const SelectiveShape& s, int64_t task, Arena<acc_t>& arena, acc_t* dB_part,
                             acc_t* dC_part) {
  const int64_t N = s.n_state, S = s.spacing;
  const int64_t b = s.batch_group(task) / s.groups, channel0 = s.first_channel(task), lanes = s.lanes(task);
  acc_t* __restrict A = arena.take(N * kLanes);
  acc_t* __restrict mu = arena.take(N * kLanes);  // exp(dt_{t+1} A) lambda_{t+1}: the adjoint carried back
  acc_t* __restrict dA = arena.take(N * kLanes);
  StepTiles<scalar_t, acc_t> tile{arena.take(S * kLanes), arena.take(S * kLanes), arena.take(S * kLanes),
                                  arena.take(S * kLanes), arena.take(S * kLanes), arena.take(S * N),
                                  arena.take(S * N)};
  acc_t* __restrict dout = arena.take(S * kLanes);
  acc_t* __restrict dy = arena.take(S * kLanes);
  acc_t* __restrict du = arena.take(S * kLanes);
  acc_t* __restrict ddt = arena.take(S * kLanes);
  acc_t* __restrict dz = arena.take(S * kLanes);
  acc_t* __restrict lam_b = arena.take(S * kLanes);  // sum_n lambda B (per step and lane)
  acc_t* __restrict states = arena.take((S + 1) * N * kLanes);  // states[t + 1] = h after step t of the segment
  acc_t* __restrict gates = arena.take(S * N * kLanes);
  acc_t* __restrict dB_lane = arena.take(S * N * kLanes);
  acc_t* __restrict dC_lane = arena.take(S * N * kLanes);
  acc_t dskip[kLanes] = {}, dbias[kLanes] = {}, skip[kLanes] = {};
  bool z_present = in.z != nullptr;
  if (!z_present) tile.z = nullptr;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < kLanes; ++c) {
      const bool live = c < lanes;
      const int64_t channel = channel0 + c;
      A[n * kLanes + c] = live ? in.A[channel * N + n] : acc_t(0);
      mu[n * kLanes + c] = (live && gr.dlast) ? gr.dlast[(b * s.dim + channel) * N + n] : acc_t(0);
      dA[n * kLanes + c] = acc_t(0);
    }
  }
  for (int64_t c = 0; c < lanes; ++c) skip[c] = in.skip ? in.skip[channel0 + c] : acc_t(0);

  for (int64_t k = s.n_saved - 1; k >= 0; --k) {
    const int64_t t0 = k * S, steps = std::min(S, s.length - t0);
    tile.load(in, s, b, channel0, lanes, t0, steps);
    for (int64_t c = 0; c < kLanes; ++c) {
      const int64_t row = (b * s.dim + channel0 + c) * s.length + t0;
      for (int64_t t = 0; t < steps; ++t) {
        dout[t * kLanes + c] = c < lanes ? static_cast<acc_t>(gr.dout[row + t]) : acc_t(0);
      }
      for (int64_t n = 0; n < N; ++n) {
        states[n * kLanes + c] = c < lanes ? gr.saved[((b * s.dim + channel0 + c) * N + n) * s.n_saved + k] : acc_t(0);
      }
    }
    // recompute the segment's gates and states from its saved start
    for (int64_t t = 0; t < steps; ++t) {
      const acc_t* __restrict dt = tile.dt + t * kLanes;
      const acc_t* __restrict dtu = tile.dtu + t * kLanes;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t bn = tile.B[t * N + n];
        const acc_t* __restrict an = A + n * kLanes;
        const acc_t* __restrict prev = states + (t * N + n) * kLanes;
        acc_t* __restrict next = states + ((t + 1) * N + n) * kLanes;
        acc_t* __restrict g = gates + (t * N + n) * kLanes;
        for (int c = 0; c < kLanes; ++c) {
          g[c] = exp_approx(dt[c] * an[c]);
          next[c] = g[c] * prev[c] + dtu[c] * bn;
        }
      }
    }
    // the output gate: dy = dout * silu(z), dz needs y
    for (int64_t t = 0; t < steps; ++t) {
      const acc_t* __restrict do_t = dout + t * kLanes;
      acc_t* __restrict dy_t = dy + t * kLanes;
      if (z_present) {
        acc_t y[kLanes];
        for (int c = 0; c < kLanes; ++c) y[c] = skip[c] * tile.u[t * kLanes + c];
        for (int64_t n = 0; n < N; ++n) {
          const acc_t cn = tile.C[t * N + n];
          const acc_t* __restrict h = states + ((t + 1) * N + n) * kLanes;
          for (int c = 0; c < kLanes; ++c) y[c] += h[c] * cn;
        }
        for (int c = 0; c < kLanes; ++c) {
          const acc_t zz = tile.z[t * kLanes + c], sig = cpu::sigmoid(zz);
          dz[t * kLanes + c] = do_t[c] * y[c] * sig * (acc_t(1) + zz * (acc_t(1) - sig));
          dy_t[c] = do_t[c] * zz * sig;
        }
      } else {
        for (int c = 0; c < kLanes; ++c) dy_t[c] = do_t[c];
      }
    }
    // adjoint, last step first: lambda_t = C_t dy_t + mu; mu <- exp(dt_t A) lambda_t
    for (int64_t t = steps - 1; t >= 0; --t) {
      const acc_t* __restrict dt = tile.dt + t * kLanes;
      const acc_t* __restrict dtu = tile.dtu + t * kLanes;
      const acc_t* __restrict dy_t = dy + t * kLanes;
      acc_t lb[kLanes] = {}, qa[kLanes] = {};
      for (int64_t n = 0; n < N; ++n) {
        const acc_t bn = tile.B[t * N + n], cn = tile.C[t * N + n];
        const acc_t* __restrict an = A + n * kLanes;
        const acc_t* __restrict prev = states + (t * N + n) * kLanes;
        const acc_t* __restrict h = states + ((t + 1) * N + n) * kLanes;
        const acc_t* __restrict g = gates + (t * N + n) * kLanes;
        acc_t* __restrict mun = mu + n * kLanes;
        acc_t* __restrict dan = dA + n * kLanes;
        acc_t* __restrict dbl = dB_lane + (t * N + n) * kLanes;
        acc_t* __restrict dcl = dC_lane + (t * N + n) * kLanes;
        for (int c = 0; c < kLanes; ++c) {
          const acc_t lam = dy_t[c] * cn + mun[c];
          const acc_t q = lam * g[c] * prev[c];  // lambda_t exp(dt_t A) h_{t-1}
          dbl[c] = lam * dtu[c];
          dcl[c] = h[c] * dy_t[c];
          lb[c] += lam * bn;
          qa[c] += q * an[c];
          dan[c] += q * dt[c];
          mun[c] = g[c] * lam;
        }
      }
      for (int c = 0; c < kLanes; ++c) {
        lam_b[t * kLanes + c] = lb[c];
        ddt[t * kLanes + c] = lb[c] * tile.u[t * kLanes + c] + qa[c];
      }
    }
    if (in.softplus) {
      for (int64_t i = 0; i < steps * kLanes; ++i) ddt[i] *= cpu::sigmoid(tile.raw[i]);
    }
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t i = t * kLanes;
      for (int c = 0; c < kLanes; ++c) {
        du[i + c] = lam_b[i + c] * tile.dt[i + c] + dy[i + c] * skip[c];
        dskip[c] += dy[i + c] * tile.u[i + c];
        dbias[c] += ddt[i + c];
      }
    }
    for (int64_t c = 0; c < lanes; ++c) {
      const int64_t row = (b * s.dim + channel0 + c) * s.length + t0;
      for (int64_t t = 0; t < steps; ++t) {
        gr.du[row + t] = static_cast<scalar_t>(du[t * kLanes + c]);
        gr.ddelta[row + t] = static_cast<scalar_t>(ddt[t * kLanes + c]);
        if (z_present) gr.dz[row + t] = static_cast<scalar_t>(dz[t * kLanes + c]);
      }
    }
    // this block's share of dB and dC, summed over its channels in order
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t t = 0; t < steps; ++t) {
        acc_t sb = 0, sc = 0;
        for (int64_t c = 0; c < lanes; ++c) {
          sb += dB_lane[(t * N + n) * kLanes + c];
          sc += dC_lane[(t * N + n) * kLanes + c];
        }
        dB_part[n * s.length + t0 + t] += sb;
        dC_part[n * s.length + t0 + t] += sc;
      }
    }
  }
  for (int64_t c = 0; c < lanes; ++c) {
    const int64_t row = b * s.dim + channel0 + c;
    for (int64_t n = 0; n < N; ++n) {
      gr.dA[row * N + n] = dA[n * kLanes + c];
      if (gr.dh0) gr.dh0[row * N + n] = mu[n * kLanes + c];
    }
    gr.dskip[row] = dskip[c];
    gr.dbias[row] = dbias[c];
  }
}

at::Tensor optional_compute(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t ? as_compute(*t, dtype) : at::Tensor();
}

// B or C as [batch, groups, N, L] in the compute dtype.
at::Tensor grouped(const at::Tensor& t, at::ScalarType dtype) {
  const at::Tensor c = as_compute(t, dtype);
  return c.dim() == 3 ? c.unsqueeze(1) : c;
}

void check_selective(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C) {
  check_cpu(u, "u");
  check_cpu(delta, "delta");
  check_cpu(A, "A");
  check_cpu(B, "B");
  check_cpu(C, "C");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(),
              "flashops cpp backend: u and delta must be [B, D, L] of one dtype, got ", u.sizes(), " and ",
              delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "flashops cpp backend: A must be [D, N], got ", A.sizes());
  TORCH_CHECK((B.dim() == 3 || B.dim() == 4) && B.sizes() == C.sizes() && B.size(0) == u.size(0) &&
                  B.size(-2) == A.size(1) && B.size(-1) == u.size(2),
              "flashops cpp backend: B and C must be [B, N, L] or [B, G, N, L], got ", B.sizes(), " and ",
              C.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
    bool delta_softplus) {
  check_selective(u, delta, A, B, C);
  const SelectiveShape s = selective_shape(u, A, B);
  const at::ScalarType acc_type = compute_type(u.scalar_type());
  const at::Tensor uc = u.contiguous(), deltac = delta.contiguous();
  const at::Tensor zc = z ? z->to(u.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor Ac = as_compute(A, acc_type), Bc = grouped(B, acc_type), Cc = grouped(C, acc_type);
  const at::Tensor skip = optional_compute(D, acc_type), bias = optional_compute(delta_bias, acc_type);
  const at::Tensor h0 = optional_compute(initial_state, acc_type);
  at::Tensor out = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor last = at::empty({s.batch, s.dim, s.n_state}, u.options().dtype(acc_type));
  at::Tensor saved = at::empty({s.batch, s.dim, s.n_state, s.n_saved}, u.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "flashops_selective_scan_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SelectiveInputs<scalar_t, acc_t> in{uc.const_data_ptr<scalar_t>(), deltac.const_data_ptr<scalar_t>(),
                                              ptr_or_null<scalar_t>(zc),     Ac.const_data_ptr<acc_t>(),
                                              Bc.const_data_ptr<acc_t>(),    Cc.const_data_ptr<acc_t>(),
                                              ptr_or_null<acc_t>(skip),      ptr_or_null<acc_t>(bias),
                                              ptr_or_null<acc_t>(h0),        delta_softplus};
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    acc_t* plast = last.mutable_data_ptr<acc_t>();
    acc_t* psaved = saved.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainSteps / std::max<int64_t>(1, kLanes * s.length * s.n_state));
    at::parallel_for(0, s.tasks(), grain, [&](int64_t begin, int64_t end) {
      Arena<acc_t> arena(forward_arena_size(s));
      for (int64_t task = begin; task < end; ++task) {
        arena.reset();
        selective_forward_task(in, s, task, arena, po, plast, psaved);
      }
    });
  });
  return {out, last, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, OptionalTensor, OptionalTensor, OptionalTensor,
           OptionalTensor>
selective_scan_bwd(const at::Tensor& dout, const OptionalTensor& dlast, const at::Tensor& u, const at::Tensor& delta,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const OptionalTensor& D,
                   const OptionalTensor& z, const OptionalTensor& delta_bias, const OptionalTensor& initial_state,
                   const at::Tensor& saved, bool delta_softplus) {
  check_selective(u, delta, A, B, C);
  check_cpu(dout, "dout");
  const SelectiveShape s = selective_shape(u, A, B);
  TORCH_CHECK(saved.dim() == 4 && saved.size(0) == s.batch && saved.size(1) == s.dim && saved.size(2) == s.n_state &&
                  saved.size(3) == s.n_saved,
              "flashops cpp backend: saved states of shape ", saved.sizes(), " do not come from this backend's forward");
  const at::ScalarType acc_type = compute_type(u.scalar_type());
  const at::Tensor uc = u.contiguous(), deltac = delta.contiguous(), doutc = dout.to(u.scalar_type()).contiguous();
  const at::Tensor zc = z ? z->to(u.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor Ac = as_compute(A, acc_type), Bc = grouped(B, acc_type), Cc = grouped(C, acc_type);
  const at::Tensor skip = optional_compute(D, acc_type), bias = optional_compute(delta_bias, acc_type);
  const at::Tensor savedc = as_compute(saved, acc_type), dlastc = optional_compute(dlast, acc_type);
  const auto seq_options = u.options().memory_format(at::MemoryFormat::Contiguous);
  const auto acc_options = u.options().dtype(acc_type);
  at::Tensor du = at::empty(u.sizes(), seq_options), ddelta = at::empty(u.sizes(), seq_options);
  at::Tensor dz = z ? at::empty(u.sizes(), seq_options) : at::Tensor();
  at::Tensor dA_rows = at::empty({s.batch, s.dim, s.n_state}, acc_options);
  at::Tensor dskip_rows = at::empty({s.batch, s.dim}, acc_options), dbias_rows = at::empty({s.batch, s.dim}, acc_options);
  at::Tensor dh0 = initial_state ? at::empty({s.batch, s.dim, s.n_state}, acc_options) : at::Tensor();

  // Each thread owns a contiguous range of tasks and a dB / dC partial buffer for the batch-groups it touches.
  const int64_t tasks = s.tasks(), work = s.batch * s.dim * s.length * s.n_state;
  const int64_t n_parts = std::max<int64_t>(
      1, std::min<int64_t>({tasks, at::get_num_threads(), ceil_div(work, kGrainSteps)}));
  auto part_tasks = [&](int64_t p) { return std::pair{p * tasks / n_parts, (p + 1) * tasks / n_parts}; };
  std::vector<int64_t> first_bg(n_parts), offset(n_parts + 1, 0);
  const int64_t plane = s.n_state * s.length;
  for (int64_t p = 0; p < n_parts; ++p) {
    const auto [begin, end] = part_tasks(p);
    first_bg[p] = s.batch_group(begin);
    const int64_t touched = end > begin ? s.batch_group(end - 1) - first_bg[p] + 1 : 0;
    offset[p + 1] = offset[p] + touched * plane;
  }
  at::Tensor dB_parts = at::zeros({offset[n_parts]}, acc_options), dC_parts = at::zeros({offset[n_parts]}, acc_options);
  at::Tensor dB_acc = at::empty({s.batch, s.groups, s.n_state, s.length}, acc_options);
  at::Tensor dC_acc = at::empty({s.batch, s.groups, s.n_state, s.length}, acc_options);
  at::Tensor dA = at::empty({s.dim, s.n_state}, acc_options);
  at::Tensor dskip = at::empty({s.dim}, acc_options), dbias = at::empty({s.dim}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "flashops_selective_scan_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SelectiveInputs<scalar_t, acc_t> in{uc.const_data_ptr<scalar_t>(), deltac.const_data_ptr<scalar_t>(),
                                              ptr_or_null<scalar_t>(zc),     Ac.const_data_ptr<acc_t>(),
                                              Bc.const_data_ptr<acc_t>(),    Cc.const_data_ptr<acc_t>(),
                                              ptr_or_null<acc_t>(skip),      ptr_or_null<acc_t>(bias),
                                              nullptr,                       delta_softplus};
    const SelectiveGrads<scalar_t, acc_t> gr{doutc.const_data_ptr<scalar_t>(),
                                             ptr_or_null<acc_t>(dlastc),
                                             savedc.const_data_ptr<acc_t>(),
                                             du.mutable_data_ptr<scalar_t>(),
                                             ddelta.mutable_data_ptr<scalar_t>(),
                                             dz.defined() ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                                             dA_rows.mutable_data_ptr<acc_t>(),
                                             dskip_rows.mutable_data_ptr<acc_t>(),
                                             dbias_rows.mutable_data_ptr<acc_t>(),
                                             dh0.defined() ? dh0.mutable_data_ptr<acc_t>() : nullptr};
    acc_t* pdB = dB_parts.mutable_data_ptr<acc_t>();
    acc_t* pdC = dC_parts.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n_parts, 1, [&](int64_t part_begin, int64_t part_end) {
      Arena<acc_t> arena(backward_arena_size(s));
      for (int64_t p = part_begin; p < part_end; ++p) {
        const auto [begin, end] = part_tasks(p);
        for (int64_t task = begin; task < end; ++task) {
          arena.reset();
          const int64_t at_bg = offset[p] + (s.batch_group(task) - first_bg[p]) * plane;
          selective_backward_task(in, gr, s, task, arena, pdB + at_bg, pdC + at_bg);
        }
      }
    });
    // dB, dC: add the partials of the threads that touched each batch-group, in thread order
    acc_t* dB_out = dB_acc.mutable_data_ptr<acc_t>();
    acc_t* dC_out = dC_acc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        std::fill(dB_out + bg * plane, dB_out + (bg + 1) * plane, acc_t(0));
        std::fill(dC_out + bg * plane, dC_out + (bg + 1) * plane, acc_t(0));
        for (int64_t p = 0; p < n_parts; ++p) {
          const int64_t touched = (offset[p + 1] - offset[p]) / std::max<int64_t>(plane, 1);
          if (bg < first_bg[p] || bg >= first_bg[p] + touched) continue;
          const acc_t* srcB = pdB + offset[p] + (bg - first_bg[p]) * plane;
          const acc_t* srcC = pdC + offset[p] + (bg - first_bg[p]) * plane;
          for (int64_t i = 0; i < plane; ++i) {
            dB_out[bg * plane + i] += srcB[i];
            dC_out[bg * plane + i] += srcC[i];
          }
        }
      }
    });
    // dA, dD, d delta_bias: sum the per-batch rows in batch order
    const acc_t* pA = dA_rows.const_data_ptr<acc_t>();
    const acc_t* pskip = dskip_rows.const_data_ptr<acc_t>();
    const acc_t* pbias = dbias_rows.const_data_ptr<acc_t>();
    acc_t* outA = dA.mutable_data_ptr<acc_t>();
    acc_t* outskip = dskip.mutable_data_ptr<acc_t>();
    acc_t* outbias = dbias.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < s.dim * s.n_state; ++i) {
      acc_t sum = 0;
      for (int64_t b = 0; b < s.batch; ++b) sum += pA[b * s.dim * s.n_state + i];
      outA[i] = sum;
    }
    for (int64_t d = 0; d < s.dim; ++d) {
      acc_t sum_skip = 0, sum_bias = 0;
      for (int64_t b = 0; b < s.batch; ++b) {
        sum_skip += pskip[b * s.dim + d];
        sum_bias += pbias[b * s.dim + d];
      }
      outskip[d] = sum_skip;
      outbias[d] = sum_bias;
    }
  });
  at::Tensor dB = (B.dim() == 3 ? dB_acc.squeeze(1) : dB_acc).to(B.scalar_type());
  at::Tensor dC = (C.dim() == 3 ? dC_acc.squeeze(1) : dC_acc).to(C.scalar_type());
  OptionalTensor dD_out, dz_out, dbias_out, dh0_out;
  if (D) dD_out = dskip.to(D->scalar_type());
  if (z) dz_out = dz;
  if (delta_bias) dbias_out = dbias.to(delta_bias->scalar_type());
  if (initial_state) dh0_out = dh0.to(initial_state->scalar_type());
  return {du, ddelta, dA.to(A.scalar_type()), dB, dC, dD_out, dz_out, dbias_out, dh0_out};
}

}  // namespace flashops::ssm
