// The native decode step's Python binding (`register_decode_step`, called from kernels.cpp's module),
// and the test hooks that run kernels as the step runs them.
//
// What this is: the pybind11 class `DecodeStep` (decode_step.h; every call without the GIL, as the
// kernels), and, for the tests and kernels/step.py: argmax_rows_rounded (decode's picks), same_entries
// (step.py's `_Checks.valid`), run_in_team (a function as the master of the step's thread team), the
// switches' cache (env_switches*, env_cache_stats), team_side_jobs, decode_int8_q8_wsum and
// decode_int4_q8_packed (the int8 / int4 hints as the step gives them). What this is not: any of the
// step's work (decode_step.cpp, step_layers.cpp).

#include <torch/extension.h>

#include <omp.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "decode_step.h"
#include "entry.h"
#include "parallel.h"
#include "q8_rows_t.h"
#include "q8_wsum.h"
#include "switches.h"

namespace {

using codeshell::step::DecodeStep;

void bind_class(py::module& m) {
  py::class_<DecodeStep>(m, "DecodeStep",
                         "A decode / verify step's blocks and final LayerNorm in one call (csrc/decode_step.cpp)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("H"), py::arg("G"), py::arg("D"),
           py::arg("attn_isa"))
      .def("add_linear", &DecodeStep::add_linear, "(kind, kernel, isa, data, scales, offsets, bias, group, N, K) -> index")
      .def("add_layer", &DecodeStep::add_layer,
           "(ln1 weight, bias, eps, c_attn, c_proj, ln2 weight, bias, eps, c_fc, mlp c_proj)")
      .def("set_final", &DecodeStep::set_final, "ln_f's weight, bias, eps")
      .def_property_readonly("layers", &DecodeStep::layers)
      // The whole step runs without the GIL, as the kernels it calls do (kernels.cpp).
      .def("run", &DecodeStep::run, py::call_guard<py::gil_scoped_release>(),
           "(x, cos, sin, k cache, v cache, slots, positions, lens, scale) -> ln_f output bf16 [M, C]")
      .def("decode", &DecodeStep::decode, py::call_guard<py::gil_scoped_release>(), py::arg("tokens"),
           py::arg("positions"), py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"), py::arg("scale"),
           py::arg("want_logits") = true,
           "(tokens, positions, slots, k cache, v cache, scale, want_logits=True) -> (logits bf16 [M, V] or None, "
           "greedy picks)")
      .def("decode_greedy", &DecodeStep::decode_greedy, py::call_guard<py::gil_scoped_release>(), py::arg("token"),
           py::arg("position"), py::arg("slot"), py::arg("n"), py::arg("stop"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("scale"), py::arg("budget_ns") = 0,
           "(token, position, slot, n, stop ids, k cache, v cache, scale, budget_ns=0) -> up to n greedy picks of one sequence "
           "(each fed back at the next position; stops after a pick in stop)")
      .def("decode_greedy_rows", &DecodeStep::decode_greedy_rows, py::call_guard<py::gil_scoped_release>(),
           py::arg("tokens"), py::arg("positions"), py::arg("slots"), py::arg("ns"), py::arg("stops"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("scale"), py::arg("budget_ns") = 0,
           "(tokens, positions, slots, ns, stop ids per row, k cache, v cache, scale, budget_ns=0) -> each row's "
           "greedy picks (up to ns[r], stopping after a pick in stops[r]; a stopped row leaves the batch)")
      .def("set_head", &DecodeStep::set_head, "the output head: a linear index (add_linear)")
      .def("set_embedding", &DecodeStep::set_embedding, "(kind 0 panels / 1 rows, bf16 table, V)")
      .def("set_rope", &DecodeStep::set_rope, "RoPE's inverse frequencies fp32 [D/2]")
      .def_property("team", &DecodeStep::team, &DecodeStep::set_team,
                    "the whole step in one thread team: 0 off, 1 on, 2 auto (on where the layers are small)")
      .def_property_readonly("uses_team", &DecodeStep::use_team)
      .def_property_readonly("far_prefetch", &DecodeStep::far_prefetch_kpairs,
                             "k-pairs of the bf16 batched rows' L2 prefetch in its calls (0: none; step_hints.h)")
      .def_property("profile", &DecodeStep::profile, &DecodeStep::set_profile,
                    "time each phase of decode's calls (setting it clears the sums)")
      .def("copy_bytes_made", &DecodeStep::copy_bytes_made, "bytes of q8_rows_t.h's transposed copies made so far")
      .def("copies_fit", &DecodeStep::copies_fit, "the weights and their transposed copies fit 3/4 of the LLC")
      .def("profile_times", &DecodeStep::profile_times, "(calls, [(phase, seconds summed over the calls)])")
      .def("profile_marks", &DecodeStep::profile_marks,
           "every phase mark since profile was set on, in order: (phase, nanoseconds) (per-call quantiles)")
      .def("trace_times", &DecodeStep::trace_times,
           "decode's calls since profile was set on: (entry, body start, body end, exit) steady_clock ns "
           "(time.perf_counter_ns's clock) and 1 where the call woke a sleeping helper of its team");
}

void bind_step_checks(py::module& m) {
  // For the tests: decode's picks without bf16 logits must equal argmax_rows on them, ties included.
  m.def(
      "argmax_rows_rounded",
      [](const torch::Tensor& logits) {
        TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32 &&
                        logits.size(1) > 0,
                    "argmax_rows_rounded: logits must be a contiguous fp32 [N, V] tensor with V > 0");
        auto out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kInt64));
        argmax_rows_rounded(logits.data_ptr<float>(), logits.size(0), logits.size(1), out.data_ptr<int64_t>());
        return out;
      },
      py::call_guard<py::gil_scoped_release>(),
      "the first maximal index of each row of fp32 logits [N, V] rounded to bf16 (argmax_rows of .to(bfloat16))");
  // kernels/step.py's `_Checks.valid` (every decode / verify step, before the native call): whether
  // dicts[i].get(keys[i]) is objs[i] for every i and tensors[j]._version == versions[j]. The same
  // answer as its Python loops; why native: after a step has streamed the weights through the caches,
  // the ~200 dicts a small-shape model's check reads are all cold, and Python's loop takes their misses
  // one after another (~65 us a token in place, 11 us in a hot loop, session 20 helper B); here the
  // loop is a few instructions an entry, so the out-of-order core overlaps the misses of many entries,
  // and each dict is prefetched a few entries ahead.
  m.def(
      "same_entries",
      [](const py::list& dicts, const py::list& keys, const py::list& objs, const py::list& tensors,
         const py::list& versions) -> bool {
        const Py_ssize_t n = PyList_GET_SIZE(dicts.ptr());
        TORCH_CHECK(PyList_GET_SIZE(keys.ptr()) == n && PyList_GET_SIZE(objs.ptr()) == n &&
                        PyList_GET_SIZE(tensors.ptr()) == PyList_GET_SIZE(versions.ptr()),
                    "same_entries: dicts, keys and objs (and tensors and versions) must have one entry each");
        PyObject** d = reinterpret_cast<PyListObject*>(dicts.ptr())->ob_item;
        PyObject** k = reinterpret_cast<PyListObject*>(keys.ptr())->ob_item;
        PyObject** o = reinterpret_cast<PyListObject*>(objs.ptr())->ob_item;
        constexpr Py_ssize_t kAhead = 8;
        for (Py_ssize_t i = 0; i < n && i < kAhead; ++i) __builtin_prefetch(d[i]);
        for (Py_ssize_t i = 0; i < n; ++i) {
          if (i + kAhead < n) __builtin_prefetch(d[i + kAhead]);
          TORCH_CHECK(PyDict_Check(d[i]), "same_entries: entry ", i, " is not a dict");
          PyObject* v = PyDict_GetItemWithError(d[i], k[i]);  // borrowed; NULL: absent (dict.get's None)
          if (v == nullptr) {
            if (PyErr_Occurred()) throw py::error_already_set();
            v = Py_None;
          }
          if (v != o[i]) return false;
        }
        const Py_ssize_t nt = PyList_GET_SIZE(tensors.ptr());
        PyObject** t = reinterpret_cast<PyListObject*>(tensors.ptr())->ob_item;
        PyObject** ver = reinterpret_cast<PyListObject*>(versions.ptr())->ob_item;
        for (Py_ssize_t j = 0; j < nt; ++j) {
          TORCH_CHECK(THPVariable_Check(t[j]), "same_entries: tensors[", j, "] is not a tensor");
          const long long want = PyLong_AsLongLong(ver[j]);
          if (want == -1 && PyErr_Occurred()) throw py::error_already_set();
          if (int64_t(THPVariable_Unpack(t[j])._version()) != want) return false;
        }
        return true;
      },
      "dicts[i].get(keys[i]) is objs[i] for all i and tensors[j]._version == versions[j] for all j "
      "(kernels/step.py _Checks.valid)");
}

