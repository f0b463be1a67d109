// CUDA's execution model on the CPU, for testing the project's csrc/cuda/*.cu without a GPU.
//
// A .cu file compiles as C++ (g++ -x c++ -std=c++20 -ffp-contract=off) with this header in front
// of it; csrc/cuda/runtime.cuh then takes its runtime calls (stream, device guard, memset, launch
// check, the one kernel launch) from here instead of from the CUDA toolkit and ATen. Test-only:
// the wheel never contains it.
//
// What is modelled:
// - a launch runs its blocks one at a time, in an order shuffled by the schedule seed (so every
//   block gets to be the "last block" of a reduction under some seed);
// - the threads of a block run either as fibers on the launching thread (the default: fast; the
//   order in which they run is shuffled again after every barrier) or as one OS thread each (for
//   ThreadSanitizer, which then sees every unsynchronised access between them);
// - __syncthreads, __syncwarp and the warp collectives (__shfl_*_sync, __ballot_sync, __any_sync,
//   __all_sync) are barriers. The emulation is stricter than a GPU: threads that wait at
//   different barriers (divergence), or a thread that returns while others wait for it, abort
//   the process with both source lines instead of hanging or going on silently;
// - shared memory is filled with 0xFF bytes (NaN for floats, -1 for integers, an invalid bool)
//   before each block, so a read before a write shows;
// - atomics through std::atomic_ref, __threadfence as a fence, __ldcg/__ldg as plain loads;
// - launch configurations are checked as the driver checks them (an empty grid, more than 1024
//   threads per block).
// Not modelled: blocks running concurrently and the ordering of memory between them, the
// hardware's warp scheduling and its independent thread scheduling, nvcc's code generation and
// device math (this compiles the host branches of csrc/*_math.h), performance.
//
// Shared memory: __shared__ variables are function-local statics placed in the section
// cuda_emu_shared. GCC ignores section attributes on the statics of templates, so the linker
// script next to this header (shared_memory.ld) also moves every zero-initialised static local of
// a function in namespace hyperlr::cuda into that section (-fdata-sections gives each its own
// input section). That is all our kernels' shared memory; a static local of a host function in
// that namespace would be treated as shared memory too.
#pragma once

#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csetjmp>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---- Qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("cuda_emu_shared")))

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
constexpr int warpSize = 32;

// ---- Runtime API: the few calls the sources make -------------------------------------------------
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

extern "C" {
extern char __start_cuda_emu_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_cuda_emu_shared[] __attribute__((weak, visibility("hidden")));
}

namespace cuda_emu {

enum class Mode { kFiber, kThread };

struct Schedule {
  uint64_t seed = 0;
  Mode mode = Mode::kFiber;
};

// Counts since the last reset_stats(), for tests that must know what a call launched.
struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t max_grid = 0;
};

