// Standalone: the AMX-INT8 row tiles (qgemm_amx.cpp rows_panel, MT = 1: M <= 16 rows of x) against
// schedules with more C tiles in flight, on int8 weights [N, K] read once a call (cycled through a buffer
// larger than L2, so they come from L3 as in the decode step), 1 thread, thread CPU time (the host is shared). Session 38 helper B
// (docs/kernels-log.md). Not a test: prints ns a (panel, 128-k block) and GB/s of weights, medians of 7.
//
//   g++ -O2 -mamx-tile -mamx-int8 -mavx512f -mavx512bw -mavx512dq -mavx512vl benchmarks/standalone/amx_q8_rows8.cpp \
//       -o /tmp/amx_q8_rows8 && /tmp/amx_q8_rows8 [N K]
//
// cur: rows_panel<1>'s schedule: per block zero C, 2 k-tiles (A tmm4/5, B tmm6/7), store C, the epilogue of
//   the block 3 back (int32 -> fp32 fma into acc), C tiles alternating tmm0 / tmm1 by block;
// blk4: 4 blocks of one panel in flight (C tmm0..3), then their 4 stores and the previous group's epilogues;
// pan2: 2 panels a block (one B load serves both), C sets alternating by block (tmm0/1, tmm2/3);
// pan4: 4 panels a block (tmm0..3), one B load a k-tile for the four;
// tmul: cur without the epilogue and C stores (the tiles alone); read: the same bytes read in order (a probe);
// pf2: cur with its L2 prefetch 2 panels ahead; nopf: cur without it; panel8: q8_panel.h's transposes and
// block_rows<8> (8 rows of x, vpdpbusd) on the same weights; cpyA: cur with each block's A rows copied to a
// contiguous L1 stage first (K = 4096: 16 rows 4 KiB apart share L1 sets).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct alignas(64) Cfg { uint8_t palette = 1, start = 0, r[14] = {}; uint16_t colsb[16] = {}; uint8_t rows[16] = {}; };

static int64_t N = 4096, K = 1024;
static const int64_t B = 128, D = 64;

static void cfg_load() {
  static Cfg c;
  for (int t = 0; t < 8; ++t) { c.rows[t] = t >= 6 ? D / 4 : 16; c.colsb[t] = 64; }
  __asm__ volatile("" ::"r"(&c) : "memory");
  _tile_loadconfig(&c);
}

static inline void pf_l2(const int8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
}

// acc [16 blocks mod 16][16 rows][16 x-rows] += cvt(ci) * d
static inline void epi(const int32_t* ci, float* acc, int64_t blk, const float* d) {
  const __m512 dv = _mm512_loadu_ps(d + (blk & 15) * 16);
  float* a = acc + (blk & 15) * 256;
  for (int r = 0; r < 16; ++r)
    _mm512_store_ps(a + r * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ci + r * 16)), dv, _mm512_load_ps(a + r * 16)));
}

// q8_panel.h's transposes (16 x 16 int32 in registers) and block_rows<8> for comparison.
static inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) { a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]); a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]); }
  for (int g = 0; g < 4; ++g) {
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]); b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]); b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xee);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44), c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xee);
    r[j] = _mm512_shuffle_i32x4(c0, c2, 0x88); r[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
    r[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88); r[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
  }
}
static void panel8(const int8_t* w, const int8_t* xq, float* acc, int32_t* wt, const float* d) {
  const int64_t nb = K / B, P = N / 16;
  const __m512i s80 = _mm512_set1_epi8(int8_t(0x80));
  for (int64_t p = 0; p < P; ++p) {
    const int8_t* rp = w + p * 16 * K;
    for (int64_t b = 0; b < nb; ++b) {
      for (int h = 0; h < 2; ++h) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int8_t* q = rp + i * K + b * B + 64 * h;
          _mm_prefetch(reinterpret_cast<const char*>(q + 16 * K), _MM_HINT_T1);
          r[i] = _mm512_xor_si512(_mm512_loadu_si512(q), s80);
        }
        transpose16(r);
        for (int q = 0; q < 16; ++q) _mm512_store_si512(wt + (16 * h + q) * 16, r[q]);
      }
      __m512i a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_si512();
      const int8_t* x0 = xq + b * B;
      for (int q = 0; q < 32; ++q) {
        const __m512i wv = _mm512_load_si512(wt + q * 16);
        for (int i = 0; i < 8; ++i) {
          int32_t xv;
          std::memcpy(&xv, x0 + i * K + 4 * q, 4);
          a[i] = _mm512_dpbusd_epi32(a[i], wv, _mm512_set1_epi32(xv));
        }
      }
      const __m512 dv = _mm512_set1_ps(d[b & 15]);
      for (int i = 0; i < 8; ++i) {
        float* ac = acc + (i * 16 + (b & 15)) * 16;
        _mm512_store_ps(ac, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i]), dv, _mm512_load_ps(ac)));
      }
    }
  }
}

