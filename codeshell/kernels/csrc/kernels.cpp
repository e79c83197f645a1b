// Weight-only matmul kernels for CodeShell inference on AVX2+FMA CPUs.
//
// What this is: y[M,N] = x[M,K] @ W^T (+ bias) where W is stored compactly
// (bfloat16, int8 per-output-channel, or int4 group-wise) and x/y are fp32.
//   * decode_*   : small M (1..~16). Each weight row is read from memory once and
//                  multiplied with all M rows of x, dequantising on the fly into
//                  fp32 registers; fp32 accumulation. Memory-bandwidth bound.
//   * dequant_*  : expand a block of weight rows to fp32 so that prefill (large M)
//                  can run on MKL's sgemm through torch.mm (see codeshell/kernels/ops.py).
// bf16 weights (panels of 16 rows) live in panel_bf16.cpp, the int8-activation kernels for
// int8/int4 weights in qdot.cpp (decode) and qgemm_amx.cpp (AMX-INT8 prefill), decode attention
// in attention.cpp; this file binds them all.
// What this is not: a general GEMM; the AVX-512/AMX kernels live in per-ISA sections of
// panel_bf16.cpp, qdot.cpp and qgemm_amx.cpp (isa.h); there is no scalar-only build (the Python loader falls
// back to torch instead).
//
// Why hand-written: torch 2.13 on AVX2 runs bf16 F.linear through a path that re-reads
// the weight per row of x (M=8 costs 8x M=1) and has no weight-only int4 path with
// arbitrary zero points and group sizes that streams the weight once for a batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "entry.h"
#include "parallel.h"
#include "q8_gemm_avx2.h"
#include "read_probe.h"
#include "simd.h"

#include <atomic>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// Loaders: 8 consecutive weights -> 8 fp32 lanes (unscaled).
struct I8 {
  using T = int8_t;
  static inline __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline float load1(const T* p) { return float(*p); }
};

// acc[i][j] = sum_k x[i,k] * w[j,k] for an MB x NB tile; writes raw dot products.
template <class L, int MB, int NB>
inline void tile_dense(const float* x, int64_t ldx, const typename L::T* w, int64_t ldw, int64_t K,
                       float* out, int64_t ldo) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = L::load8(w + j * ldw + k);
    for (int i = 0; i < MB; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = codeshell::hsum8(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * L::load1(w + j * ldw + kk);
      out[i * ldo + j] = s;
    }
}

// One block of NB weight rows against all M rows of x (M split into tiles of <= 4).
template <class L, int NB>
inline void rows_dense(const float* x, int64_t M, int64_t K, const typename L::T* w, int64_t ldw,
                       float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_dense<L, 4, NB>(x + m * K, K, w, ldw, K, out + m * ldo, ldo);
  switch (M - m) {
    case 3: tile_dense<L, 3, NB>(x + m * K, K, w, ldw, K, out + m * ldo, ldo); break;
    case 2: tile_dense<L, 2, NB>(x + m * K, K, w, ldw, K, out + m * ldo, ldo); break;
    case 1: tile_dense<L, 1, NB>(x + m * K, K, w, ldw, K, out + m * ldo, ldo); break;
    default: break;
  }
}

// out[m, n] = dot(x[m], w[n]) * scale[n] + bias[n] over rows [n0, n1).
template <class L, int NB>
void range_dense(const float* x, int64_t M, int64_t K, const typename L::T* w, const float* scale,
                 const float* bias, float* out, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_dense<L, NB>(x, M, K, w + n * K, K, out + n, N);
  for (; n < n1; ++n) rows_dense<L, 1>(x, M, K, w + n * K, K, out + n, N);
  if (scale || bias) {
    for (int64_t mm = 0; mm < M; ++mm)
      for (int64_t j = n0; j < n1; ++j) {
        float v = out[mm * N + j];
        if (scale) v *= scale[j];
        if (bias) v += bias[j];
        out[mm * N + j] = v;
      }
  }
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns but the weight has K=", K);
}

const float* opt_ptr(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == n,
              what, " must be a contiguous fp32 tensor with ", n, " elements");
  return t->data_ptr<float>();
}