[[noreturn]] inline void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fputs("cuda_emu: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

inline Schedule schedule_from_env() {
  Schedule s;
  if (const char* seed = std::getenv("CUDA_EMU_SEED")) {
    s.seed = std::strtoull(seed, nullptr, 10);
  }
  if (const char* mode = std::getenv("CUDA_EMU_MODE")) {
    if (std::strcmp(mode, "thread") == 0) {
      s.mode = Mode::kThread;
    } else if (std::strcmp(mode, "fiber") != 0) {
      fail("CUDA_EMU_MODE must be 'fiber' or 'thread', got '%s'", mode);
    }
  }
  return s;
}

inline Schedule& schedule() {
  static Schedule s = schedule_from_env();
  return s;
}
inline Stats& stats() {
  static Stats s;
  return s;
}
inline dim3& grid_dim() {
  static dim3 g;
  return g;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

// ---- Threads and blocks --------------------------------------------------------------------------
enum class WaitKind : uint8_t { kNone, kSyncThreads, kSyncWarp, kShuffle, kVote };

inline const char* wait_name(WaitKind kind) {
  switch (kind) {
    case WaitKind::kSyncThreads:
      return "__syncthreads";
    case WaitKind::kSyncWarp:
      return "__syncwarp";
    case WaitKind::kShuffle:
      return "a warp shuffle";
    case WaitKind::kVote:
      return "a warp vote";
    default:
      return "nothing";
  }
}

// Where a thread waits: which barrier, at which line, with which warp mask.
struct Site {
  WaitKind kind = WaitKind::kNone;
  const char* file = "";
  int line = 0;
  unsigned int mask = 0;
  bool operator==(const Site& o) const {
    return kind == o.kind && line == o.line && mask == o.mask &&
           (file == o.file || std::strcmp(file, o.file) == 0);
  }
};

// splitmix64: a small, fast generator for the schedule (a shuffle needs no more).
struct Random {
  using result_type = uint64_t;
  uint64_t state;
  explicit Random(uint64_t seed = 0) : state(seed) {}
  static constexpr uint64_t min() { return 0; }
  static constexpr uint64_t max() { return ~uint64_t(0); }
  uint64_t operator()() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

enum class ThreadState : uint8_t { kRunning, kWaiting, kExited };
enum class VoteOp : uint8_t { kBallot, kAny, kAll };

// ThreadSanitizer's view of one barrier (thread mode): every arriving thread releases on it, every
// departing one acquires from it; the last to depart deletes it.
struct SyncPoint {
  int departing = 0;
};

struct Block;

struct Thread {
  Block* block = nullptr;
  dim3 idx;
  int linear = 0;
  int warp = 0;
  int lane = 0;
  ThreadState state = ThreadState::kRunning;
  Site site;
  // A warp collective: what this thread gives, whose value it wants, what it gets back.
  uint64_t given = 0;
  int source_lane = 0;
  VoteOp vote = VoteOp::kBallot;
  uint64_t received = 0;
  // Fiber mode: the fiber this thread runs on. Thread mode: the barrier it waits at.
  struct Fiber* fiber = nullptr;
  SyncPoint* sync = nullptr;
};

// A barrier that some threads of a group already wait at.
struct Pending {
  Site site;
  int arrived = 0;
  int first_thread = -1;
  SyncPoint* sync = nullptr;
};

struct Block {
  dim3 idx;
  dim3 dim;
  int size = 0;
  std::vector<Thread> threads;
  std::vector<Pending> warps;  // the warp-level barrier each warp waits at
  Pending block_barrier;
  int waiting = 0;
  int exited = 0;
  std::mutex mutex;
  std::condition_variable released;  // thread mode
  std::vector<Thread*> runnable;     // fiber mode
  Random rng;
};

inline thread_local Thread* current = nullptr;

inline Thread& this_thread() {
  if (current == nullptr) {
    fail("a device function ran outside a kernel launch");
  }
  return *current;
}

inline std::string describe(const Thread& t) {
  char text[160];
  std::snprintf(text, sizeof(text), "thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)",
                t.idx.x, t.idx.y, t.idx.z, t.warp, t.lane, t.block->idx.x, t.block->idx.y,
                t.block->idx.z);
  return text;
}

inline std::string describe(const Site& s) {
  char text[512];
  std::snprintf(text, sizeof(text), "%s (%s:%d)", wait_name(s.kind), s.file, s.line);
  return text;
}

// Lanes of warp `warp` that exist in this block (a last, partial warp has fewer).
inline unsigned int existing_lanes(const Block& b, int warp) {
  const int lanes = std::min(32, b.size - warp * 32);
  return lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

[[noreturn]] inline void fail_divergence(const Thread& t, const Site& site, const Thread& other,
                                         const Site& other_site) {
  fail("divergent barriers: %s waits at %s while %s waits at %s", describe(t).c_str(),
       describe(site).c_str(), describe(other).c_str(), describe(other_site).c_str());
}

// ---- What ThreadSanitizer sees ------------------------------------------------------------------
// In thread mode the block's bookkeeping (its mutex, condition variable and fields) is hidden from
// ThreadSanitizer, and each barrier is shown to it instead as a release by every arriving thread
// and an acquire by every departing one, on an object of that barrier alone (SyncPoint). Through
// the one block mutex it would see every thread synchronise with every other at each barrier,
// and miss races between warps that do not wait for each other.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void __tsan_acquire(void* address);
void __tsan_release(void* address);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
}
struct HiddenAccesses {
  HiddenAccesses() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~HiddenAccesses() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};
struct HiddenSync {
  HiddenSync() { AnnotateIgnoreSyncBegin(__FILE__, __LINE__); }
  ~HiddenSync() { AnnotateIgnoreSyncEnd(__FILE__, __LINE__); }
};
inline void sync_release(SyncPoint* p) {
  __tsan_release(p);
}
inline void sync_acquire(SyncPoint* p) {
  __tsan_acquire(p);
}
#else
struct HiddenAccesses {};
struct HiddenSync {};
inline void sync_release(SyncPoint*) {}
inline void sync_acquire(SyncPoint*) {}
#endif

// Thread mode: `t` joins the barrier that `p` describes (the first arrival creates its SyncPoint).
inline void join_sync(Pending& p, Thread& t) {
  if (schedule().mode != Mode::kThread) {
    return;
  }
  if (p.sync == nullptr) {
    p.sync = new SyncPoint();
  }
  t.sync = p.sync;
}

// Runs the group's collective (if it is one) and lets every member go on.
inline void release(Block& b, const std::vector<Thread*>& members);

// Called with b.mutex held: records that `t` waits at `site`, releases its group when complete,
// and fails on divergence. Returns true when t itself must wait (its group is not complete).
inline bool arrive(Thread& t, const Site& site) {
  Block& b = *t.block;
  t.state = ThreadState::kWaiting;
  t.site = site;
  ++b.waiting;
  std::vector<Thread*> members;
  if (site.kind == WaitKind::kSyncThreads) {
    Pending& w = b.warps[t.warp];
    if (w.arrived > 0 && (w.site.mask >> t.lane & 1u)) {
      fail_divergence(t, site, b.threads[w.first_thread], w.site);
    }
    if (b.exited > 0) {
      for (const Thread& other : b.threads) {
        if (other.state == ThreadState::kExited) {
          fail("%s waits at %s, but %s has returned and will never arrive", describe(t).c_str(),
               describe(site).c_str(), describe(other).c_str());
        }
      }
    }
    Pending& p = b.block_barrier;
    if (p.arrived == 0) {
      p.site = site;
      p.first_thread = t.linear;
    } else if (!(p.site == site)) {
      fail_divergence(t, site, b.threads[p.first_thread], p.site);
    }
    join_sync(p, t);
    if (++p.arrived < b.size) {
      return true;
    }
    p = Pending{};
    for (Thread& m : b.threads) {
      members.push_back(&m);
    }
  } else {
    const unsigned int lanes = site.mask & existing_lanes(b, t.warp);
    if (!(lanes >> t.lane & 1u)) {
      fail("%s calls %s with a mask (0x%08x) that does not include its own lane",
           describe(t).c_str(), describe(site).c_str(), site.mask);
    }
    Pending& w = b.warps[t.warp];
    if (w.arrived == 0) {
      w.site = site;
      w.first_thread = t.linear;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(lanes >> lane & 1u)) {
          continue;
        }
        const Thread& m = b.threads[t.warp * 32 + lane];
        if (m.state == ThreadState::kExited) {
          fail("%s waits at %s for lane %d, which has returned", describe(t).c_str(),
               describe(site).c_str(), lane);
        }
        if (m.state == ThreadState::kWaiting && m.site.kind == WaitKind::kSyncThreads) {
          fail_divergence(t, site, m, m.site);
        }
      }
    } else if (!(w.site == site)) {
      fail_divergence(t, site, b.threads[w.first_thread], w.site);
    }
    join_sync(w, t);
    if (++w.arrived < __builtin_popcount(lanes)) {
      return true;
    }
    w = Pending{};
    for (int lane = 0; lane < 32; ++lane) {
      if (lanes >> lane & 1u) {
        members.push_back(&b.threads[t.warp * 32 + lane]);
      }
    }
  }
  release(b, members);
  return false;
}

inline void release(Block& b, const std::vector<Thread*>& members) {
  const Site site = members.front()->site;
  if (site.kind == WaitKind::kShuffle) {
    const int base = members.front()->warp * 32;
    const unsigned int lanes = site.mask & existing_lanes(b, members.front()->warp);
    for (Thread* m : members) {
      if (!(lanes >> m->source_lane & 1u)) {
        fail("%s reads lane %d in %s, a lane that does not take part", describe(*m).c_str(),
             m->source_lane, describe(site).c_str());
      }
      m->received = b.threads[base + m->source_lane].given;
    }
  } else if (site.kind == WaitKind::kVote) {
    uint64_t ballot = 0;
    for (const Thread* m : members) {
      ballot |= static_cast<uint64_t>(m->given != 0) << m->lane;
    }
    for (Thread* m : members) {
      const uint64_t voters = site.mask & existing_lanes(b, m->warp);
      switch (m->vote) {
        case VoteOp::kBallot:
          m->received = ballot;
          break;
        case VoteOp::kAny:
          m->received = ballot != 0;
          break;
        case VoteOp::kAll:
          m->received = ballot == voters;
          break;
      }
    }
  }
  if (members.front()->sync != nullptr) {
    members.front()->sync->departing = static_cast<int>(members.size());
  }
  for (Thread* m : members) {
    m->state = ThreadState::kRunning;
    --b.waiting;
  }
  if (schedule().mode == Mode::kFiber) {
    b.runnable.insert(b.runnable.end(), members.begin(), members.end());
  } else {
    b.released.notify_all();
  }
}

// The block's lock in thread mode; fibers all run on one OS thread and need none.
// (Hidden from ThreadSanitizer, with the accesses made while it is held.)
class BlockLock {
 public:
  explicit BlockLock(Block& b) : mutex_(schedule().mode == Mode::kThread ? &b.mutex : nullptr) {
    if (mutex_ != nullptr) {
      const HiddenSync hidden;
      mutex_->lock();
    }
  }
  ~BlockLock() {
    if (mutex_ != nullptr) {
      const HiddenSync hidden;
      mutex_->unlock();
    }
  }
  BlockLock(const BlockLock&) = delete;
  BlockLock& operator=(const BlockLock&) = delete;

 private:
  std::mutex* mutex_;
  HiddenAccesses hidden_;
};

// A thread's kernel call returned.
inline void thread_exited(Thread& t) {
  Block& b = *t.block;
  const BlockLock lock(b);
  t.state = ThreadState::kExited;
  ++b.exited;
  const Pending& w = b.warps[t.warp];
  if (w.arrived > 0 && (w.site.mask >> t.lane & 1u)) {
    fail("%s returned while %s waits for it at %s", describe(t).c_str(),
         describe(b.threads[w.first_thread]).c_str(), describe(w.site).c_str());
  }
  if (b.block_barrier.arrived > 0) {
    fail("%s returned while %s waits for it at %s", describe(t).c_str(),
         describe(b.threads[b.block_barrier.first_thread]).c_str(),
         describe(b.block_barrier.site).c_str());
  }
}

// ---- Fibers ------------------------------------------------------------------------------------
// Switching: ucontext starts a fiber once; afterwards a setjmp/longjmp pair switches between the
// scheduler and the fibers: GCC's builtins (a few stores and a jump; no signal mask, no unwinding),
// or, under AddressSanitizer, libc's _setjmp/_longjmp, which it intercepts to keep its view of
// the stacks right. Fibers are pooled for the whole process: fiber i runs thread i of every
// block.
#if defined(__SANITIZE_ADDRESS__)
using Context = jmp_buf;
#define CUDA_EMU_SAVE_CONTEXT(context) _setjmp(context)
[[noreturn]] inline void resume_context(Context& context) {
  _longjmp(context, 1);
}
#else
using Context = void* [5];
#define CUDA_EMU_SAVE_CONTEXT(context) __builtin_setjmp(context)
// GCC: __builtin_longjmp must not be in the function that calls __builtin_setjmp.
[[noreturn]] __attribute__((noinline)) inline void resume_context(Context& context) {
  __builtin_longjmp(context, 1);
}
#endif
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kFiberStack = 256 * 1024;  // AddressSanitizer's frames are larger
#else
constexpr size_t kFiberStack = 64 * 1024;
#endif
constexpr int kMaxFibers = 1024;
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kStackCanary = 0xA5;

struct Fiber {
  ucontext_t start;
  Context context;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping across switches
};

// The lowest bytes of a fiber's stack still hold the canary (no overflow into the next stack).
inline void check_stack(const Fiber& f) {
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (static_cast<unsigned char>(f.stack[i]) != kStackCanary) {
      fail("a fiber overflowed its %zu-byte stack (CUDA_EMU_MODE=thread has larger ones)",
           kFiberStack);
    }
  }
}