void bind_team(py::module& m) {
  // For the tests: fn() with the calling thread as the master of the process's thread team (as
  // inside a step with the team on), so the kernels fn calls split their loops as they do in a
  // step (fused.cpp's for_rows / for_pieces, sampling.cpp's row segments).
  // Returns (fn's result, the loops that went to the helpers); False without a team (1 thread,
  // or another thread holds it).
  m.def("run_in_team", [](const py::function& fn) -> py::object {
    const int threads = at::get_num_threads();
    codeshell::Team* t = threads > 1 && codeshell::current_team() == nullptr ? codeshell::Team::shared(threads) : nullptr;
    if (t == nullptr || !t->try_own()) return py::bool_(false);
    omp_set_num_threads(1);
    codeshell::small_split_off() = false;
    t->begin();
    codeshell::current_team() = t;
    auto done = [&] {
      codeshell::current_team() = nullptr;
      t->end();
      t->disown();
      omp_set_num_threads(threads);
    };
    const uint64_t loops0 = t->loops();
    try {
      py::object r = fn();
      const uint64_t loops = t->loops() - loops0;
      done();
      return py::make_tuple(r, loops);
    } catch (...) {
      done();
      throw;
    }
  }, "fn() as the master of the thread team (as inside a decode step with the team on)");
}

