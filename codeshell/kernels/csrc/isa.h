// Instruction sets: what this CPU (and OS) supports, and the macros that open a per-ISA section.
//
// What this is: runtime detection (cpuid, xgetbv, and for AMX the Linux permission request
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) plus `CODESHELL_BEGIN_*` / `END` macros
// that compile the code between them for a higher ISA than the baseline (-march=x86-64-v3,
// AVX2+FMA) with GCC's target pragma. The extension therefore builds on any x86-64 machine
// whose compiler knows these ISAs, and a kernel of a higher ISA only runs after the Python
// dispatcher (codeshell/kernels/ops.py) has seen the feature in `cpu_features()`; every such
// entry point also TORCH_CHECKs it, so a wrong call raises instead of executing an illegal
// instruction.
// What this is not: a dispatcher. Which kernel runs for which call is decided in one place,
// ops.py (`plan`), which passes the chosen ISA down.
#pragma once

#include <cstdint>

// The compiler must know the ISA for the section to exist at all (GCC >= 11 for AMX and
// AVX512-BF16 intrinsics used here; clang >= 12). Without it the section compiles to nothing
// and the feature is reported absent.
// -DCODESHELL_HAVE_AVX512=0 builds the AVX2-only extension (how an old compiler builds it).
#ifndef CODESHELL_HAVE_AVX512
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12)
#define CODESHELL_HAVE_AVX512 1
#else
#define CODESHELL_HAVE_AVX512 0
#endif
#endif

#if defined(__clang__)
#define CODESHELL_BEGIN_AVX512                                                                                     \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,amx-tile,amx-bf16,amx-int8\"))), apply_to = function)")
#define CODESHELL_END_AVX512 _Pragma("clang attribute pop")
#else
// One section for AVX-512F/BW/VL/DQ + VNNI + BF16 + AMX: the kernels inside are only ever
// called when their own feature is present (ops.py and the TORCH_CHECKs), so the union of
// the flags is only a permission to emit the instructions, never a claim about the CPU.
#define CODESHELL_BEGIN_AVX512                                                                                     \
  _Pragma("GCC push_options")                                                                                      \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,amx-tile,amx-bf16,amx-int8\")")
#define CODESHELL_END_AVX512 _Pragma("GCC pop_options")
#endif

namespace codeshell {

// ISA levels in the order the dispatcher may cap them (CODESHELL_KERNEL_ISA): each level's
// kernels need the features of the levels below it too.
enum Isa : int64_t {
  kAvx2 = 0,        // AVX2 + FMA (the baseline; the build is not loaded without it)
  kAvx512Vnni = 1,  // AVX-512 F/BW/VL/DQ + VNNI (vpdpbusd): int8/int4 integer dots
  kAvx512Bf16 = 2,  // + AVX512-BF16 (vdpbf16ps): bf16 weights x bf16 activations
  kAmx = 3,         // + AMX-TILE/BF16/INT8 with the OS permission: tiles for prefill
};

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx512 = false;  // XCR0 enables the zmm/opmask state
  bool amx_permitted = false;  // arch_prctl granted XTILEDATA to this process
  int64_t max_isa = -1;  // highest Isa whose features are all usable, -1 without AVX2
  // AMD family 19h with AVX-512 (Zen 4: 512-bit ops run as two 256-bit halves). Only for defaults measured
  // on that core (session 39 helper C: the M = 1 read loops, panel_bf16_m1.h and qdot_int8.cpp's prefetch).
  bool zen4 = false;
};

// Detected once per process (thread-safe static); asks the kernel for AMX permission once.
const CpuFeatures& cpu_features();

// TORCH_CHECK that `isa` is usable here (called by every entry point that takes an isa).
void check_isa(int64_t isa);

}  // namespace codeshell
