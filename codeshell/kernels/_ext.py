"""Builds and loads the C++ kernels (codeshell/kernels/csrc/*.cpp) once per process.

This is only the loader: a JIT build with torch.utils.cpp_extension.load into a per-user
cache directory, keyed by torch version and CPU. The baseline is compiled for x86-64-v3
(AVX2+FMA); the AVX-512 (VNNI, BF16) and AMX kernels are sections compiled with GCC's target
pragma (csrc/isa.h), so the same build works on an AVX2-only CPU and they only run when
`cpu_features()` (cpuid, xgetbv, the AMX permission) says so -- ops.py decides. It is not a
setup.py build. When the CPU lacks AVX2/FMA, there is no compiler, or the build fails,
`get()` returns None after one warning and callers fall back to plain torch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

_SRCS = [Path(__file__).with_name("csrc") / f
         for f in ("kernels.cpp", "isa.cpp", "panel_bf16.cpp", "qdot.cpp", "qdot_int4.cpp", "qdot_int8.cpp", "qgemm_amx.cpp", "attention.cpp", "sampling.cpp",
                   "fused.cpp", "decode_step.cpp", "step_layers.cpp", "step_bind.cpp", "attention_prefill.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {}

# -O3 for unrolling of the small fixed-size tiles; the x86-64-v3 set (AVX2, FMA, F16C, BMI2),
# not -march=native: the baseline kernels must be the AVX2 code an AVX2-only CPU runs (with
# -march=native the compiler would use AVX-512 registers in them here, so forcing the AVX2
# path on an AVX-512 machine would not test what CI runs); the higher ISAs are per-section
# target pragmas (csrc/isa.h). -mtune=native only schedules. -fno-math-errno and
# -fno-trapping-math only drop errno/trap bookkeeping, never reassociate sums.
# -fopenmp: at::parallel_for is a header template that is serial unless the extension itself is
# built with OpenMP (it then shares torch's bundled libgomp.so.1 and its thread count).
_ISA_BASE = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]  # = x86-64-v3, any GCC
_CFLAGS = ["-O3", *_ISA_BASE, "-mtune=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_key() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    # The source folder too: torch's build files name sources by absolute path, so two
    # checkouts sharing one folder rebuilt each other's extension (~85 s) on every switch.
    blob = "|".join([platform.machine(), model, " ".join(sorted(_cpu_flags())), torch.__version__,
                     str(_SRCS[0].parent.resolve())])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """Where the compiled extension lives ($CODESHELL_KERNELS_CACHE or ~/.cache/codeshell/kernels)."""
    root = os.environ.get("CODESHELL_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "codeshell", "kernels"
    )
    return Path(root) / _cpu_key()


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be used, or None if they are (builds on first call)."""
    get()
    return _state.get("reason")  # type: ignore[return-value]


def _build() -> ModuleType:
    if os.environ.get("CODESHELL_KERNELS_DISABLE") == "1":
        raise RuntimeError("disabled by CODESHELL_KERNELS_DISABLE=1")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"needs x86_64 with AVX2+FMA, this is {platform.machine()}")
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        raise RuntimeError("CPU lacks AVX2/FMA")
    from torch.utils import cpp_extension

    import fcntl

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file (FileBaton) that a killed build leaves behind,
    # after which every later process waits on it forever. Serialize builds with an flock
    # instead (the OS drops it when its holder dies); holding it, any baton is stale.
    with open(build / "codeshell-build.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        # Always the same ninja: two versions (pip's and the system's) keep incompatible
        # .ninja_log hashes, so a process with the other one on PATH rebuilt everything (~85 s).
        path = os.environ.get("PATH", "")
        ninja_dir = _ninja_dir()
        if ninja_dir:
            os.environ["PATH"] = ninja_dir + os.pathsep + path
        try:
            return _load(cpp_extension, build)
        finally:
            os.environ["PATH"] = path


def _ninja_dir() -> str | None:
    """The folder of pip's ninja binary, or None. `ninja.BIN_DIR` is "" inside a virtual
    environment made over the interpreter that has the package (the binary is in the base
    prefix's bin/), and then a process whose PATH finds the system's ninja first (a test's
    minimal env) rebuilt everything, and the next ordinary process rebuilt it back (~2 min each)."""
    try:
        import ninja
    except ImportError:
        return None
    import sys

    for d in (getattr(ninja, "BIN_DIR", ""), os.path.join(sys.prefix, "bin"), os.path.join(sys.base_prefix, "bin")):
        if d and os.path.isfile(os.path.join(d, "ninja")):
            return d
    return None


def _load(cpp_extension, build: Path) -> ModuleType:
    return cpp_extension.load(
        name="codeshell_kernels",
        sources=[str(p) for p in _SRCS],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=os.environ.get("CODESHELL_KERNELS_VERBOSE") == "1",
    )


def get() -> ModuleType | None:
    """The compiled module, or None (with one warning per process) when it cannot be built."""
    if "mod" in _state:
        return _state["mod"]  # type: ignore[return-value]
    with _lock:
        if "mod" not in _state:
            try:
                _state["mod"] = _build()
                _state["reason"] = None
                _cap_threads()
            except Exception as e:  # no compiler, no ninja, unsupported CPU, build error
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _state["mod"] = None
                _state["reason"] = reason
                if os.environ.get("CODESHELL_KERNELS_DISABLE") != "1":
                    warnings.warn(f"codeshell.kernels: native kernels unavailable ({reason}); using torch fallback",
                                  RuntimeWarning, stacklevel=3)
    return _state["mod"]  # type: ignore[return-value]


def _cap_threads() -> None:
    # More OpenMP threads than cores we may run on only adds context switches to these
    # bandwidth-bound kernels; cap torch's count at the affinity mask (never raise it).
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


def features() -> dict:
    """CPU/OS features the extension detected (cpuid, xgetbv, AMX permission) and `max_isa`,
    the highest usable kernel level (index into ops.ISA_LEVELS); {"max_isa": -1} without it."""
    if "features" not in _state:
        mod = get()
        _state["features"] = {"max_isa": -1} if mod is None else dict(mod.cpu_features())
    return _state["features"]  # type: ignore[return-value]


def _reset_for_tests() -> None:
    _state.clear()
    from . import ops
    ops._LEVEL.clear()
