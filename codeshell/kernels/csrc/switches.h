// The kernels' environment switches: one reader for every CODESHELL_* variable the C++ side reads.
//
// What this is: three inline readers of an environment variable (a flag, an integer, a word),
// read per call so that a benchmark can A/B two kernels in one process and a test can set a switch
// with monkeypatch. Each switch gives the same bits either way unless its own comment says otherwise.
// What this is not: configuration. Which kernel runs is decided by ops.py (`plan`) and the
// thresholds beside each kernel; these only override a default for measurements and tests.
//
// The cache (session 29, helper C). A getenv scans every "NAME=value" entry of `environ` and
// compares strings: ~50-65 ns at ~40 variables on the Ice Lake Xeon, and a batch-1 kernel call reads
// ~10 switches (~10-15 us a codeshell-mini token). Now each thread keeps, per switch name, the
// value pointer getenv returned, valid while the environment is unchanged. "Unchanged" is an exact
// fingerprint of `environ`: the array's address, its entry count and every entry's pointer (the
// first kSnap compared one by one, any beyond hashed). glibc's setenv / putenv / unsetenv (and so
// CPython's os.environ and pytest's monkeypatch.setenv, which call them) always change one of these:
// a new or replaced value is a new entry pointer (a value set before may come back as the same
// pointer, but then it holds the same text), an unset shifts the entries after it down and shortens
// the array, a new variable grows it. Comparing pointers never touches the strings, so a check costs
// ~n loads (~15-20 ns at 40 variables, against ~10 getenvs' string scans).
// When it is checked: on every read, except inside an EnvScope (the decode step's body: the
// fingerprint is checked once when the outermost scope opens, and the whole call, all its tokens
// and kernels, sees the switches as they were then; another thread changing the environment during
// a native call is as racy as it was with getenv). A team helper thread reading a switch keeps its
// own cache (thread_local: no locks) and checks on each read.
// Limits: a name must be a string literal or otherwise live and unchanged for the process (the
// cache is keyed by the name's address; every caller passes literals); a "NAME=value" string changed
// in place through C's putenv (never CPython's, which uses setenv since 3.9) is not seen.
// CODESHELL_ENV_CACHE=0 (re-read whenever the fingerprint changes): every read is a getenv again
// (after the fingerprint check), the behaviour before, for A/B runs (benchmarks/bench_switches.py).
// Tests: tests/kernels/test_switch_cache.py.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

extern char** environ;

namespace codeshell {

namespace env_detail {

constexpr int64_t kSnap = 256;  // entry pointers kept exactly (more than that: hashed)
constexpr int kSlots = 256;     // switch names a thread caches (~100 exist; past that: getenv)

struct Slot {
  const char* name;   // the caller's literal (the key: its address)
  const char* value;  // getenv(name) at `epoch`
  uint64_t epoch;
};

struct State {
  uint64_t epoch;  // bumped at each change of the fingerprint seen; 0: never checked
  uint64_t checks, changes, lookups;  // counters for the tests (env_cache_stats)
  char** env;      // environ at the last check
  int64_t n;       // its entries
  uint64_t tail;   // hash of the entries past kSnap
  bool off;        // CODESHELL_ENV_CACHE=0 at the last change
  int depth;       // open EnvScopes on this thread: > 0 trusts the last check
  char* snap[kSnap];
  Slot slots[kSlots];
};

// Constant-initialized with a trivial destructor: no TLS init wrapper on each access.
inline thread_local State state{};

// Compares `environ` with the last fingerprint; on a change records the new one and bumps the epoch.
inline void check(State& s) {
  ++s.checks;
  char** e = environ;
  bool same = s.epoch != 0 && e == s.env;
  int64_t n = 0;
  uint64_t tail = 0;
  if (e != nullptr) {
    for (; e[n] != nullptr; ++n) {
      if (n < kSnap) {
        same = same && s.snap[n] == e[n];
      } else {
        tail = (tail ^ uint64_t(reinterpret_cast<uintptr_t>(e[n]))) * 0x9E3779B97F4A7C15ull;
      }
    }
  }
  if (same && n == s.n && tail == s.tail) return;
  s.env = e;
  s.n = n;
  s.tail = tail;
  for (int64_t i = 0; i < n && i < kSnap; ++i) s.snap[i] = e[i];
  ++s.epoch;
  ++s.changes;
  const char* v = std::getenv("CODESHELL_ENV_CACHE");
  s.off = v != nullptr && *v == '0';
}

// getenv(name) through the cache.
inline const char* get(const char* name) {
  State& s = state;
  if (s.depth == 0 || s.epoch == 0) check(s);
  if (s.off) return std::getenv(name);
  ++s.lookups;
  const uint64_t h = (uint64_t(reinterpret_cast<uintptr_t>(name)) * 0x9E3779B97F4A7C15ull) >> 56;
  for (int k = 0; k < kSlots; ++k) {
    Slot& sl = s.slots[(h + k) & (kSlots - 1)];
    if (sl.name == name) {
      if (sl.epoch != s.epoch) sl.value = std::getenv(name), sl.epoch = s.epoch;
      return sl.value;
    }
    if (sl.name == nullptr) {
      sl.name = name;
      sl.value = std::getenv(name);
      sl.epoch = s.epoch;
      return sl.value;
    }
  }
  return std::getenv(name);  // the table is full
}

}  // namespace env_detail

// While one is open on a thread, that thread's switch reads trust the environment's fingerprint
// checked when the outermost one opened (see above): the decode step opens one per native call.
struct EnvScope {
  EnvScope() {
    env_detail::State& s = env_detail::state;
    if (s.depth++ == 0) env_detail::check(s);
  }
  ~EnvScope() { --env_detail::state.depth; }
  EnvScope(const EnvScope&) = delete;
  EnvScope& operator=(const EnvScope&) = delete;
};

// Unset or empty -> `dflt`; a value starting with '0' -> off; anything else -> on.
inline bool env_flag(const char* name, bool dflt) {
  const char* e = env_detail::get(name);
  return e && *e ? *e != '0' : dflt;
}

// Unset or empty -> `dflt`; else the value as a decimal integer (atoll: garbage reads as 0).
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* e = env_detail::get(name);
  return e && *e ? static_cast<int64_t>(std::atoll(e)) : dflt;
}

// Whether the variable is set to exactly `word` (the "off" of CODESHELL_SMALL_SPLIT and the like).
inline bool env_is(const char* name, const char* word) {
  const char* e = env_detail::get(name);
  return e != nullptr && std::strcmp(e, word) == 0;
}

}  // namespace codeshell