// Rows in chunks of a multiple of 16 that the threads claim (parallel.h).
template <class F>
void parallel_rows(int64_t N, F&& f) {
  codeshell::parallel_chunks(N, 16, 64, f);
}

// ---- int4 group-wise -------------------------------------------------------------
// Layout (see codeshell/kernels/quant.py): q uint8 [N, K/2]; each run of 32 weights
// k0..k0+31 occupies 16 bytes, byte i = nib(k0+i) | nib(k0+16+i) << 4, nibble = q + 8
// with q in [-8, 7]. Dequantised weight = (nibble - 8) * scale[n, g] + offset[n, g].

// Expands 16 packed bytes into four fp32 vectors of (nibble - 8) for k0+0..7, 8..15, 16..23, 24..31.
inline void unpack32(const uint8_t* p, __m256 v[4]) {
  const __m128i m0f = _mm_set1_epi8(0x0f), e8 = _mm_set1_epi8(8);
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i lo = _mm_sub_epi8(_mm_and_si128(b, m0f), e8);
  __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m0f), e8);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

void check_q4(const torch::Tensor& q, const torch::Tensor& scale, const c10::optional<torch::Tensor>& offset,
              int64_t K, int64_t G) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous(),
              "int4 weight must be a contiguous uint8 [N, K/2] tensor");
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "int4 group size ", G,
              " must be a multiple of 32 that divides K=", K);
  TORCH_CHECK(q.size(1) * 2 == K, "int4 weight has ", q.size(1), " bytes per row, expected K/2=", K / 2);
  const int64_t n_sc = q.size(0) * (K / G);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == n_sc,
              "int4 scales must be a contiguous fp32 [N, K/group] tensor");
  if (offset.has_value())
    TORCH_CHECK(offset->scalar_type() == torch::kFloat32 && offset->is_contiguous() && offset->numel() == n_sc,
                "int4 offsets must be a contiguous fp32 [N, K/group] tensor");
}

// ---- staged path for int4 weights -------------------------------------------------------
// Unpacking int4 costs more than the FMAs it feeds; streaming tiles redo it once per 3-4 rows
// of x. It is cheaper to expand kStageRows weight rows to fp32 once (into a per-thread buffer
// that stays in L2) and run the fp32 4x3 tile over that buffer. Measured (1 core, 4096x4096,
// K-major) against the streaming tiles: int4 M=4 5.7 -> 4.5 ms, M=8 10.7 -> 6.5 ms, M=16
// 18.8 -> 11.2 ms; it now runs at every M (decode_int4). int8 unpacks cheaply enough that
// staging lost (M=16: 9.4 -> 11.4 ms), so int8 keeps the streaming tiles at every M.
constexpr int kStageRows = 3;

struct F32 {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const T* p) { return *p; }
};

inline void deq_row_int8(const int8_t* r, float s, int64_t K, float* o) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(I8::load8(r + k), sv));
  for (; k < K; ++k) o[k] = float(r[k]) * s;
}

inline void deq_row_int4(const uint8_t* r, const float* sc, const float* of, int64_t K, int64_t G, float* o) {
  for (int64_t g = 0; g < K / G; ++g) {
    const __m256 s = _mm256_set1_ps(sc[g]);
    const __m256 z = _mm256_set1_ps(of ? of[g] : 0.f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m256 v[4];
      unpack32(r + k / 2, v);
      for (int t = 0; t < 4; ++t) _mm256_storeu_ps(o + k + 8 * t, _mm256_fmadd_ps(v[t], s, z));
    }
  }
}

// deq(n, dst) writes fp32 row n of the weight to dst[0:K].
template <class Deq>
void staged_range(const float* x, int64_t M, int64_t K, Deq&& deq, const float* bias, float* out, int64_t N,
                  int64_t n0, int64_t n1) {
  std::vector<float> buf(size_t(kStageRows) * K);
  int64_t n = n0;
  for (; n + kStageRows <= n1; n += kStageRows) {
    for (int j = 0; j < kStageRows; ++j) deq(n + j, buf.data() + j * K);
    rows_dense<F32, kStageRows>(x, M, K, buf.data(), K, out + n, N);
  }
  for (; n < n1; ++n) {
    deq(n, buf.data());
    rows_dense<F32, 1>(x, M, K, buf.data(), K, out + n, N);
  }
  if (bias)
    for (int64_t mm = 0; mm < M; ++mm)
      for (int64_t j = n0; j < n1; ++j) out[mm * N + j] += bias[j];
}

}  // namespace