void bind_switches(py::module& m) {
  // For the tests (test_switch_cache.py): the switches' cache (switches.h) from Python. A name is
  // interned first (the cache is keyed by a name's address; a node set's strings never move).
  struct Names {
    std::set<std::string> set;
    const char* get(const std::string& n) { return set.insert(n).first->c_str(); }
  };
  static Names* names = new Names();  // never freed: its strings are cache keys for the process
  static const auto read_switches = [](const std::vector<std::string>& ns) {
    std::vector<c10::optional<std::string>> out;
    for (const std::string& n : ns) {
      const char* v = codeshell::env_detail::get(names->get(n));
      out.push_back(v == nullptr ? c10::nullopt : c10::optional<std::string>(v));
    }
    return out;
  };
  m.def("env_switches", [](const std::vector<std::string>& ns) { return read_switches(ns); },
        "each name's value (None: unset) read through the switches' cache, as env_flag / env_int read it");
  m.def("env_switches_scoped", [](const std::vector<std::string>& ns, py::function fn) {
    // inside one EnvScope (as a decode step's call): the values before fn(), and after it
    const codeshell::EnvScope scope;
    auto before = read_switches(ns);
    fn();
    return py::make_tuple(before, read_switches(ns));
  }, "(values, values after fn()) read inside one EnvScope");
  m.def("env_cache_stats", [] {
    const codeshell::env_detail::State& s = codeshell::env_detail::state;
    return py::make_tuple(s.checks, s.changes, s.lookups, s.off);
  }, "this thread's switch cache: (fingerprint checks, changes seen, cached lookups, CODESHELL_ENV_CACHE=0)");
}