struct FiberScheduler {
  Context context;
  const void* stack_bottom = nullptr;  // the launching thread's stack, for AddressSanitizer
  size_t stack_size = 0;
  void (*body)(const void*) = nullptr;
  const void* body_arg = nullptr;
};

inline FiberScheduler& scheduler() {
  static FiberScheduler s;
  return s;
}

inline void switch_started(const void* bottom, size_t size, void** fake_stack) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)bottom;
  (void)size;
  (void)fake_stack;
#endif
}

inline void switch_finished(void* fake_stack, const void** bottom, size_t* size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack;
  (void)bottom;
  (void)size;
#endif
}

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield_to_scheduler(Fiber& f) {
  FiberScheduler& s = scheduler();
  if (CUDA_EMU_SAVE_CONTEXT(f.context) == 0) {
    switch_started(s.stack_bottom, s.stack_size, &f.fake_stack);
    resume_context(s.context);
  }
  switch_finished(f.fake_stack, nullptr, nullptr);
}

[[noreturn]] inline void fiber_main() {
  FiberScheduler& s = scheduler();
  switch_finished(nullptr, &s.stack_bottom, &s.stack_size);
  for (;;) {
    Thread& t = this_thread();
    s.body(s.body_arg);
    check_stack(*t.fiber);
    thread_exited(t);
    yield_to_scheduler(*t.fiber);
  }
}

