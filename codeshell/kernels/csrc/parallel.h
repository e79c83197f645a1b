// Work splitting shared by the kernels (header-only): parallel_chunks, and the Team that the
// native decode step holds for a whole step so that its many small loops do not each fork and
// join the OpenMP team.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>

#include "switches.h"

namespace codeshell {

// A thread team for calls that run many small parallel loops (the native decode step,
// csrc/decode_step.cpp): the caller (the "master") runs the call's serial code between
// begin() and end(); the team's helper threads spin meanwhile and help with each loop the
// master posts (`run`). A loop's chunks are claimed one at a time from one atomic word by
// whichever thread is free, the master included, and `run` returns when every chunk is done.
// Why: a codeshell-mini token runs ~60 loops of a few microseconds each (6 layers x ~9 ops, the
// head, the argmax); each at::parallel_for forks and joins the OpenMP team, which costs about as
// much as the loop. Posting a loop to spinning helpers costs a few cache-line transfers.
// The helpers are the team's own threads (`shared`: one team per process and thread count),
// not an OpenMP region around the call: `end` does not wait for them, so a helper that the OS
// descheduled on a shared machine never holds the master up unless it holds a chunk (an OpenMP
// region's closing barrier waited for it: measured, median step 7.7 ms against 0.6 ms with 5
// jobs on 2 cores). Out of a call the helpers spin a millisecond (by the clock: set_idle_ns), then
// sleep until the next begin() (the engine's Python between two steps is ~0.1-0.3 ms, so they stay
// awake in a generation).
// What this is not: a general thread pool. One master at a time (`try_own`); a helper thread runs
// torch's own parallel loops serially (its OpenMP thread count is 1).
class Team {
 public:
  // The process's team of `threads` threads (threads - 1 helpers), created at first use (and
  // again in a forked child, whose parent's helpers do not exist there); never destroyed.
  static Team* shared(int64_t threads) {
    static std::mutex mu;
    static Team* team = nullptr;
    static pid_t pid = 0;
    std::lock_guard<std::mutex> lock(mu);
    if (team == nullptr || team->threads_ != threads || pid != getpid()) {
      team = new Team(threads);  // a replaced team is left asleep, not freed: its helpers may still read it
      pid = getpid();
    }
    return team;
  }

  int64_t threads() const { return threads_; }
  // loops posted to the helpers so far (the master's count; tests), the prefetch side jobs not counted
  uint64_t loops() const { return seq_ - side_posts_; }
  uint64_t side_posts() const { return side_posts_; }                                  // prefetch jobs posted (tests)
  uint64_t side_runs() const { return side_runs_.load(std::memory_order_relaxed); }    // ... that a helper took
  // begin() calls that found a helper asleep (a futex wake; the master's count; traces and tests)
  uint64_t wakes() const { return wakes_; }

  // The master: ownership for one call (false: another thread's call holds the team).
  bool try_own() { return owner_.try_lock(); }
  void disown() { owner_.unlock(); }