void bind_kernel_hooks(py::module& m) {
  // For the tests (test_step_prefetch.py): the process team's (posted, taken by a helper) prefetch
  // side jobs so far (parallel.h Team::prefetch_async); (0, 0) with one thread.
  m.def("team_side_jobs", []() -> py::tuple {
    const int threads = at::get_num_threads();
    if (threads < 2) return py::make_tuple(0, 0);
    const codeshell::Team* t = codeshell::Team::shared(threads);
    return py::make_tuple(t->side_posts(), t->side_runs());
  }, "(prefetch side jobs posted, taken by a helper) of the process's thread team");
  // For the tests (test_q8_wsum.py): decode_int8_q8 with the weight's block sums table hinted as
  // the decode step hints it at batch > 1 (q8_wsum.h); the table made here per call.
  m.def("decode_int8_q8_wsum", [](const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                  const c10::optional<torch::Tensor>& bias, int64_t isa) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(1) % 128 == 0,
                "q must be a contiguous int8 [N, K] tensor with K % 128 == 0");
    // as the step: CODESHELL_Q8R_WSUM=0 neither makes nor hands over a table
    const bool on = codeshell::env_flag("CODESHELL_Q8R_WSUM", true);
    const std::vector<int32_t> sums =
        on ? codeshell::q8rows::block_sums(q.data_ptr<int8_t>(), q.size(0), q.size(1)) : std::vector<int32_t>();
    // and, as the step, q8_rows_t.h's transposed copy at 5..8 rows (CODESHELL_Q8R_TP=0: none)
    std::vector<uint8_t> packed;
#if CODESHELL_HAVE_AVX512
    if (on && x.dim() == 2 && x.size(0) >= 5 && x.size(0) <= 8 && codeshell::env_flag("CODESHELL_Q8R_TP", true))
      packed = codeshell::q8rt::pack(q.data_ptr<int8_t>(), q.size(0), q.size(1));
#endif
    codeshell::q8rows::SumsHintScope hint(q.data_ptr<int8_t>(), q.size(0), q.size(1), on ? sums.data() : nullptr,
                                          packed.empty() ? nullptr : packed.data());
    return decode_int8_q8(x, q, scale, bias, isa);
  }, "decode_int8_q8 with q's block sums (and at 5..8 rows its transposed copy) hinted (the decode step's batch > 1 int8 calls)");
  // For the tests (test_q8_rows_t.py): decode_int4_q8 with q's q8_rows_t.h copy hinted at 5..8 rows
  // as the decode step hints it (made here per call; CODESHELL_Q8R_TP4=0: none).
  m.def("decode_int4_q8_packed", [](const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                    const c10::optional<torch::Tensor>& offset, int64_t G,
                                    const c10::optional<torch::Tensor>& bias, int64_t isa) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && scale.is_contiguous() &&
                    (!offset.has_value() || offset->is_contiguous()),
                "q must be contiguous uint8 nibbles [N, K / 2] with contiguous scales / offsets");
#if CODESHELL_HAVE_AVX512
    const int64_t N = q.size(0), K = 2 * q.size(1);
    if (x.dim() == 2 && x.size(0) >= 5 && x.size(0) <= 8 && K % 128 == 0 && (G == 128 || G == 256) &&
        codeshell::env_flag("CODESHELL_Q8R_TP4", true)) {
      const codeshell::q8rt::Pack4 p = codeshell::q8rt::pack_q4(
          q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.has_value() ? offset->data_ptr<float>() : nullptr, N, K, G);
      codeshell::q8rows::SumsHintScope hint(q.data_ptr(), N, K, nullptr, nullptr, &p);
      return decode_int4_q8(x, q, scale, offset, G, bias, isa);
    }
#endif
    return decode_int4_q8(x, q, scale, offset, G, bias, isa);
  }, "decode_int4_q8 with q's transposed copy hinted at 5..8 rows (the decode step's batch 5..8 int4 calls)");
}

}  // namespace

void register_decode_step(py::module& m) {
  bind_class(m);
  bind_step_checks(m);
  bind_team(m);
  bind_switches(m);
  bind_kernel_hooks(m);
}
