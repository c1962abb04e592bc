// Parallel loops of the native CPU kernels: one place that decides which threads run them.
//
// studio_parallel::run(n_items, body) hands out items 0..n-1 one at a time from an atomic counter (dynamic
// scheduling, as `schedule(dynamic, 1)`). body(next) runs once per participating thread and loops
// `for (i; next(i);)`, so scratch buffers declared in body before the loop are per thread, as in an OpenMP
// parallel region. Every kernel writes each output element from exactly one item in a fixed order, so
// results are bit-identical for any thread count, interleaving or mode (tests/test_native_threads.py, and
// the parity tests test_render_native, test_hashgrid_native, test_mesh_raster).
//
// Threads (STUDIO_NATIVE_PARALLEL, read on every call):
//   * default: torch's intra-op team. torch.__config__.parallel_info() says "ATen parallel backend: OpenMP"
//     for the torch builds we install, so that team is torch's libgomp; our loops run in an OpenMP
//     parallel region of it (the same threads as torch's own ops, nothing extra to wake or to compete with;
//     at::parallel_for would be the same team with static chunks). How its idle threads wait is libgomp's
//     wait policy, fixed when torch loads: by default they spin for a while before sleeping. On a machine
//     shared with another job those spins, after every parallel region of torch's ops and ours, take the
//     time slices the working threads need. One render (10k Gaussians, 128^2, fwd+bwd, 2 threads) beside a
//     2-thread torch job, benchmarks/render.py --contention on a 2-core VM: 2.1-2.4x its time alone on an
//     otherwise quiet machine, 6-34x while other jobs also ran, and 33x with GOMP_SPINCOUNT=300000;
//     with OMP_WAIT_POLICY=PASSIVE in the environment before torch is imported: 1.4x (alone it costs
//     ~15 %: 16-18 ms vs 14 ms). So the fix for sharing is the process's wait policy, not a second pool.
//   * "pool": a small persistent pool of our own (at::get_num_threads() - 1 helpers) that sleep on a
//     condition variable and never spin; the caller works too and returns once every item is done, never
//     waiting for a helper the OS has not scheduled. Its own idle CPU time is zero, but beside torch's
//     spinning team it adds a third runnable thread on two cores: measured 20-35 % slower alone (17-19 ms vs
//     14 ms) and no better beside the torch job (5.8x vs 2.4x; 1.4x both when passive). Kept callable for
//     measurements and for processes that cannot change the wait policy but must not spin in our kernels.
//   * "openmp": the default, spelled out.
// Fallbacks: one thread, one item or a nested call (from a pool helper or inside torch's parallel region)
// run the body inline; a second caller while the pool is busy (another Python thread) runs inline too.
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef _WIN32
#include <process.h>
#define STUDIO_GETPID _getpid
#else
#include <unistd.h>
#define STUDIO_GETPID getpid
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <type_traits>
#include <mutex>
#include <thread>
#include <vector>

namespace studio_parallel {

inline int max_threads() { return std::max(1, at::get_num_threads()); }

inline bool use_pool() {
  const char* s = std::getenv("STUDIO_NATIVE_PARALLEL");
  return s != nullptr && std::strcmp(s, "pool") == 0;
}

// Claims items [0, n) one at a time.
class Claim {
 public:
  explicit Claim(std::atomic<int64_t>* next, int64_t n) : next_(next), n_(n) {}
  bool operator()(int64_t& i) const {
    i = next_->fetch_add(1, std::memory_order_relaxed);
    return i < n_;
  }

 private:
  std::atomic<int64_t>* next_;
  int64_t n_;
};

namespace detail {

inline thread_local bool t_in_worker = false;

class Pool {
 public:
  using Fn = void (*)(void* ctx, const Claim& claim);

  // Runs fn on the caller and up to `helpers` pool threads; returns when every participant has left fn.
  // Returns false (nothing run) when the pool is in use by another caller.
  bool run(int helpers, int64_t n, Fn fn, void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_workers(helpers);
    std::atomic<int64_t> next{0};
    {
      std::lock_guard<std::mutex> g(m_);
      fn_ = fn;
      ctx_ = ctx;
      next_ = &next;
      n_ = n;
      slots_ = helpers;
      active_ = 0;
      error_ = nullptr;
      open_ = true;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    std::exception_ptr err;
    try {
      fn(ctx, Claim(&next, n));
    } catch (...) {
      err = std::current_exception();
      next.store(n);  // stop handing out items
    }
    {
      // Close the job: helpers that have not joined yet will not; wait only for those working.
      std::unique_lock<std::mutex> g(m_);
      open_ = false;
      done_.wait(g, [&] { return active_ == 0; });
      if (!err) err = error_;
      fn_ = nullptr;
      ctx_ = nullptr;
      next_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
    return true;
  }

 private:
  void ensure_workers(int want) {
    std::lock_guard<std::mutex> g(m_);
    while (static_cast<int>(n_workers_) < want) {
      std::thread(&Pool::worker, this).detach();  // the pool lives for the whole process
      ++n_workers_;
    }
  }

  void worker() {
    t_in_worker = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> g(m_);
    for (;;) {
      wake_.wait(g, [&] { return generation_ != seen; });
      seen = generation_;
      if (!open_ || slots_ <= 0 || next_->load(std::memory_order_relaxed) >= n_) continue;  // nothing for us
      --slots_;
      ++active_;
      Fn fn = fn_;
      void* ctx = ctx_;
      Claim claim(next_, n_);
      g.unlock();
      std::exception_ptr err;
      try {
        fn(ctx, claim);
      } catch (...) {
        err = std::current_exception();
      }
      g.lock();
      if (err && !error_) error_ = err;
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex busy_;  // one job at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  size_t n_workers_ = 0;
  uint64_t generation_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int64_t>* next_ = nullptr;
  int64_t n_ = 0;
  int slots_ = 0, active_ = 0;
  bool open_ = false;
  std::exception_ptr error_;
};

// One pool per process; a forked child (whose copy has no threads) makes its own. Never destroyed: its
// detached helpers sleep until the process exits.
inline Pool& pool() {
  static std::mutex m;
  static Pool* p = nullptr;
  static long owner = 0;
  std::lock_guard<std::mutex> g(m);
  const long pid = static_cast<long>(STUDIO_GETPID());
  if (p == nullptr || owner != pid) {
    p = new Pool();
    owner = pid;
  }
  return *p;
}

}  // namespace detail

// Calls body(claim) on up to `threads` threads (default at::get_num_threads()), where `claim(i)` hands out
// the items 0..n_items-1 one at a time; returns when all are done. See the file comment.
template <typename Body>
void run(int64_t n_items, Body&& body, int threads = 0) {
  if (n_items <= 0) return;
  const int nt = static_cast<int>(std::min<int64_t>(threads > 0 ? threads : max_threads(), n_items));
  std::atomic<int64_t> next{0};
  if (nt <= 1 || detail::t_in_worker || at::in_parallel_region()) {
    body(Claim(&next, n_items));
    return;
  }
  if (!use_pool()) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    body(Claim(&next, n_items));
#else
    body(Claim(&next, n_items));
#endif
    return;
  }
  using B = std::remove_reference_t<Body>;
  auto tramp = [](void* ctx, const Claim& c) { (*static_cast<B*>(ctx))(c); };
  void* ctx = const_cast<void*>(static_cast<const void*>(std::addressof(body)));
  if (!detail::pool().run(nt - 1, n_items, tramp, ctx)) body(Claim(&next, n_items));
}

}  // namespace studio_parallel
