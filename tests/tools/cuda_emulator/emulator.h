// Host emulation of the CUDA subset that csrc/cuda/ uses, so that the CPU test suite runs the kernels' own source
// (compiled by g++ with this header forced in front) against the references. Not a simulator of the hardware:
// it checks the logic (indexing, tails, scans, carries, reductions), not speed or the memory model.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// __syncthreads and the warp shuffles are barriers: a fiber that reaches one yields to the next fiber, and the
// barrier opens when every thread of its scope has arrived. Stricter than the hardware, on purpose:
//   * a shuffle needs the full mask and all 32 lanes of the warp, calling the same shuffle;
//   * a barrier that some thread can never reach (it exited, or waits elsewhere) is reported as a deadlock;
//   * dynamic shared memory starts as NaN bytes, so reading it before writing shows in the results;
//   * between barriers the fibers run in a shuffled order, so a missing barrier (one thread reading shared memory
//     that another writes in the same phase) shows as wrong or varying results.
// Static __shared__ arrays become function-local statics, shared by the fibers of a block (blocks run in turn).

#pragma once
#define FLASHOPS_CUDA_EMULATION 1

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

// fp16 through the compiler's _Float16 (IEEE binary16, round to nearest even), bf16 by hand (round to nearest even).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.f), 1.f); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  long generation = 0;
};

// A fiber starts on its own stack through makecontext/swapcontext; later switches use _setjmp/_longjmp, which
// skip the signal-mask system call that every swapcontext makes (the emulator switches millions of times).
struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  bool started = false;
  std::vector<char> stack;
  dim3 index;
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  long waiting_generation = 0;
};

struct Warp {
  Barrier barrier;
  uint64_t slots[2][32];  // consecutive shuffles alternate, so one barrier per shuffle suffices
  int kinds[2][32];
  int round[32];  // per lane: how many shuffles it has made
};

constexpr size_t kStackBytes = 256 * 1024;