// Entry points (entry.h): outside the anonymous namespace, decode_step.cpp calls them too.
torch::Tensor decode_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous(),
              "int8 weight must be a contiguous int8 [N, K] tensor");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  check_x(x, K);
  const float* s = opt_ptr(scale, N, "scale");
  const float* b = opt_ptr(bias, N, "bias");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  parallel_rows(N, [&](int64_t n0, int64_t n1) {
    if (M == 1)
      range_dense<I8, 4>(xp, M, K, qp, s, b, op, N, n0, n1);
    else
      range_dense<I8, 3>(xp, M, K, qp, s, b, op, N, n0, n1);
  });
  return out;
}

torch::Tensor decode_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& offset, int64_t G,
                          const c10::optional<torch::Tensor>& bias) {
  const int64_t N = q.size(0), K = x.size(1), M = x.size(0);
  check_x(x, K);
  check_q4(q, scale, offset, K, G);
  const float* b = opt_ptr(bias, N, "bias");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op_ = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const int64_t ng = K / G;
  // The staged path at every M (row invariance, ops.ROW_INVARIANT_MAX_M: one accumulation
  // order per row whatever M is). The streaming tiles that ran M < 4 summed a row in 4 chains
  // at M = 1 and 2 at M = 2-3, so a row's bits depended on M. This kernel only runs for shapes
  // the integer kernels do not take (K % 64 != 0 or groups > 256), which models do not have.
  parallel_rows(N, [&](int64_t n0, int64_t n1) {
    staged_range(xp, M, K, [&](int64_t n, float* dst) {
      deq_row_int4(qp + n * (K / 2), sp + n * ng, op_ ? op_ + n * ng : nullptr, K, G, dst);
    }, b, outp, N, n0, n1);
  });
  return out;
}

namespace {

// ---- dequantise rows [n0, n1) into a caller-owned fp32 buffer (prefill path) -------

void dequant_int8(const torch::Tensor& q, const torch::Tensor& scale, int64_t n0, int64_t n1, torch::Tensor& out) {
  const int64_t K = q.size(1);
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous(), "int8 weight must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == q.size(0), "bad int8 scales");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              "out buffer too small");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= q.size(0), "bad row range");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) {
      const int8_t* r = qp + n * K;
      float* o = op + (n - n0) * K;
      const __m256 s = _mm256_set1_ps(sp[n]);
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(I8::load8(r + k), s));
      for (; k < K; ++k) o[k] = float(r[k]) * sp[n];
    }
  });
}

void dequant_int4(const torch::Tensor& q, const torch::Tensor& scale, const c10::optional<torch::Tensor>& offset,
                  int64_t G, int64_t n0, int64_t n1, torch::Tensor& out) {
  const int64_t K = q.size(1) * 2, ng = K / G;
  check_q4(q, scale, offset, K, G);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              "out buffer too small");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= q.size(0), "bad row range");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* ofp = offset.has_value() ? offset->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t e) {
    for (int64_t n = a; n < e; ++n) {
      float* o = op + (n - n0) * K;
      for (int64_t g = 0; g < ng; ++g) {
        const __m256 s = _mm256_set1_ps(sp[n * ng + g]);
        const __m256 z = _mm256_set1_ps(ofp ? ofp[n * ng + g] : 0.f);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          __m256 v[4];
          unpack32(qp + n * (K / 2) + k / 2, v);
          for (int t = 0; t < 4; ++t) _mm256_storeu_ps(o + k + 8 * t, _mm256_fmadd_ps(v[t], s, z));
        }
      }
    }
  });
}

}  // namespace

