// The kernels' environment switches: one reader for every CODESHELL_* variable the C++ side reads.
//
// What this is: three inline readers of an environment variable (a flag, an integer, a word),
// read per call (~0.1 us against calls of >= 1 us) so that a benchmark can A/B two kernels in one
// process and a test can set a switch with monkeypatch. Each switch gives the same bits either way
// unless its own comment says otherwise.
// What this is not: configuration. Which kernel runs is decided by ops.py (`plan`) and the
// thresholds beside each kernel; these only override a default for measurements and tests.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace codeshell {

// Unset or empty -> `dflt`; a value starting with '0' -> off; anything else -> on.
inline bool env_flag(const char* name, bool dflt) {
  const char* e = std::getenv(name);
  return e && *e ? *e != '0' : dflt;
}

// Unset or empty -> `dflt`; else the value as a decimal integer (atoll: garbage reads as 0).
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return e && *e ? static_cast<int64_t>(std::atoll(e)) : dflt;
}

// Whether the variable is set to exactly `word` (the "off" of CODESHELL_SMALL_SPLIT and the like).
inline bool env_is(const char* name, const char* word) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, word) == 0;
}

}  // namespace codeshell