inline std::vector<Fiber>& fiber_pool() {
  static std::vector<Fiber> pool;
  return pool;
}

inline void ensure_fibers(int count) {
  std::vector<Fiber>& pool = fiber_pool();
  if (static_cast<int>(pool.size()) >= count) {
    return;
  }
  // One region for every stack, mapped once: 1024 stacks next to each other sit in a few huge
  // pages, where separate mappings would cost a TLB miss at nearly every switch.
  static char* region = nullptr;
  if (region == nullptr) {
    void* memory = mmap(nullptr, kMaxFibers * kFiberStack, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
      fail("cannot map the fiber stacks");
    }
    region = static_cast<char*>(memory);
  }
  pool.reserve(kMaxFibers);  // fibers hold pointers into themselves: the pool never moves
  while (static_cast<int>(pool.size()) < count) {
    Fiber& f = pool.emplace_back();
    f.stack = region + (pool.size() - 1) * kFiberStack;
    std::memset(f.stack, kStackCanary, kCanaryBytes);
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack;
    f.start.uc_stack.ss_size = kFiberStack;
    f.start.uc_link = nullptr;
    makecontext(&f.start, reinterpret_cast<void (*)()>(&fiber_main), 0);
  }
}

// Runs one block's threads as fibers until all have returned.
inline void run_block_fibers(Block& b) {
  FiberScheduler& s = scheduler();
  ensure_fibers(b.size);
  static std::vector<char> fiber_started;  // entered through its ucontext once, ever
  fiber_started.resize(fiber_pool().size(), 0);
  for (int i = 0; i < b.size; ++i) {
    b.threads[i].fiber = &fiber_pool()[i];
    b.runnable.push_back(&b.threads[i]);
  }
  while (!b.runnable.empty()) {
    const size_t pick = b.rng() % b.runnable.size();
    Thread* t = b.runnable[pick];
    b.runnable[pick] = b.runnable.back();
    b.runnable.pop_back();
    current = t;
    Fiber& f = *t->fiber;
    void* fake_stack = nullptr;
    if (CUDA_EMU_SAVE_CONTEXT(s.context) == 0) {
      switch_started(f.stack, kFiberStack, &fake_stack);
      const size_t index = static_cast<size_t>(&f - fiber_pool().data());
      if (!fiber_started[index]) {
        fiber_started[index] = 1;
        setcontext(&f.start);
      }
      resume_context(f.context);
    }
    switch_finished(fake_stack, nullptr, nullptr);
  }
  current = nullptr;
}