// The memory read probe of the benchmarks (codeshell.bench.read_bandwidth_gbs): every byte of
// `buf` read once per pass by all threads, in chunks the threads claim as the decode kernels claim
// theirs (parallel_chunks), 256-bit loads into 4 independent OR chains with the decode kernels'
// software prefetch distance, so nothing but memory bounds it. Returns the OR of all 64-bit words
// (so the loads cannot be elided). The loop is read_probe.h's probe_lines (shared with the standalones). Why not torch's sum alone: on some CPUs the float sum is not
// memory bound (Zen 4, 2 threads: torch fp32 sum 46-59 GB/s while the int8 decode kernel streamed
// weights at 62), and a probe below what the kernels reach makes "% of the bound" meaningless.
// pf: the loop's prefetch distance in bytes (0: none; read_probe.h).
int64_t read_stream(const torch::Tensor& buf, int64_t passes, int64_t pf) {
  TORCH_CHECK(buf.is_contiguous() && buf.nbytes() % 128 == 0 && passes > 0 && pf >= 0,
              "read_stream needs a contiguous buffer of a multiple of 128 bytes, passes > 0 and pf >= 0");
  const char* base = static_cast<const char*>(buf.data_ptr());
  const int64_t lines = int64_t(buf.nbytes()) / 128;  // 128-byte units: 4 loads of 32 bytes
  std::atomic<uint64_t> all{0};
  for (int64_t pass = 0; pass < passes; ++pass)
    codeshell::parallel_chunks(lines, 64, 512, [&](int64_t l0, int64_t l1) {
      all.fetch_or(codeshell::probe_lines(base, l0, l1, pf), std::memory_order_relaxed);
    });
  return int64_t(all.load());
}

torch::Tensor prefill_q8_avx2(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t G,
                              const c10::optional<torch::Tensor>& bias) {
  return codeshell::q8gemm::prefill(x, q, scale, offset, G, bias);
}

