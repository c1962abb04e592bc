// Parallel loops of the native CPU kernels that share the cores gracefully.
//
// Why not `#pragma omp parallel for`: with the libgomp that torch ships, threads that run out of work
// (at a loop's end and between parallel regions) spin for a while before sleeping. On a machine where
// another process also wants the cores, a spinning thread takes the time slice that the thread still
// holding work needs, and every region ends in a round of time slices: one render took 1.5 s instead of
// 40 ms beside another job. torch.__config__.parallel_info() reports "ATen parallel backend: OpenMP" for
// this torch build, so at::parallel_for is the same spinning libgomp team, with static chunks on top.
//
// studio_parallel::run(n_items, body) instead:
//   * hands out items one at a time from an atomic counter (dynamic scheduling, as schedule(dynamic, 1));
//   * the calling thread works too, and returns as soon as every item is *done*: a helper that the OS
//     has not scheduled yet never delays it (the caller simply takes that helper's share of the items);
//   * helpers are a small persistent pool (at::get_num_threads() - 1 threads, created on first use)
//     that sleep on a condition variable (futex) between jobs: nobody spins, ever.
// Per-thread state: body(next) runs once per participating thread and loops `for (i; next(i);)`, so
// scratch buffers declared in body before the loop are per thread, as in an OpenMP parallel region.
// Every kernel writes each output element from exactly one item in a fixed order, so results are
// bit-identical for any thread count and any interleaving (tests: test_render_native, test_hashgrid_native,
// test_mesh_raster).
//
// Fallbacks: one thread, one item, a nested call (from a helper or inside torch's parallel region) or a
// concurrent caller (another Python thread while the pool is busy) run the body inline on the caller.
// STUDIO_NATIVE_PARALLEL=openmp selects the previous OpenMP team (same scheduling, the spinning waits)
// so benchmarks can measure both in one run; read on every call.
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

inline bool use_openmp() {
  const char* s = std::getenv("STUDIO_NATIVE_PARALLEL");
  return s != nullptr && std::strcmp(s, "openmp") == 0;
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
  if (use_openmp()) {
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
