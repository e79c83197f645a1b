// Standalone harness (session 21 helper C, docs/kernels-log.md): what the small shape's batch-1 step
// loses to its structure alone -- 33 cold reads a token (8 layers of c_attn / attn.c_proj / c_fc /
// mlp.c_proj at int8, 1.5 / 1 / 4 / 4 MiB, then the 68.5 MiB head) by a team of 2 spinning threads
// with a join after each read and a gap between reads (the ops between the linears) -- against one
// continuous read of the same bytes. Plain loads (no int8 arithmetic), on huge pages, two copies of
// the model's bytes read in turn (each 156 MiB, > the 32 MiB L3).
//   g++ -O3 -march=native -std=c++20 -pthread stream_calls.cpp -o stream_calls
//   flock /tmp/bench.lock nice -n -10 ./stream_calls ROUNDS GAP_US VARIANT...
// Variants: whole (one read of all bytes, one share a thread), calls (a share a thread per call,
// joined), chunks (8 chunks a thread per call, claimed), next:B (calls; each thread, as its share
// ends, runs its prefetch on into its share of the next read, B bytes of it: the prefetch stream
// does not stop at the join), pf:D (prefetch distance D bytes, default 8192).
#include <immintrin.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

static double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

struct Buf {
  const char* p;
  int64_t n;
};

static std::atomic<uint64_t> g_seq{0};
static std::atomic<int> g_done{0};
static std::atomic<int64_t> g_chunk{0};
static std::atomic<bool> g_quit{false};
static const std::vector<Buf>* g_bufs;
static int64_t g_call = 0;  // the read of this call
static std::string g_var;
static int64_t g_pf = 8192, g_next = 0;

static uint64_t sink[2 * 8];

static inline __m512i read_range(const char* p, int64_t a, int64_t b, const char* nx, int64_t nxb, __m512i acc) {
  // p[a, b): loads, T0 prefetch g_pf ahead; past b the prefetch runs on into nx[0, nxb)
  for (int64_t o = a; o < b; o += 128) {
    const int64_t f = o + g_pf;
    if (f < b) {
      _mm_prefetch(p + f, _MM_HINT_T0);
      _mm_prefetch(p + f + 64, _MM_HINT_T0);
    } else if (nx && f - b < nxb) {
      _mm_prefetch(nx + (f - b), _MM_HINT_T0);
      _mm_prefetch(nx + (f - b) + 64, _MM_HINT_T0);
    }
    acc = _mm512_or_si512(acc, _mm512_load_si512(p + o));
    acc = _mm512_or_si512(acc, _mm512_load_si512(p + o + 64));
  }
  return acc;
}

static void do_call(int t) {
  const auto& bufs = *g_bufs;
  const Buf& B = bufs[g_call];
  __m512i acc = _mm512_setzero_si512();
  if (g_var == "chunks") {
    const int64_t grain = (B.n / 16 + 4095) / 4096 * 4096;
    for (int64_t c; (c = g_chunk.fetch_add(1)) * grain < B.n;)
      acc = read_range(B.p, c * grain, std::min(B.n, (c + 1) * grain), nullptr, 0, acc);
  } else {
    const int64_t h = B.n / 2 / 4096 * 4096;
    const int64_t a = t == 0 ? 0 : h, b = t == 0 ? h : B.n;
    const char* nx = nullptr;
    int64_t nxb = 0;
    if (g_next > 0 && g_call + 1 < int64_t(bufs.size())) {
      const Buf& N = bufs[g_call + 1];
      const int64_t nh = N.n / 2 / 4096 * 4096;
      nx = N.p + (t == 0 ? 0 : nh);
      nxb = std::min(g_next, t == 0 ? nh : N.n - nh);
    }
    acc = read_range(B.p, a, b, nx, nxb, acc);
  }
  alignas(64) uint64_t v[8];
  _mm512_store_si512(v, acc);
  sink[t * 8] |= v[0];
}

static void helper() {
  uint64_t seen = 0;
  while (!g_quit.load(std::memory_order_relaxed)) {
    const uint64_t s = g_seq.load(std::memory_order_acquire);
    if (s == seen) {
      _mm_pause();
      continue;
    }
    seen = s;
    do_call(1);
    g_done.fetch_add(1, std::memory_order_release);
  }
}