// The compute kernels run without the GIL (as torch's own ops do): the server's event loop, in
// another thread of the same process, keeps streaming tokens while the engine thread computes.
// The two short calls keep it: giving it up for ~75 us would risk waiting a whole switch
// interval (5 ms) to get it back from a busy event loop.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto kNoGil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "codeshell weight-only matmul kernels (AVX2+FMA baseline; AVX-512 VNNI/BF16 and AMX sections)";
  m.def("cpu_features", &cpu_features_dict, "cpuid/OS features and the highest usable ISA level (isa.h)");
  m.def("decode_bf16", &decode_bf16, kNoGil,
        "x [M,K] (fp32 for isa 0, bf16 for isa 2) @ w bf16 panels [ceil(N/16),Kp/2,32]^T + bias -> fp32 [M,N]");
  m.def("prefill_bf16_amx", &prefill_bf16_amx, kNoGil, py::arg("x"), py::arg("w"), py::arg("N"), py::arg("bias"),
        py::arg("gelu") = false, py::arg("out_bf16") = false,
        "AMX-BF16: x bf16 [M,K] @ panels^T + bias -> fp32 [M,N]; gelu / out_bf16 (M > 16): bf16 as prefill_bf16_dot's");
  m.def("bf16_peak", &bf16_peak, kNoGil, "AMX bf16 ceiling: every thread runs tiles on L2-resident data; flops");
  m.def("prefill_bf16_dot", &prefill_bf16_dot, kNoGil, py::arg("x"), py::arg("w"), py::arg("N"), py::arg("bias"),
        py::arg("gelu") = false, py::arg("out_bf16") = false,
        "AVX512-BF16 (vdpbf16ps) prefill: x bf16 [M,K] @ panels^T + bias -> fp32 [M,N]; gelu: "
        "bf16 gelu_tanh of it (rounded to bf16 first); out_bf16: it rounded to bf16");
  m.def("bf16_dot_peak", &bf16_dot_peak, kNoGil,
        "vdpbf16ps ceiling: every thread runs the prefill's register block on L1-resident data; flops");
  m.def("prefill_bf16_fma", &prefill_bf16_fma, kNoGil, py::arg("x"), py::arg("w"), py::arg("N"), py::arg("bias"),
        py::arg("gelu") = false, py::arg("out_bf16") = false, py::arg("isa") = 1,
        "fp32-FMA prefill GEMM: x bf16 or fp32 [M,K] @ panels^T + bias -> fp32 [M,N]; isa 1: AVX-512F "
        "(gelu / out_bf16 as prefill_bf16_dot's), isa 0: AVX2 (gemm_fma.h; fp32 out only)");
  m.def("bf16_fma_peak", &bf16_fma_peak, kNoGil,
        "fp32-FMA ceiling (isa 0: avx2:panel's block; 1: prefill_bf16_fma's): every thread on L1-resident data; flops");
  m.def("rows_bf16", &rows_bf16, kNoGil, "rows [n0,n1) of bf16 panels -> bf16 [R,K] row-major buffer");
  m.def("gather_bf16", &gather_bf16, kNoGil, "rows ids (int64 [R]) of bf16 panels -> bf16 [R,K] row-major buffer");
  m.def("decode_int8", &decode_int8, kNoGil, "x fp32 [M,K] @ (q int8 [N,K] * scale[N])^T + bias");
  m.def("decode_int4", &decode_int4, kNoGil, "x fp32 [M,K] @ dequant(q4 [N,K/2], scale, offset, group)^T + bias");
  m.def("decode_int4_q8", &decode_int4_q8, kNoGil, "int4 weight x int8-quantised x (blocks = groups), small M");
  m.def("decode_int8_q8", &decode_int8_q8, kNoGil, "int8 weight x int8-quantised x (blocks of q8_block_int8(K))");
  m.def("prefill_q8_amx", &prefill_q8_amx, kNoGil,
        "AMX-INT8: int8 (G = 0) or int4 weight x int8-quantised x (decode's blocks), any M -> fp32 [M,N]");
  m.def("prefill_q8_amx_epi", &prefill_q8_amx_epi, kNoGil, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("G"), py::arg("bias"), py::arg("gelu") = false,
        "AMX-INT8 prompt tiles (M > 64, no int4 offsets): x bf16 or fp32 -> bf16 [M,N], the sum rounded "
        "(gelu: its GELU), as prefill_bf16_amx's epilogues");
  m.def("prefill_q8_vnni", &prefill_q8_vnni, kNoGil,
        "AVX512-VNNI: int8 (G = 0) or int4 weight x int8-quantised x (decode's blocks), any M -> fp32 [M,N]");
  m.def("prefill_q8_avx2", &prefill_q8_avx2, kNoGil,
        "AVX2 (vpmaddwd) GEMM: int8 (G = 0) or int4 weight x int8-quantised x (decode's blocks), prefill M -> fp32 [M,N]");
  m.def("q8_block_int8", &q8_block_int8, "activation block size the int8 x int8 kernel uses for K");
  m.def("sample_temperature", &sample_temperature, "inverse-CDF draw from softmax(logits / T) with uniform u");
  m.def("sample_temperature_rows", &sample_temperature_rows, kNoGil, "sample_temperature for each row of [B, V]");
  m.def("argmax_rows", &argmax_rows, kNoGil, "the first maximal index of each row of fp32/bf16 logits [N, V]");
  m.def("decode_attention", &decode_attention, kNoGil, "one-query GQA attention over KV cache slots");
  m.def("packed_attention", &packed_attention, kNoGil,
        "decode_attention's result per query; consecutive queries of one slot share key/value loads");
  m.def("pack_bf16", &pack_bf16, kNoGil, "bf16 [N,K] -> panels [ceil(N/16),K,16] (see packing.prepack)");
  m.def("dequant_bf16", &dequant_bf16, kNoGil, "rows [n0,n1) of bf16 panels -> fp32 buffer, K-major");
  m.def("dequant_int8", &dequant_int8, kNoGil, "rows [n0,n1) of int8 weight -> fp32 buffer");
  m.def("dequant_int4", &dequant_int4, kNoGil, "rows [n0,n1) of int4 weight -> fp32 buffer");
  m.def("prefill_attention", &prefill_attention, kNoGil,
        "causal GQA attention of T queries per row straight from the KV cache (AVX512-BF16, or AMX-BF16 tiles with amx) -> bf16 [B,T,H,D]");
  m.def("prefill_attention_lanes", &prefill_attention_lanes, kNoGil,
        "AVX2 causal GQA prompt attention from the KV cache, 8 queries in lanes, each query decode_attention's "
        "bits -> bf16 [B,T,H,D]");
  m.def("read_stream", &read_stream, kNoGil, py::arg("buf"), py::arg("passes"), py::arg("pf") = 2048,
        "read every byte of a buffer `passes` times on all threads (bandwidth probe); pf: prefetch distance in "
        "bytes (0: none)");
  register_fused(m);
  register_decode_step(m);
}