// ---- OS threads ----------------------------------------------------------------------------------
// A pool of OS threads kept for the whole process (never destroyed: they wait for work when the
// process exits); worker i runs thread i of every block.
struct WorkerPool {
  std::mutex mutex;
  std::condition_variable work;
  std::condition_variable done;
  uint64_t generation = 0;
  Block* block = nullptr;  // the newest block, valid while run() waits for it
  int active = 0;          // its number of threads: workers from this index on stay idle
  int remaining = 0;
  std::vector<std::thread> workers;

  void serve(int index) {
    uint64_t seen = 0;
    for (;;) {
      Block* b = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex);
        work.wait(lock, [&] { return generation != seen; });
        seen = generation;  // a worker that wakes late skips to the newest block
        if (index < active) {
          b = block;  // then run() waits for this worker: it cannot miss its block
        }
      }
      if (b == nullptr) {
        continue;
      }
      Thread& t = b->threads[index];
      current = &t;
      scheduler().body(scheduler().body_arg);
      thread_exited(t);
      current = nullptr;
      const std::lock_guard<std::mutex> lock(mutex);
      if (--remaining == 0) {
        done.notify_all();
      }
    }
  }

  void run(Block& b) {
    std::unique_lock<std::mutex> lock(mutex);
    while (static_cast<int>(workers.size()) < b.size) {
      const int index = static_cast<int>(workers.size());
      workers.emplace_back([this, index] { serve(index); });
    }
    block = &b;
    active = b.size;
    remaining = b.size;
    ++generation;
    work.notify_all();
    done.wait(lock, [&] { return remaining == 0; });
  }
};