  // The master: the helpers serve loops from now on (waking the ones asleep).
  void begin() {
    active_.store(true, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      ++wakes_;
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }

  // The master: the call is over; the helpers go idle on their own (nothing waits for them): each
  // spins idle_ns_ (1 ms), then sleeps until the next begin() (a futex wake). A quiet
  // decode loop's next step comes after ~0.1 ms of Python and finds a spinning helper at once.
  // (Session 20's CODESHELL_TEAM_IDLE_US, a settable spin read by a getenv every step, measured no
  // gain in the server and was dropped in session 21.)
  void end() { active_.store(false, std::memory_order_release); }
  // The master: how long the helpers spin out of a call before they sleep (ns; < 0: kIdleSpins pauses).
  // The decode step sets it each call from CODESHELL_TEAM_IDLE_US (default 1000).
  void set_idle_ns(int64_t ns) { idle_ns_.store(ns, std::memory_order_relaxed); }

  // The master: f(i0, i1) over [0, n) in chunks of `grain` items, run by the master and the
  // helpers; returns when all are done (rethrows the first exception a chunk threw).
  template <class F>
  void run(int64_t n, int64_t grain, const F& f) {
    const int64_t chunks = (n + grain - 1) / grain;
    if (chunks <= 1) {
      if (n > 0) f(0, n);
      return;
    }
    cancel_side();
    const uint64_t seq = open_post();
    fn_.store(&call<F>, std::memory_order_relaxed);
    ctx_.store(&f, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    grain_.store(grain, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(seq << 32, std::memory_order_release);  // publishes the job above
    work(seq);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < chunks;) pause(spins);
    if (failed_.load(std::memory_order_acquire)) {
      failed_.store(false, std::memory_order_relaxed);
      std::exception_ptr e;
      std::swap(e, err_);
      std::rethrow_exception(e);
    }
  }

  // ---- The prefetch side job (session 26, helper C) ----
  // The master: a helper prefetches the given byte ranges (round-robin in kSidePiece pieces) while
  // the master goes on alone with the step's serial ops (layer norms, RoPE + KV store, attention,
  // argmax, and the engine's Python between two steps); the next `run` (any loop the master posts)
  // or the next prefetch_async first stops it (a flag the helper reads every piece) or, if no helper
  // took it yet, withdraws it. Nothing waits for it otherwise: it may outlive end() (the step's last
  // job runs during the engine's Python). Only prefetch instructions, which never fault, so ranges of
  // freed memory are harmless, and no result depends on it. hint: 0 T0, 1 T1, 2 T2, 3 NTA.
  // Why: a batch-1 token of the small shape has ~0.55 ms in which at most one core streams and
  // memory idles; the next linear's first bytes fetched meanwhile are not fetched again in its time.
  struct Range {
    const char* p;
    int64_t bytes;
  };
  static constexpr int kSideRanges = 8;
  static constexpr int64_t kSidePiece = 4096;
  void prefetch_async(const Range* r, int n, int hint) {
    cancel_side();
    n = std::min(n, kSideRanges);
    if (threads_ < 2 || n <= 0) return;
    for (int i = 0; i < n; ++i) side_[i] = r[i];
    side_n_ = n;
    side_hint_ = hint;
    side_stop_.store(false, std::memory_order_relaxed);
    const uint64_t seq = open_post();
    fn_.store(&side_call, std::memory_order_relaxed);
    ctx_.store(this, std::memory_order_relaxed);
    n_.store(1, std::memory_order_relaxed);
    grain_.store(1, std::memory_order_relaxed);
    chunks_.store(1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ++side_posts_;
    side_seq_ = seq;
    side_pending_ = true;
    state_.store(seq << 32, std::memory_order_release);  // a helper claims it as a 1-chunk loop
  }
  // The master: the pending side job stopped (or withdrawn before a helper took it), and done.
  void cancel_side() {
    if (!side_pending_) return;
    side_pending_ = false;
    side_stop_.store(true, std::memory_order_relaxed);
    uint64_t s = side_seq_ << 32;
    if (state_.compare_exchange_strong(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return;
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < 1;) pause(spins);
  }

 private:
  // The master, before it writes a new loop's fields: the next seq, with state_ set to (seq, kWriting)
  // first, so that no claim of an older loop can succeed from here on. Why (session 26, helper C): a
  // helper that finished the last chunk of loop L reloads state_ (L, c) and checks c against chunks_;
  // the master, which returned from run() as soon as done_ counted that chunk, may already have
  // written the NEXT loop's chunks_ (> c) while state_ still read (L, c): the helper's claim CAS
  // then succeeded and it ran chunk c with the next loop's fn_ / ctx_ half written (or of a loop
  // already done). Rare with run() alone; the prefetch side jobs (one chunk, stopped and waited for
  // right before the next loop is written) made it a crash in int8_q8's body every few thousand
  // tokens. With the marker first (and the fields' stores after it: x86 keeps stores in order, the
  // fence keeps the compiler's), a helper that sees a new field sees the marker too, and its CAS on
  // (L, c) fails. serve() does not take a seq whose state_ is still kWriting.
  static constexpr uint64_t kWriting = 0xffffffffu;
  uint64_t open_post() {
    const uint64_t seq = ++seq_;
    state_.store(seq << 32 | kWriting, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return seq;
  }

  static void side_call(const void* self, int64_t, int64_t) {
    const Team& t = *static_cast<const Team*>(self);
    t.side_runs_.fetch_add(1, std::memory_order_relaxed);
    switch (t.side_hint_) {
      case 0: t.side_walk<_MM_HINT_T0>(); break;
      case 1: t.side_walk<_MM_HINT_T1>(); break;
      case 3: t.side_walk<_MM_HINT_NTA>(); break;
      default: t.side_walk<_MM_HINT_T2>(); break;
    }
  }
  template <int Hint>
  void side_walk() const {
    for (int64_t off = 0;; off += kSidePiece) {
      bool any = false;
      for (int i = 0; i < side_n_; ++i) {
        const int64_t end = std::min(side_[i].bytes, off + kSidePiece);
        if (off >= end) continue;
        if (side_stop_.load(std::memory_order_relaxed)) return;
        any = true;
        for (int64_t j = off; j < end; j += 64) _mm_prefetch(side_[i].p + j, static_cast<_mm_hint>(Hint));
      }
      if (!any) return;
    }
  }

  explicit Team(int64_t threads) : threads_(std::max<int64_t>(1, threads)) {
    for (int64_t i = 1; i < threads_; ++i) std::thread([this] { serve(); }).detach();
  }

  // A helper's life: serve the posted loops; out of a call, spin a while, then sleep.
  void serve() {
    (void)at::get_num_threads();  // torch's per-thread OpenMP setup first, then 1 thread here:
    omp_set_num_threads(1);       // a chunk's own at::parallel_for (attention) stays on this thread
    uint64_t seen = 0;
    for (int64_t spins = 0, idle = 0, idle_t0 = 0;;) {
      const uint64_t st = state_.load(std::memory_order_acquire), seq = st >> 32;
      if (seq != seen && (st & kWriting) != kWriting) {  // not while the master writes the loop (open_post)
        seen = seq;
        work(seq);
        spins = idle = 0;
        continue;
      }
      if (active_.load(std::memory_order_acquire)) {
        idle = 0;
        pause(spins);
        continue;
      }
      if (idle++ == 0) idle_t0 = now_ns();
      const int64_t budget = idle_ns_.load(std::memory_order_relaxed);
      if (budget < 0 ? idle < kIdleSpins : ((idle & 255) != 0 || now_ns() - idle_t0 < budget)) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      cv_.wait(lock, [this] { return active_.load(std::memory_order_seq_cst); });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      idle = spins = 0;
    }
  }

  using Fn = void (*)(const void*, int64_t, int64_t);
  template <class F>
  static void call(const void* f, int64_t i0, int64_t i1) {
    (*static_cast<const F*>(f))(i0, i1);
  }

  // Spin (pause) a while, then yield the core: a helper descheduled on a shared machine must
  // not hold the master's core, and the master waiting for a descheduled helper's chunk neither.
  static void pause(int64_t& spins) {
    if (++spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }

  // Claims and runs chunks of loop `seq` until none is left (or a newer loop was posted: then
  // this one is complete). The claim is a CAS on (seq << 32 | next chunk), so a thread that read
  // an older loop's state never takes a newer loop's chunk; the loop's fields are read after a
  // successful claim, when they cannot change (the loop is not done until this chunk is).
  void work(uint64_t seq) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == seq) {
      const int64_t c = int64_t(s & 0xffffffffu);
      if (c >= chunks_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t n = n_.load(std::memory_order_relaxed), g = grain_.load(std::memory_order_relaxed);
      try {
        fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), c * g, std::min(n, (c + 1) * g));
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mu_);
        if (!failed_.load(std::memory_order_relaxed)) {
          err_ = std::current_exception();
          failed_.store(true, std::memory_order_release);
        }
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      s = state_.load(std::memory_order_acquire);
    }
  }

  // Out of a call a helper spins idle_ns_ (the clock read every 256 pauses), then sleeps; < 0: kIdleSpins
  // pauses, as before session 27 (~1 ms on the EPYC, 0.23 ms on the Ice Lake-class Xeon: 14 ns a pause).
  // Why by the clock (session 27, helper C): on the Xeon the small shape's batch-1 gap between two steps
  // (~0.25-0.3 ms of the engine's Python, every object cold) outlasted the count, and with the prefetch
  // side jobs off the helper slept before 27 of 32 tokens (bench_decode_phases.py --trace: the step's
  // start 37 us after its entry against 10 awake).
  static constexpr int64_t kIdleSpins = 1 << 14;
  static constexpr int64_t kIdleNs = 1000000;
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  std::atomic<int64_t> idle_ns_{kIdleNs};
  const int64_t threads_;
  uint64_t seq_ = 0;  // the master's count of posted loops
  uint64_t wakes_ = 0;
  std::mutex owner_;
  alignas(64) std::atomic<uint64_t> state_{0};
  std::atomic<Fn> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1}, chunks_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<bool> active_{false}, failed_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mu_, err_mu_;
  std::condition_variable cv_;
  std::exception_ptr err_;
  // the side job (master-written while none is pending; read by the helper that claimed it)
  Range side_[kSideRanges] = {};
  int side_n_ = 0, side_hint_ = 2;
  bool side_pending_ = false;
  uint64_t side_seq_ = 0, side_posts_ = 0;
  alignas(64) std::atomic<bool> side_stop_{false};
  mutable std::atomic<uint64_t> side_runs_{0};
};

// The team the calling thread is the master of (set by the native decode step for its call,
// between begin() and end()), or none: parallel_chunks then forks at::parallel_for as before.
inline Team*& current_team() {
  static thread_local Team* team = nullptr;
  return team;
}

// The threads a split made here runs on: the current team's (inside a decode step's call), else
// torch's (at::get_num_threads(), the at::parallel_for region's). One expression, so that the
// splits that size their pieces by it (parallel_chunks, parallel_owned, panel_bf16.cpp's owned
// M = 1 split) cannot drift apart.
inline int64_t current_threads() {
  const Team* team = current_team();
  return team ? team->threads() : at::get_num_threads();
}

// CODESHELL_SMALL_SPLIT=off (read once a call by the native decode step; for A/B runs only):
// the small loops split over the threads since session 17 (fused.cpp's few rows and GELU
// pieces, sampling.cpp's argmax segments) run as before session 17. This thread's flag;
// false unless a step set it.
inline bool& small_split_off() {
  static thread_local bool off = false;
  return off;
}

// EXPERIMENT (session 18 A; CODESHELL_CHUNKS_TEAM=1, read per call, off by default): parallel_chunks
// outside a decode step's Team runs its chunks on the process's shared Team (Team::shared) instead of
// an at::parallel_for region. Why try it: with another runnable process on the second core, every
// 2-thread at::parallel_for call waited ~8 ms for its second thread to be scheduled (the OpenMP
// region joins both threads), whatever its size; the Team's master claims the chunks a descheduled
// helper never took and returns (docs/kernels-log.md, session 18 helper A).
inline bool chunks_in_team() {
  return env_flag("CODESHELL_CHUNKS_TEAM", false);
}

// Runs f(i0, i1) over [0, n) in chunks of exactly `grain` items (the last one shorter) that the threads
// claim one after another: parallel_chunks' runner, also called with a grain of the caller's own (bf16
// M = 1, panel_bf16_m1.h). Inside a Team's call the chunks go to that team's threads.
template <class F>
inline void parallel_grain(int64_t n, int64_t grain, const F& f) {
  Team* team = current_team();
  const int64_t threads = current_threads();
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  if (team != nullptr && threads > 1 && chunks > 1) {
    team->run(n, grain, f);
    return;
  }
  if (threads == 1 || chunks == 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  if (chunks_in_team()) {  // the process's Team for this one loop, when no other call holds it
    Team* t = Team::shared(threads);
    if (t->try_own()) {
      t->begin();
      try {
        t->run(n, grain, f);
      } catch (...) {
        t->end();
        t->disown();
        throw;
      }
      t->end();
      t->disown();
      return;
    }
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      f(c * grain, std::min(n, (c + 1) * grain));
  });
}

// Runs f(i0, i1) over [0, n) in chunks of a multiple of `align` items that the threads claim
// one after another (about 8 per thread, none below `min_items`), instead of at::parallel_for's
// one fixed share per thread.
// Why: on a machine whose cores are shared (the server's event loop and its clients, other
// processes), a fixed split makes every call wait for its slowest thread; claimed chunks let a
// thread that was descheduled do less. The chunks stay long enough to stream sequentially.
// Inside a Team's call (current_team()), the chunks go to that team's threads.
template <class F>
inline void parallel_chunks(int64_t n, int64_t align, int64_t min_items, const F& f) {
  const int64_t threads = current_threads();
  int64_t grain = std::max(min_items, (n + 8 * threads - 1) / (8 * threads));
  grain = (grain + align - 1) / align * align;
  parallel_grain(n, grain, f);
}

// parallel_owned's shares: one atomic word a thread (front << 32 | back), each thread's contiguous share of
// [0, n) in multiples of `align`. Also chunks_scoped's owned split (panel_bf16_amx.h).
struct alignas(64) OwnedShare {
  std::atomic<uint64_t> fb;
};

inline void owned_shares_init(OwnedShare* sh, int64_t threads, int64_t n, int64_t align) {
  for (int64_t t = 0; t < threads; ++t) {
    auto edge = [&](int64_t i) { return std::min(n, i == threads ? n : (n * i / threads + align - 1) / align * align); };
    sh[t].fb.store(uint64_t(edge(t)) << 32 | uint64_t(edge(t + 1)), std::memory_order_relaxed);
  }
}

// Thread `me`'s claims: its own share from the front in steps of `step`, then steps from the back of the
// others' (every step claimed by one CAS, so each item runs once); f(a, b, pend): pend = the end of the
// thread's own share still ahead (a stolen step: b), for a prefetch that runs on into the next step.
template <class F>
inline void owned_claims(OwnedShare* sh, int64_t threads, int64_t me, int64_t align, int64_t step, const F& f) {
  for (int64_t o = 0; o < threads; ++o) {
    std::atomic<uint64_t>& w = sh[(me + o) % threads].fb;
    for (uint64_t v = w.load(std::memory_order_acquire);;) {
      const int64_t fr = int64_t(v >> 32), bk = int64_t(v & 0xffffffffu);
      if (fr >= bk) break;
      int64_t a, b;
      uint64_t nv;
      if (o == 0) {  // own share: the next step from the front
        a = fr, b = std::min(bk, fr + step);
        nv = uint64_t(b) << 32 | uint64_t(bk);
      } else {  // another's: a step from its back
        a = std::max(fr, (bk - step) / align * align), b = bk;
        nv = uint64_t(fr) << 32 | uint64_t(a);
      }
      if (!w.compare_exchange_weak(v, nv, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      f(a, b, o == 0 ? bk : b);
      v = w.load(std::memory_order_acquire);
    }
  }
}

// Runs f(i0, i1) over [0, n) with one contiguous share per thread, taken front to back in steps of
// `step` items (a multiple of `align`), and a thread whose share is done then takes steps from the
// BACK of the other shares (each share is one atomic word: front << 32 | back; every step is
// claimed by one CAS, so each item runs once).
// Why: parallel_chunks' ~8 chunks a thread restart each thread's read stream 8 times a call; for a
// batch-1 decode linear that streams its weights once, one stream a thread read faster on the AMD
// EPYC (a standalone copy of the int4 M = 1 loops, 2 threads, cold, a fast minute of the host:
// +4-9% with 1-2 chunks a thread; docs/kernels-log.md, session 17 helper B). The steal from the back
// keeps what parallel_chunks is for: a descheduled thread's share is finished by the other.
// In the extension's int4 M = 1 calls (bench_kernels --sweep, slow minutes) it ran 0.97-0.98x
// parallel_chunks, so it is not the default there.
// For sub-MiB int4 M = 1 calls (the small shape) it won (1.12-1.23x at 2 threads, session 18 helper A).
// Who calls it: int4 M = 1 without AMX for weights under 4 MiB, or with CODESHELL_Q4_M1_SPLIT=1; int8
// M = 1 with CODESHELL_Q8_M1_SPLIT=1 (qdot.cpp); parallel_chunks is unchanged.
template <class F>
inline void parallel_owned(int64_t n, int64_t align, int64_t step, const F& f) {
  Team* team = current_team();
  const int64_t threads = std::min<int64_t>(current_threads(), 64);
  step = std::max<int64_t>(align, step / align * align);
  if (threads == 1 || n <= step || n >= (int64_t(1) << 31) || (team == nullptr && at::in_parallel_region())) {
    f(0, n);
    return;
  }
  OwnedShare sh[64];
  owned_shares_init(sh, threads, n, align);
  auto share = [&](int64_t me) {
    owned_claims(sh, threads, me, align, step, [&](int64_t a, int64_t b, int64_t) { f(a, b); });
  };
  if (team != nullptr) {
    team->run(threads, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t t = i0; t < i1; ++t) share(t);
    });
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t t = i0; t < i1; ++t) share(t);
  });
}

}  // namespace codeshell
