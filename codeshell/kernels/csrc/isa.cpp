// Runtime CPU feature detection for the kernels (see isa.h): cpuid, the OS-enabled register
// state (xgetbv), and Linux's opt-in for AMX tile data. Not a dispatcher (ops.py is).

#include "isa.h"

#include <torch/extension.h>

#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace codeshell {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux >= 5.16 keeps AMX tile data (8 KiB of state per thread) off until a process asks;
// tile instructions fault (SIGILL) before that. The permission covers every thread of the
// process, including the OpenMP workers created later.
bool request_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
  unsigned long bits = 0;
  if (syscall(SYS_arch_prctl, kGetXcompPerm, &bits) != 0) return false;
  return (bits >> kXtileData) & 1;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const unsigned fam = ((a >> 8) & 0xf) + (((a >> 8) & 0xf) == 0xf ? (a >> 20) & 0xff : 0);  // display family
  unsigned v0, vb, vc, vd;
  const bool amd = __get_cpuid(0, &v0, &vb, &vc, &vd) && vb == 0x68747541u;  // "AuthenticAMD" ("Auth" in ebx)
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = os_avx && ((b >> 5) & 1);
    f.avx512f = f.os_avx512 && ((b >> 16) & 1);
    f.avx512dq = f.os_avx512 && ((b >> 17) & 1);
    f.avx512bw = f.os_avx512 && ((b >> 30) & 1);
    f.avx512vl = f.os_avx512 && ((b >> 31) & 1);
    f.avx512vnni = f.os_avx512 && ((c >> 11) & 1);
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    f.amx_int8 = (d >> 25) & 1;
    const unsigned max_sub = a;
    if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = f.os_avx512 && ((a >> 5) & 1);
  }
  f.fma = f.fma && os_avx;
  f.zen4 = amd && fam == 0x19 && f.avx512f;
  if (f.amx_tile && f.amx_bf16 && (xcr0 & (3ull << 17)) == (3ull << 17)) f.amx_permitted = request_amx();
  if (f.avx2 && f.fma) {
    f.max_isa = kAvx2;
    const bool avx512 = CODESHELL_HAVE_AVX512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    if (avx512 && f.avx512vnni) {
      f.max_isa = kAvx512Vnni;
      if (f.avx512bf16) {
        f.max_isa = kAvx512Bf16;
        if (f.amx_tile && f.amx_bf16 && f.amx_int8 && f.amx_permitted) f.max_isa = kAmx;
      }
    }
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= cpu_features().max_isa, "kernel ISA level ", isa,
              " is not usable on this CPU (highest: ", cpu_features().max_isa, ")");
}

}  // namespace codeshell

// Python: codeshell.kernels._ext.get().cpu_features() -> dict
py::dict cpu_features_dict() {
  const auto& f = codeshell::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512_vnni"] = f.avx512vnni;
  d["avx512_bf16"] = f.avx512bf16;
  d["amx_tile"] = f.amx_tile;
  d["amx_bf16"] = f.amx_bf16;
  d["amx_int8"] = f.amx_int8;
  d["os_avx512"] = f.os_avx512;
  d["amx_permitted"] = f.amx_permitted;
  d["zen4"] = f.zen4;
  d["compiled_avx512"] = bool(CODESHELL_HAVE_AVX512);
  d["max_isa"] = f.max_isa;
  return d;
}
