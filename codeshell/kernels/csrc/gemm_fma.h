// fp32-FMA prefill GEMM for bf16 panel weights, written once over the vector width (header-only).
//
// What this is: `avx2:gemm` (ops.py; prefill_bf16_fma with isa 0): y [M, N] = x [M, K] (bf16 or
// fp32) @ W^T (+ bias) -> fp32, W in panel_bf16.cpp's panel layout, for prefill-sized M (> 64), BLIS
// style on fp32 FMA:
//   * x is widened (bf16 -> fp32 is exact) and packed once per call:
//     [K chunk][row tile][kc / L][MR][L] (L = the vector's fp32 lanes; zero rows past M, zero k past
//     K), a vector copy of each row's L k (no transpose);
//   * work items of `item` panels; per item and K chunk (KC k) the item's panels are widened
//     (even k = v << 16, odd k = v & 0xffff0000) into a per-thread fp32 buffer [group][kc][NV * L]
//     (L2), then for each group of NV * L / 16 panels every row tile runs the register block over
//     that group's kc x NV * L chunk (L1-resident across the tiles): MR rows x NV vectors of
//     columns, per k NV vector loads of the weight, MR broadcasts of x, MR * NV FMAs and no widening
//     in the inner loop; the item's fp32 sums wait in c [T * MR][item * 16] between chunks;
//   * the next tile's x is prefetched into L1 on the way, and the next chunk's weight lines into
//     L2 a few per tile (the small shape's 168 MiB of weights come from DRAM every prompt; a panel's
//     chunk is 8 KiB over two 4 KiB pages, where the L2 streamer stops).
// Bits: every (row, output) is one FMA chain over k = 0, 1, ..., Kp - 1 in order, started from zero
// (the stores and reloads of the sums between chunks are exact), with x[m, k] * w[n, k] as
// fma(x, w, acc): exactly the chain `avx2:panel` (Avx2::micro: k-pairs in order, even then odd k)
// runs. So a row's result does not depend on M or on its tile, and it is the SAME BITS as the
// decode path (tests/kernels/test_bf16_avx2_gemm.py checks both).
// Vector types: V256 (AVX2 + FMA, 16 ymm: MR = 6 rows x NV = 2 vectors = one 16-row panel, 12
// accumulators + 2 weight vectors + a broadcast). A 512-bit traits struct would give prefill_fma's
// block (6 x 4 zmm) from this source; prefill_fma (panel_bf16.cpp, `avx512_vnni:gemm`) keeps its own
// code for now: its fused bf16 / GELU epilogues and tuned packs were measured on AVX-512 machines,
// and this session's machine (AMD Zen 3, AVX2 only) cannot check their bits or speed.
// Included by panel_bf16.cpp inside its anonymous namespace, after kPanel, padded_k and store_rows.
// Switches (read per call, A/B runs): CODESHELL_FMA2_KC=<k> (K chunk, a multiple of 32; default
// kKC), CODESHELL_FMA2_ITEM=<panels per work item> (default kItem), CODESHELL_FMA2_WPF=0 (no
// software prefetch of the next weight chunk), CODESHELL_FMA2_EPI=0 (session 34: the item's sums
// stored to out by one store_rows pass after its last chunk, instead of each tile's rows (+ bias)
// right after its last block call, `store_tile`; the same bits either way).
// What this is not: the M <= 64 decode kernels (decode_panels), a GELU / bf16-out epilogue.
#pragma once

namespace fma_gemm {

// 256-bit fp32 vectors: AVX2 + FMA (the extension's baseline, compiled everywhere).
struct V256 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static I loadi(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F even(I v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
  static F odd(I v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u)))); }
  // kLanes consecutive bf16 values widened to fp32 (exact)
  static F from_bf16(const uint16_t* p) { return codeshell::load_bf16x8(p); }
};

constexpr int64_t kKC = 256;   // k per chunk: the group's widened chunk 16 KiB (L1) at NV * L = 16
constexpr int64_t kItem = 4;   // panels per work item: sums [M][64] fp32 (128 KiB at M = 512, L2)