inline void run_block_threads(Block& b) {
  static WorkerPool* pool = new WorkerPool();
  pool->run(b);
}

// Blocks the calling thread at `site` until its group has arrived.
inline void wait_at(const Site& site) {
  Thread& t = this_thread();
  Block& b = *t.block;
  if (schedule().mode == Mode::kThread) {
    const HiddenAccesses hidden;
    std::unique_lock<std::mutex> lock(b.mutex, std::defer_lock);
    {
      const HiddenSync hidden_sync;
      lock.lock();
    }
    arrive(t, site);
    SyncPoint* sync = t.sync;
    sync_release(sync);  // before the unlock: no member can leave the barrier before this
    {
      const HiddenSync hidden_sync;
      b.released.wait(lock, [&t] { return t.state != ThreadState::kWaiting; });
    }
    sync_acquire(sync);
    t.sync = nullptr;
    if (--sync->departing == 0) {
      delete sync;
    }
    const HiddenSync hidden_sync;
    lock.unlock();
    return;
  }
  // Fibers: back to the scheduler even when this arrival completed the barrier, so that the
  // scheduler shuffles who runs next.
  arrive(t, site);
  yield_to_scheduler(*t.fiber);
}

// ---- Shared memory -------------------------------------------------------------------------------
__attribute__((no_sanitize_address)) inline void poison_shared_memory() {
  if (__start_cuda_emu_shared == nullptr) {
    return;
  }
  for (volatile char* p = __start_cuda_emu_shared; p < __stop_cuda_emu_shared; ++p) {
    *p = static_cast<char>(0xFF);
  }
}