template <int V>
static void run(const int8_t* w, const int8_t* xt, float* acc, int32_t* ci, const float* d) {
  const int64_t nb = K / B, P = N / 16;
  if constexpr (V == 5) {  // read: the same bytes in order, one vpdpbusd a 64-byte line (4 chains)
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    const __m512i one = _mm512_set1_epi8(1);
    for (int64_t o = 0; o < N * K; o += 256) {
      s0 = _mm512_dpbusd_epi32(s0, one, _mm512_load_si512(w + o));
      s1 = _mm512_dpbusd_epi32(s1, one, _mm512_load_si512(w + o + 64));
      s2 = _mm512_dpbusd_epi32(s2, one, _mm512_load_si512(w + o + 128));
      s3 = _mm512_dpbusd_epi32(s3, one, _mm512_load_si512(w + o + 192));
    }
    _mm512_store_si512(ci, _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
    return;
  }
  if constexpr (V == 9) {  // cpyA: each block's 16 rows x 128 k copied to a contiguous L1 stage, A tiles from it
    alignas(64) static int8_t stage[2][16 * 128];
    for (int64_t p = 0; p < P; ++p) {
      const int8_t* a = w + p * 16 * K;
      const int8_t* nx = a + 16 * K;
      for (int64_t j = 0; j < nb; ++j) {
        int8_t* st = stage[j & 1];
        for (int r = 0; r < 16; ++r) {
          const int8_t* src = a + r * K + j * B;
          _mm512_store_si512(st + r * 128, _mm512_loadu_si512(src));
          _mm512_store_si512(st + r * 128 + 64, _mm512_loadu_si512(src + 64));
        }
        if (p + 1 < P) pf_l2(nx + j * B * 16, B * 16);
        __asm__ volatile("" ::: "memory");
        const bool odd = j & 1;
        if (odd) _tile_zero(1); else _tile_zero(0);
        const int8_t* b = xt + j * B * 16;
        _tile_loadd(4, st, 128); _tile_loadd(6, b, 64);
        if (odd) _tile_dpbssd(1, 4, 6); else _tile_dpbssd(0, 4, 6);
        _tile_loadd(5, st + 64, 128); _tile_loadd(7, b + D * 16, 64);
        if (odd) _tile_dpbssd(1, 5, 7); else _tile_dpbssd(0, 5, 7);
        if (j >= 3) epi(ci + ((j - 3) & 3) * 256, acc, j - 3, d);
        __asm__ volatile("" ::: "memory");
        if (odd) _tile_stored(1, ci + (j & 3) * 256, 64); else _tile_stored(0, ci + (j & 3) * 256, 64);
        __asm__ volatile("" ::: "memory");
      }
      for (int64_t j = std::max<int64_t>(0, nb - 3); j < nb; ++j) epi(ci + (j & 3) * 256, acc, j, d);
    }
    return;
  }
  if constexpr (V == 0 || V == 4 || V == 6 || V == 7) {  // cur / tmul / cur pf 2 panels ahead / cur no prefetch
    for (int64_t p = 0; p < P; ++p) {
      const int8_t* a = w + p * 16 * K;
      const int8_t* nx = a + (V == 6 ? 32 : 16) * K;
      for (int64_t j = 0; j < nb; ++j) {
        const bool odd = j & 1;
        if (odd) _tile_zero(1); else _tile_zero(0);
        for (int s = 0; s < 2; ++s) {
          const int64_t k = j * B + s * D;
          if (V != 7 && p + (V == 6 ? 2 : 1) < P) pf_l2(nx + k * 16, D * 16);
          const int8_t* b = xt + k * 16;
          if (s == 0) { _tile_loadd(4, a + k, K); _tile_loadd(6, b, 64); if (odd) _tile_dpbssd(1, 4, 6); else _tile_dpbssd(0, 4, 6); }
          else { _tile_loadd(5, a + k, K); _tile_loadd(7, b, 64); if (odd) _tile_dpbssd(1, 5, 7); else _tile_dpbssd(0, 5, 7); }
        }
        if constexpr (V != 4) {
          if (j >= 3) epi(ci + ((j - 3) & 3) * 256, acc, j - 3, d);
          __asm__ volatile("" ::: "memory");
          if (odd) _tile_stored(1, ci + (j & 3) * 256, 64); else _tile_stored(0, ci + (j & 3) * 256, 64);
          __asm__ volatile("" ::: "memory");
        }
      }
      if constexpr (V != 4) for (int64_t j = std::max<int64_t>(0, nb - 3); j < nb; ++j) epi(ci + (j & 3) * 256, acc, j, d);
      else { _tile_stored(0, ci, 64); _tile_stored(1, ci, 64); }
    }
  } else if constexpr (V == 1) {  // blk4: nb % 4 == 0
    for (int64_t p = 0; p < P; ++p) {
      const int8_t* a = w + p * 16 * K;
      const int8_t* nx = a + 16 * K;
      for (int64_t j0 = 0; j0 < nb; j0 += 4) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        if (p + 1 < P) pf_l2(nx + j0 * B * 16, 4 * B * 16);
        for (int s = 0; s < 2; ++s) {
#define STEP(I, TA, TB)                                              \
  { const int64_t k = (j0 + I) * B + s * D;                          \
    _tile_loadd(TA, a + k, K); _tile_loadd(TB, xt + k * 16, 64);     \
    _tile_dpbssd(I, TA, TB); }
          STEP(0, 4, 6) STEP(1, 5, 7) STEP(2, 4, 6) STEP(3, 5, 7)
#undef STEP
        }
        if (j0 >= 4) for (int i = 0; i < 4; ++i) epi(ci + ((j0 - 4 + i) & 7) * 256, acc, j0 - 4 + i, d);
        __asm__ volatile("" ::: "memory");
        int32_t* c = ci + (j0 & 7) * 256;
        _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64); _tile_stored(2, c + 512, 64); _tile_stored(3, c + 768, 64);
        __asm__ volatile("" ::: "memory");
      }
      for (int i = 0; i < 4; ++i) epi(ci + ((nb - 4 + i) & 7) * 256, acc, nb - 4 + i, d);
    }
  } else if constexpr (V == 2) {  // pan2
    for (int64_t p = 0; p < P; p += 2) {
      const int8_t* a0 = w + p * 16 * K;
      const int8_t* a1 = a0 + 16 * K;
      const int8_t* nx = a0 + 32 * K;
      for (int64_t j = 0; j < nb; ++j) {
        const bool odd = j & 1;
        if (odd) { _tile_zero(2); _tile_zero(3); } else { _tile_zero(0); _tile_zero(1); }
        for (int s = 0; s < 2; ++s) {
          const int64_t k = j * B + s * D;
          if (p + 2 < P) pf_l2(nx + k * 32, D * 32);
          const int8_t* b = xt + k * 16;
          if (s == 0) {
            _tile_loadd(6, b, 64); _tile_loadd(4, a0 + k, K); _tile_loadd(5, a1 + k, K);
            if (odd) { _tile_dpbssd(2, 4, 6); _tile_dpbssd(3, 5, 6); } else { _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 5, 6); }
          } else {
            _tile_loadd(7, b, 64); _tile_loadd(4, a0 + k, K); _tile_loadd(5, a1 + k, K);
            if (odd) { _tile_dpbssd(2, 4, 7); _tile_dpbssd(3, 5, 7); } else { _tile_dpbssd(0, 4, 7); _tile_dpbssd(1, 5, 7); }
          }
        }
        if (j >= 2) { epi(ci + ((j - 2) & 3) * 512, acc, j - 2, d); epi(ci + ((j - 2) & 3) * 512 + 256, acc + 4096, j - 2, d); }
        __asm__ volatile("" ::: "memory");
        int32_t* c = ci + (j & 3) * 512;
        if (odd) { _tile_stored(2, c, 64); _tile_stored(3, c + 256, 64); } else { _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64); }
        __asm__ volatile("" ::: "memory");
      }
      for (int64_t j = nb - 2; j < nb; ++j) { epi(ci + (j & 3) * 512, acc, j, d); epi(ci + (j & 3) * 512 + 256, acc + 4096, j, d); }
    }
  } else if constexpr (V == 3) {  // pan4
    for (int64_t p = 0; p < P; p += 4) {
      const int8_t* a0 = w + p * 16 * K;
      const int8_t* nx = a0 + 64 * K;
      for (int64_t j = 0; j < nb; ++j) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int s = 0; s < 2; ++s) {
          const int64_t k = j * B + s * D;
          if (p + 4 < P) pf_l2(nx + k * 64, D * 64);
          const int8_t* b = xt + k * 16;
          if (s == 0) {
            _tile_loadd(6, b, 64);
            _tile_loadd(4, a0 + k, K); _tile_dpbssd(0, 4, 6);
            _tile_loadd(5, a0 + 16 * K + k, K); _tile_dpbssd(1, 5, 6);
            _tile_loadd(4, a0 + 32 * K + k, K); _tile_dpbssd(2, 4, 6);
            _tile_loadd(5, a0 + 48 * K + k, K); _tile_dpbssd(3, 5, 6);
          } else {
            _tile_loadd(7, b, 64);
            _tile_loadd(4, a0 + k, K); _tile_dpbssd(0, 4, 7);
            _tile_loadd(5, a0 + 16 * K + k, K); _tile_dpbssd(1, 5, 7);
            _tile_loadd(4, a0 + 32 * K + k, K); _tile_dpbssd(2, 4, 7);
            _tile_loadd(5, a0 + 48 * K + k, K); _tile_dpbssd(3, 5, 7);
          }
        }
        if (j >= 1) for (int i = 0; i < 4; ++i) epi(ci + ((j - 1) & 1) * 1024 + i * 256, acc + i * 4096, j - 1, d);
        __asm__ volatile("" ::: "memory");
        int32_t* c = ci + (j & 1) * 1024;
        _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64); _tile_stored(2, c + 512, 64); _tile_stored(3, c + 768, 64);
        __asm__ volatile("" ::: "memory");
      }
      for (int i = 0; i < 4; ++i) epi(ci + ((nb - 1) & 1) * 1024 + i * 256, acc + i * 4096, nb - 1, d);
    }
  }
}