// c [MR][NV * L] (row stride ldc) (+)= a . b over kc k: a the tile's x [kc / L][MR][L], b the
// widened weight [kc][NV * L]; pf: the next tile's x (prefetched into L1 on the way), or null.
// Every loop over rows and vectors is unrolled by pragma: without that GCC 12 kept acc[][] in
// memory (a stack store after every FMA pair: 12 stores a k, the store ports' rate, ~0.78 of the
// FMA rate one thread measured), and inlined into run's loop it spilled too (hence noinline).
template <class V, int MR, int NV>
__attribute__((noinline)) void block(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool first,
                                     const float* pf) {
  constexpr int L = V::kLanes;
  typename V::F acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? V::zero() : V::loadu(c + i * ldc + v * L);
  for (int64_t k0 = 0; k0 < kc; k0 += L) {
    if (pf)
      for (int l = 0; l < L * MR * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + k0 * MR) + l, _MM_HINT_T0);
    const float* a8 = a + k0 * MR;  // this block of L k: [MR][L]
    const float* b8 = b + k0 * NV * L;
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) {
      typename V::F bv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b8 + j * NV * L + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const typename V::F xb = V::bcast(a8 + i * L + j);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(xb, bv[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) V::storeu(c + i * ldc + v * L, acc[i][v]);
}

// np panels' k-pairs [j0, j0 + kc / 2) (panel q at w + q * pstride, uint32 units) widened into b:
// group g (NV * L / 16 panels) at b + g * kc * NV * L, [kc][NV * L]; a short last group's missing
// panels are zeros.
template <class V, int NV>
inline void widen(const uint32_t* w, int64_t pstride, int64_t np, int64_t j0, int64_t kc, float* b) {
  constexpr int L = V::kLanes, G = NV * L / 16;  // panels a group
  static_assert(NV * L % 16 == 0 && 16 % L == 0, "a group is whole panels");
  for (int64_t q = 0; q < (np + G - 1) / G * G; ++q) {
    float* bg = b + (q / G) * kc * NV * L + (q % G) * 16;
    for (int64_t j = 0; j < kc / 2; ++j)
      for (int u = 0; u < 16 / L; ++u) {
        float* d = bg + 2 * j * NV * L + u * L;
        if (q >= np) {
          V::store(d, V::zero());
          V::store(d + NV * L, V::zero());
          continue;
        }
        const typename V::I v = V::loadi(w + q * pstride + (j0 + j) * 16 + u * L);
        V::store(d, V::even(v));
        V::store(d + NV * L, V::odd(v));
      }
  }
}

// One tile's final sums c [rows][NV * L] (row stride ldc, just written by block: L1) -> out rows
// (stride N), columns [0, cols) (+ bias[j]): store_rows' arithmetic (c + bias in fp32, else a
// copy), so the same bits. Why (session 34 helper C): the item's one store_rows pass after its
// last chunk re-read every row of c (T * MR rows x item * 16 fp32, 128 KiB at M = 512: L2) on
// one thread between two items; at K <= KC (codeshell-mini's K = 256: one chunk) that pass was
// a copy of each sum right after it was computed.
template <class V, int MR, int NV>
inline void store_tile(const float* c, int64_t ldc, int64_t rows, float* out, int64_t N, int64_t cols,
                       const float* bias) {
  constexpr int L = V::kLanes;
  for (int64_t i = 0; i < rows; ++i) {
    const float* ci = c + i * ldc;
    float* o = out + i * N;
    if (cols == NV * L) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        V::storeu(o + v * L, bias ? V::add(V::loadu(ci + v * L), V::loadu(bias + v * L)) : V::loadu(ci + v * L));
      continue;
    }
    for (int64_t j = 0; j < cols; ++j) o[j] = bias ? ci[j] + bias[j] : ci[j];
  }
}