static void spin_us(double us) {
  const double until = now() + us * 1e-6;
  while (now() < until) _mm_pause();
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: stream_calls ROUNDS GAP_US VARIANT...\n");
    return 2;
  }
  const int rounds = std::atoi(argv[1]);
  const double gap = std::atof(argv[2]);
  const int64_t MiB = 1 << 20;
  std::vector<int64_t> sizes;
  for (int l = 0; l < 8; ++l)
    for (int64_t s : {MiB * 3 / 2, MiB, 4 * MiB, 4 * MiB}) sizes.push_back(s);
  sizes.push_back(70144 * 1024);
  int64_t total = 0;
  for (int64_t s : sizes) total += (s + 2 * MiB - 1) / (2 * MiB) * (2 * MiB);
  const int copies = 2;
  char* mem = static_cast<char*>(mmap(nullptr, total * copies + 2 * MiB, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  mem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(mem) + 2 * MiB - 1) & ~uintptr_t(2 * MiB - 1));
  madvise(mem, total * copies, MADV_HUGEPAGE);
  std::memset(mem, 1, total * copies);
  std::vector<std::vector<Buf>> model(copies);
  int64_t bytes = 0;
  for (int c = 0; c < copies; ++c) {
    int64_t off = c * total;
    for (int64_t s : sizes) {  // each read at a 4 KiB boundary inside 2 MiB-aligned runs (the arena's layout)
      model[c].push_back(Buf{mem + off, s});
      off += (s + 2 * MiB - 1) / (2 * MiB) * (2 * MiB);
    }
  }
  for (int64_t s : sizes) bytes += s;
  std::thread th(helper);
  std::vector<std::string> vars(argv + 3, argv + argc);
  std::vector<std::vector<double>> res(vars.size());
  int copy = 0;
  for (int r = 0; r < rounds; ++r)
    for (size_t vi = 0; vi < vars.size(); ++vi) {
      const size_t v = r % 2 ? vars.size() - 1 - vi : vi;
      std::string s = vars[v];
      g_pf = 8192;
      g_next = 0;
      if (auto at = s.find(",pf:"); at != std::string::npos) g_pf = std::atoll(s.c_str() + at + 4), s = s.substr(0, at);
      if (s.rfind("next:", 0) == 0) g_next = std::atoll(s.c_str() + 5), s = "calls";
      g_var = s;
      double best = 1e9;
      for (int rep = 0; rep < 3; ++rep) {
        const std::vector<Buf>& bufs = model[copy];
        copy = (copy + 1) % copies;
        std::vector<Buf> one{Buf{bufs[0].p, 0}};
        if (s == "whole") {  // one read over the copy's span (includes the 2 MiB padding: counted below)
          one[0].n = bufs.back().p + bufs.back().n - bufs[0].p;
          g_bufs = &one;
        } else {
          g_bufs = &bufs;
        }
        const double t0 = now();
        for (g_call = 0; g_call < int64_t(g_bufs->size()); ++g_call) {
          g_chunk.store(0);
          g_done.store(0);
          g_seq.fetch_add(1, std::memory_order_release);
          do_call(0);
          while (g_done.load(std::memory_order_acquire) < 1) _mm_pause();
          if (gap > 0 && s != "whole") spin_us(gap);
        }
        const double dt = now() - t0;
        const double nb = s == "whole" ? double(one[0].n) : double(bytes);
        best = std::min(best, dt / nb * bytes);  // seconds for the model's bytes at this rate
      }
      res[v].push_back(best);
    }
  g_quit = true;
  th.join();
  std::printf("model bytes %.1f MB, %d rounds, gap %.1f us after each call\n", bytes / 1e6, rounds, gap);
  for (size_t v = 0; v < vars.size(); ++v) {
    auto x = res[v];
    std::sort(x.begin(), x.end());
    const double med = x[x.size() / 2];
    std::printf("%-22s %8.1f us a token  %6.1f GB/s  (best %.1f us)\n", vars[v].c_str(), med * 1e6, bytes / med / 1e9,
                x[0] * 1e6);
  }
  std::printf("sink %llu\n", (unsigned long long)(sink[0] | sink[8]));
}