int main(int argc, char** argv) {
  if (argc >= 3) { N = atoll(argv[1]); K = atoll(argv[2]); }
  syscall(SYS_arch_prctl, 0x1023, 18);
  const int64_t bytes = N * K, copies = std::max<int64_t>(2, (int64_t(64) << 20) / bytes);
  int8_t* w = static_cast<int8_t*>(std::aligned_alloc(64, bytes * copies + 64 * K));
  for (int64_t i = 0; i < bytes * copies; ++i) w[i] = int8_t((i * 7 + 3) % 255 - 127);
  int8_t* xt = static_cast<int8_t*>(std::aligned_alloc(64, 16 * K));
  for (int64_t i = 0; i < 16 * K; ++i) xt[i] = int8_t(i % 13 - 6);
  float* acc = static_cast<float*>(std::aligned_alloc(64, 4 * 4096 * 4));
  int32_t* ci = static_cast<int32_t*>(std::aligned_alloc(64, 8 * 1024 * 4));
  std::memset(acc, 0, 4 * 4096 * 4);
  float d[256];
  for (int i = 0; i < 256; ++i) d[i] = 0.001f * (i % 7 + 1);
  cfg_load();
  const char* names[] = {"cur", "blk4", "pan2", "pan4", "tmul", "read", "pf2", "nopf", "panel8", "cpyA"};
  constexpr int NV = 10;
  int32_t* wt = static_cast<int32_t*>(std::aligned_alloc(64, 32 * 16 * 4));
  std::vector<double> t[NV];
  int64_t c = 0;
  for (int rep = 0; rep < 7; ++rep)
    for (int v = 0; v < NV; ++v) {
      const int calls = 8;
      timespec t0, t1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
      for (int i = 0; i < calls; ++i, c = (c + 1) % copies) {
        const int8_t* wc = w + c * bytes;
        switch (v) {
          case 0: run<0>(wc, xt, acc, ci, d); break;
          case 1: run<1>(wc, xt, acc, ci, d); break;
          case 2: run<2>(wc, xt, acc, ci, d); break;
          case 3: run<3>(wc, xt, acc, ci, d); break;
          case 4: run<4>(wc, xt, acc, ci, d); break;
          case 5: run<5>(wc, xt, acc, ci, d); break;
          case 6: run<6>(wc, xt, acc, ci, d); break;
          case 8: panel8(wc, xt, acc, wt, d); break;
          case 9: run<9>(wc, xt, acc, ci, d); break;
          default: run<7>(wc, xt, acc, ci, d); break;
        }
      }
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
      t[v].push_back(((t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec)) / calls);
    }
  _tile_release();
  printf("N %ld K %ld (%ld copies, cycled)\n", long(N), long(K), long(copies));
  for (int v = 0; v < NV; ++v) {
    std::sort(t[v].begin(), t[v].end());
    const double s = t[v][3];
    printf("%-5s %8.1f us  %6.2f ns a (panel, block)  %5.1f GB/s\n", names[v], s * 1e6, s * 1e9 / (N / 16 * (K / B)), bytes / s / 1e9);
  }
  return 0;
}