// x (bf16 when xb, else fp32) [M, K] @ panels w ([P][Kh][16] uint32 k-pairs) -> out fp32 [M, N] (+ bias).
template <class V, int MR, int NV>
void run(const void* x, bool xb, int64_t M, int64_t K, const uint32_t* w, int64_t N, const float* bias, float* out) {
  constexpr int L = V::kLanes, G = NV * L / 16;
  const int64_t Kp = padded_k(K), Kh = Kp / 2, P = (N + kPanel - 1) / kPanel, T = (M + MR - 1) / MR;
  const int64_t KC = std::max<int64_t>(32, codeshell::env_int("CODESHELL_FMA2_KC", kKC) / 32 * 32);
  const int64_t item = std::max<int64_t>(G, codeshell::env_int("CODESHELL_FMA2_ITEM", kItem) / G * G);
  const bool wpf = codeshell::env_flag("CODESHELL_FMA2_WPF", true);
  const bool epi = codeshell::env_flag("CODESHELL_FMA2_EPI", true);  // 0: the item's store_rows pass (A/B)
  // x packed: chunk at k0 at xp + k0 * T * MR, tile t at + t * kc * MR, [kc / L][MR][L]
  static thread_local codeshell::ThreadScratch x_keep;
  codeshell::Scratch<float> xs(x_keep, size_t(T) * MR * Kp);
  float* xp = xs.data();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t kc = std::min(KC, Kp - k0);
        float* d = xp + k0 * T * MR + t * kc * MR;
        for (int64_t kb = 0; kb < kc; kb += L)  // kc is a multiple of 32 (kKAlign)
          for (int i = 0; i < MR; ++i) {
            const int64_t m = t * MR + i, k = k0 + kb;
            const int64_t kin = m < M ? std::max<int64_t>(0, std::min<int64_t>(L, K - k)) : 0;
            float* dv = d + kb * MR + i * L;
            if (kin == L) {
              V::store(dv, xb ? V::from_bf16(static_cast<const uint16_t*>(x) + m * K + k)
                              : V::loadu(static_cast<const float*>(x) + m * K + k));
              continue;
            }
            for (int l = 0; l < L; ++l) {
              float f = 0.f;
              if (l < kin) {
                f = xb ? codeshell::bf16_to_f32(static_cast<const uint16_t*>(x)[m * K + k + l])
                       : static_cast<const float*>(x)[m * K + k + l];
              }
              dv[l] = f;
            }
          }
      }
  });
  const int64_t items = (P + item - 1) / item, ldc = item * kPanel;
  codeshell::parallel_chunks(items, 1, 1, [&](int64_t i0, int64_t i1) {
    static thread_local codeshell::ThreadScratch c_keep, b_keep;
    codeshell::Scratch<float> cs(c_keep, size_t(T) * MR * ldc);
    codeshell::Scratch<float> bs(b_keep, size_t(KC) * item * kPanel);
    float* c = cs.data();
    float* b = bs.data();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t pa = it * item, pb = std::min(P, pa + item);
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t kc = std::min(KC, Kp - k0);
        widen<V, NV>(w + pa * Kh * kPanel, Kh * kPanel, pb - pa, k0 / 2, kc, b);
        // The weight chunk widened next (this item's next chunk, else the next item's first), a
        // line (one k-pair of one panel) at a time, spread over this chunk's tile calls.
        int64_t wl = 0, wnj = 1, wper = 0, wq = 0, wj = 0;  // line l = wq * wnj + wj
        const uint32_t* wn = nullptr;
        if (wpf) {
          int64_t pn = pa, pe = pb, kn = k0 + KC;
          if (kn >= Kp && it + 1 < i1) pn = pb, pe = std::min(P, pb + item), kn = 0;
          if (kn < Kp) {
            wnj = std::min(KC, Kp - kn) / 2;
            wl = (pe - pn) * wnj;
            wn = w + (pn * Kh + kn / 2) * kPanel;
            const int64_t calls = (pb - pa + G - 1) / G * T;
            wper = (wl + calls - 1) / calls;
          }
        }
        const float* xc = xp + k0 * T * MR;
        for (int64_t g = 0; g < (pb - pa + G - 1) / G; ++g) {
          const float* bg = b + g * kc * NV * L;
          float* cg = c + g * G * kPanel;
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t n = 0; n < wper && wq * wnj + wj < wl; ++n) {
              _mm_prefetch(reinterpret_cast<const char*>(wn + wq * Kh * kPanel + wj * kPanel), _MM_HINT_T1);
              if (++wj == wnj) wj = 0, ++wq;
            }
            block<V, MR, NV>(xc + t * kc * MR, bg, kc, cg + t * MR * ldc, ldc, k0 == 0,
                             t + 1 < T ? xc + (t + 1) * kc * MR : nullptr);
            if (epi && k0 + kc >= Kp) {  // the tile's sums are final: out (+ bias) while in L1
              const int64_t n0 = (pa + g * G) * kPanel;
              store_tile<V, MR, NV>(cg + t * MR * ldc, ldc, std::min<int64_t>(MR, M - t * MR), out + t * MR * N + n0, N,
                                    std::min<int64_t>(NV * L, N - n0), bias ? bias + n0 : nullptr);
            }
          }
        }
      }
      if (!epi) {
        const int64_t n0 = pa * kPanel;
        store_rows(c, ldc, M, out, N, n0, std::min(N, pb * kPanel) - n0, bias);
      }
    }
  });
}

}  // namespace fma_gemm