struct Scheduler {
  dim3 grid, block, block_index;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block_barrier;
  std::vector<unsigned char> dynamic_shared;
  ucontext_t main_context;
  jmp_buf main_jump;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Scheduler*& scheduler() {
  static Scheduler* s = nullptr;
  return s;
}

[[noreturn]] inline void finish() {
  Scheduler* s = scheduler();
  s->current->done = true;
  _longjmp(s->main_jump, 1);
}

inline void fail(const std::string& message) {
  Scheduler* s = scheduler();
  if (s->error.empty()) s->error = message;
  finish();  // abandon this fiber
}

inline void yield() {
  Scheduler* s = scheduler();
  if (!_setjmp(s->current->jump)) _longjmp(s->main_jump, 1);
}

inline void resume(Scheduler& s, Fiber& f) {
  s.current = &f;
  if (_setjmp(s.main_jump)) return;  // the fiber yielded or finished
  if (f.started) _longjmp(f.jump, 1);
  f.started = true;
  swapcontext(&s.main_context, &f.context);
}

inline void arrive(Barrier& barrier) {
  Scheduler* s = scheduler();
  const long generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  s->current->waiting = &barrier;
  s->current->waiting_generation = generation;
  yield();
}

inline void entry() {
  scheduler()->body();
  finish();
}

inline void run_block(Scheduler& s) {
  const unsigned threads = s.block.x * s.block.y * s.block.z;
  for (auto& w : s.warps) {
    w.barrier = Barrier{32, 0, 0};
    std::fill(std::begin(w.round), std::end(w.round), 0);
  }
  s.block_barrier = Barrier{static_cast<int>(threads), 0, 0};
  std::fill(s.dynamic_shared.begin(), s.dynamic_shared.end(), 0xff);  // NaN floats
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    f.started = false;
    f.waiting = nullptr;
    f.linear = static_cast<int>(t);
    f.index = dim3{t % s.block.x, (t / s.block.x) % s.block.y, t / (s.block.x * s.block.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &s.main_context;
    makecontext(&f.context, entry, 0);
  }
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  std::mt19937 random(s.block_index.x * 7919u + s.block_index.y * 104729u + s.block_index.z);
  for (;;) {
    bool alive = false, progressed = false;
    std::shuffle(order.begin(), order.end(), random);
    for (unsigned k = 0; k < threads && s.error.empty(); ++k) {
      Fiber& f = s.fibers[order[k]];
      if (f.done) continue;
      alive = true;
      if (f.waiting != nullptr && f.waiting->generation == f.waiting_generation) continue;
      f.waiting = nullptr;
      resume(s, f);
      progressed = true;
    }
    if (!s.error.empty()) throw std::runtime_error(s.error);
    if (!alive) return;
    if (!progressed) {
      int waiting = 0, exited = 0;
      for (unsigned t = 0; t < threads; ++t) (s.fibers[t].done ? exited : waiting)++;
      throw std::runtime_error("deadlock in block (" + std::to_string(s.block_index.x) + ", " +
                               std::to_string(s.block_index.y) + ", " + std::to_string(s.block_index.z) + "): " +
                               std::to_string(waiting) + " threads wait at a barrier that " +
                               std::to_string(exited) + " exited threads (or threads at another barrier) never reach");
    }
  }
}

template <typename Kernel>
int launch(Kernel&& call, const unsigned* grid, const unsigned* block, unsigned shared, char* error,
           int error_size) {
  Scheduler s;
  s.grid = dim3{grid[0], grid[1], grid[2]};
  s.block = dim3{block[0], block[1], block[2]};
  const unsigned threads = s.block.x * s.block.y * s.block.z;
  try {
    if (threads == 0 || threads > 1024 || threads % 32 != 0)
      throw std::runtime_error("the emulator runs blocks of whole warps (1 to 32 warps), got " +
                               std::to_string(threads) + " threads");
    s.fibers.resize(threads);
    for (auto& f : s.fibers) f.stack.resize(kStackBytes);
    s.warps.resize(threads / 32);
    s.dynamic_shared.resize(shared + 16);
    s.body = call;
    scheduler() = &s;
    for (unsigned z = 0; z < s.grid.z; ++z)
      for (unsigned y = 0; y < s.grid.y; ++y)
        for (unsigned x = 0; x < s.grid.x; ++x) {
          s.block_index = dim3{x, y, z};
          run_block(s);
        }
    scheduler() = nullptr;
    return 0;
  } catch (const std::exception& e) {
    scheduler() = nullptr;
    snprintf(error, static_cast<size_t>(error_size), "%s", e.what());
    return 1;
  }
}

// Calls kernel(*args[0], *args[1], ...) with each argument read at its parameter's type, as cuLaunchKernel does.
template <typename... Args, size_t... I>
void call_with(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<Args*>(args[I])...);
}

template <typename... Args>
int launch_kernel(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, unsigned shared,
                  void** args, char* error, int error_size) {
  return launch([=] { call_with(kernel, args, std::index_sequence_for<Args...>{}); }, grid, block, shared, error,
                error_size);
}

template <typename... Args>
int parameter_sizes(void (*)(Args...), int* sizes, int capacity) {
  const int all[] = {static_cast<int>(sizeof(Args))..., 0};
  const int count = static_cast<int>(sizeof...(Args));
  for (int i = 0; i < count && i < capacity; ++i) sizes[i] = all[i];
  return count;
}

inline int lane() { return scheduler()->current->linear & 31; }

// A lane writes its value into this round's slot set and waits for the whole warp; then it reads its source.
// The next shuffle uses the other slot set: a lane can only reach the one after it (the same set again) once
// every lane has arrived at the next one, that is, after every lane has read this one.
template <typename T>
T shuffle(unsigned mask, T value, int kind, int source) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Scheduler* s = scheduler();
  if (mask != 0xffffffffu) fail("the emulator supports full-warp shuffles only (mask 0xffffffff)");
  Warp& w = s->warps[s->current->linear >> 5];
  const int me = lane();
  const int set = w.round[me]++ & 1;
  w.slots[set][me] = 0;
  memcpy(&w.slots[set][me], &value, sizeof(T));
  w.kinds[set][me] = kind;
  arrive(w.barrier);
  for (int l = 0; l < 32; ++l)
    if (w.kinds[set][l] != kind) fail("lanes of one warp called different shuffles at the same time");
  T out;
  memcpy(&out, &w.slots[set][source], sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::scheduler()->current->index)
#define blockIdx (::emu::scheduler()->block_index)
#define blockDim (::emu::scheduler()->block)
#define gridDim (::emu::scheduler()->grid)

inline void __syncthreads() { ::emu::arrive(::emu::scheduler()->block_barrier); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::emu::fail("the emulator supports __syncwarp of the full warp only");
  ::emu::arrive(::emu::scheduler()->warps[::emu::scheduler()->current->linear >> 5].barrier);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int source, int width = 32) {
  const int lane = ::emu::lane();
  return ::emu::shuffle(mask, v, 1, (lane & ~(width - 1)) + (source & (width - 1)));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::lane(), local = lane & (width - 1);
  return ::emu::shuffle(mask, v, 2, local >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::lane(), local = lane & (width - 1);
  return ::emu::shuffle(mask, v, 3, local + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::emu::lane();
  const int source = lane ^ lane_mask;
  return ::emu::shuffle(mask, v, 4, (source & ~(width - 1)) == (lane & ~(width - 1)) ? source : lane);
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

namespace flashops {
template <typename T>
inline T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(::emu::scheduler()->dynamic_shared.data());
}
}  // namespace flashops