// ---- Launch --------------------------------------------------------------------------------------
// Runs `body` (the kernel call) on every thread of every block; synchronous, like a launch
// followed by a synchronisation. Errors of the configuration go to cudaGetLastError().
template <typename Body>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t stream,
            const Body& body) {
  (void)stream;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      dynamic_shared_bytes > 48 * 1024) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  Stats& st = stats();
  const uint64_t launch_number = static_cast<uint64_t>(st.launches++);
  st.blocks += static_cast<int64_t>(blocks);
  st.max_grid = std::max<int64_t>(st.max_grid, static_cast<int64_t>(blocks));

  Random rng(schedule().seed * 0x9E3779B97F4A7C15ull + launch_number);
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) {
    order[i] = i;
  }
  std::shuffle(order.begin(), order.end(), rng);

  grid_dim() = grid;
  FiberScheduler& s = scheduler();
  s.body = [](const void* arg) { (*static_cast<const Body*>(arg))(); };
  s.body_arg = &body;
  for (uint64_t linear_block : order) {
    Block b;
    b.idx = dim3(static_cast<unsigned>(linear_block % grid.x),
                 static_cast<unsigned>(linear_block / grid.x % grid.y),
                 static_cast<unsigned>(linear_block / grid.x / grid.y));
    b.dim = block;
    b.size = static_cast<int>(threads);
    b.rng = Random(rng());
    b.threads.resize(b.size);
    b.warps.resize((b.size + 31) / 32);
    for (int i = 0; i < b.size; ++i) {
      Thread& t = b.threads[i];
      t.block = &b;
      t.idx = dim3(i % block.x, i / block.x % block.y, i / block.x / block.y);
      t.linear = i;
      t.warp = i / 32;
      t.lane = i % 32;
    }
    poison_shared_memory();
    if (schedule().mode == Mode::kFiber) {
      run_block_fibers(b);
    } else {
      run_block_threads(b);
    }
    if (b.exited != b.size) {
      fail("block (%u,%u,%u) ended with %d of %d threads still waiting", b.idx.x, b.idx.y,
           b.idx.z, b.size - b.exited, b.size);
    }
  }
}

// ---- Built-in variables ----------------------------------------------------------------------------
inline const dim3& thread_index() {
  return this_thread().idx;
}
inline const dim3& block_index() {
  return this_thread().block->idx;
}
inline const dim3& block_dim() {
  return this_thread().block->dim;
}


// ---- Barriers and warp collectives ---------------------------------------------------------------
inline void syncthreads(const char* file, int line) {
  wait_at(Site{WaitKind::kSyncThreads, file, line, 0xffffffffu});
}

inline void syncwarp(const char* file, int line, unsigned int mask = 0xffffffffu) {
  wait_at(Site{WaitKind::kSyncWarp, file, line, mask});
}

enum class ShuffleKind { kIndex, kUp, kDown, kXor };

template <typename T>
T shuffle(ShuffleKind kind, unsigned int mask, T value, int arg, int width, const char* file,
          int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "warp shuffles move at most 8 bytes");
  Thread& t = this_thread();
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("%s: shuffle width %d is not a power of two <= 32 (%s:%d)", describe(t).c_str(), width,
         file, line);
  }
  const int segment = t.lane & ~(width - 1);
  int source = t.lane;
  switch (kind) {
    case ShuffleKind::kIndex:
      source = segment + (arg & (width - 1));
      break;
    case ShuffleKind::kUp:
      source = t.lane - arg >= segment ? t.lane - arg : t.lane;
      break;
    case ShuffleKind::kDown:
      source = t.lane + arg < segment + width ? t.lane + arg : t.lane;
      break;
    case ShuffleKind::kXor:
      source = (t.lane ^ arg) < segment + width ? (t.lane ^ arg) : t.lane;
      break;
  }
  t.given = 0;
  std::memcpy(&t.given, &value, sizeof(T));
  t.source_lane = source;
  wait_at(Site{WaitKind::kShuffle, file, line, mask});
  T out;
  std::memcpy(&out, &t.received, sizeof(T));
  return out;
}

inline unsigned int vote(VoteOp op, unsigned int mask, int predicate, const char* file,
                         int line) {
  Thread& t = this_thread();
  t.given = predicate != 0;
  t.vote = op;
  wait_at(Site{WaitKind::kVote, file, line, mask});
  return static_cast<unsigned int>(t.received);
}

// ---- Atomics and memory ----------------------------------------------------------------------------
template <typename T>
T atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomic_exchange(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomic_cas(T* address, T expected, T desired) {
  std::atomic_ref<T>(*address).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T, typename Op>
T atomic_update(T* address, Op op) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, op(old))) {
  }
  return old;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_index())
#define blockIdx (::cuda_emu::block_index())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, value, lane, ...)                                                 \
  ::cuda_emu::shuffle(::cuda_emu::ShuffleKind::kIndex, mask, value, lane,                     \
                      ::cuda_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, value, delta, ...)                                             \
  ::cuda_emu::shuffle(::cuda_emu::ShuffleKind::kUp, mask, value, delta,                       \
                      ::cuda_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta, ...)                                           \
  ::cuda_emu::shuffle(::cuda_emu::ShuffleKind::kDown, mask, value, delta,                     \
                      ::cuda_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask, ...)                                        \
  ::cuda_emu::shuffle(::cuda_emu::ShuffleKind::kXor, mask, value, lane_mask,                  \
                      ::cuda_emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, predicate) \
  ::cuda_emu::vote(::cuda_emu::VoteOp::kBallot, mask, predicate, __FILE__, __LINE__)
#define __any_sync(mask, predicate) \
  (::cuda_emu::vote(::cuda_emu::VoteOp::kAny, mask, predicate, __FILE__, __LINE__) != 0)
#define __all_sync(mask, predicate) \
  (::cuda_emu::vote(::cuda_emu::VoteOp::kAll, mask, predicate, __FILE__, __LINE__) != 0)

namespace cuda_emu {
constexpr int width_or_warp() {
  return warpSize;
}
constexpr int width_or_warp(int width) {
  return width;
}
}  // namespace cuda_emu

template <typename T>
T atomicAdd(T* address, T value) {
  return ::cuda_emu::atomic_add(address, value);
}
template <typename T>
T atomicSub(T* address, T value) {
  return ::cuda_emu::atomic_add(address, static_cast<T>(-value));
}
template <typename T>
T atomicExch(T* address, T value) {
  return ::cuda_emu::atomic_exchange(address, value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return ::cuda_emu::atomic_cas(address, compare, value);
}
template <typename T>
T atomicMax(T* address, T value) {
  return ::cuda_emu::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return ::cuda_emu::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicAnd(T* address, T value) {
  return ::cuda_emu::atomic_update(address, [value](T old) { return static_cast<T>(old & value); });
}
template <typename T>
T atomicOr(T* address, T value) {
  return ::cuda_emu::atomic_update(address, [value](T old) { return static_cast<T>(old | value); });
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __threadfence_block() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
template <typename T>
T __ldcg(const T* address) {
  return *address;
}
template <typename T>
T __ldg(const T* address) {
  return *address;
}

inline cudaError_t cudaMemsetAsync(void* address, int value, size_t bytes,
                                   cudaStream_t stream = nullptr) {
  (void)stream;
  std::memset(address, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuda_emu::last_error();
  ::cuda_emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unknown error";
}

// The launch of csrc/cuda/runtime.cuh's HYPERLR_LAUNCH_KERNEL: every thread calls the kernel
// with its own copy of the arguments, as the parameter space gives each thread on a GPU.
#define CUDA_EMU_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::cuda_emu::launch(grid, block, shared_bytes, stream, [=]() { kernel(__VA_ARGS__); })
