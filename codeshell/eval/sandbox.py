"""Execution sandbox for model-written programs.

Each program runs in a fresh temporary folder, in its own session and process group, with:

* resource limits set by util-linux ``prlimit`` (CPU seconds, address space, process count,
  file size, no core dumps) -- an exec'd binary rather than ``preexec_fn`` because the
  executor runs many sandboxes from threads, where ``preexec_fn`` may deadlock;
* a wall-clock timeout after which the whole process group is SIGKILLed;
* a scrubbed environment (PATH, HOME=TMPDIR=the folder, LANG) and stdin on /dev/null;
* where the kernel allows it, new network, PID and mount namespaces (``unshare``): no
  network interface but a downed loopback, every process of the program dies with it
  (PID 1 of the namespace), and every writable filesystem except the program's folder is
  re-mounted read-only;
* when started as root, the program itself runs as an unprivileged per-worker uid (root is
  exempt from RLIMIT_NPROC, so a fork bomb would not be contained otherwise). It keeps
  CAP_DAC_READ_SEARCH only, so toolchains installed under /root stay readable while
  nothing outside its folder is writable.

Isolation modes, picked by :func:`probe_isolation` (first one that works on this kernel):
``root-ns`` (root: namespaces + uid drop), ``user-ns`` (non-root: ``unshare -r``; the
process count is then per user namespace on Linux >= 5.15) and ``none`` (process group and
rlimits only; no network or filesystem isolation -- reported as such by ``doctor``).

This module runs processes; it knows nothing about languages, tasks or scoring.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# uids used for sandboxed programs when running as root: one per worker slot, so that the
# per-uid process limit of one fork bomb cannot starve a neighbour's compiler.
SANDBOX_UID_BASE = 61000
TAIL_BYTES = 16 * 1024
# Mount types that are not regular storage: left as they are (devices, /proc, cgroups).
_VIRTUAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs",
               "debugfs", "tracefs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs",
               "binfmt_misc", "efivarfs", "nsfs", "rpc_pipefs"}
# Runs inside the new namespaces before the program: make the program's folder its own
# mount, re-mount every other writable filesystem read-only, then exec the payload.
# Positional args: N, N mount points, then the payload argv.
_SETUP_SCRIPT = (
    'W="$PWD"; mount --bind "$W" "$W" || exit 125; n=$1; shift; '
    'while [ "$n" -gt 0 ]; do mount -o remount,bind,ro "$1" 2>/dev/null; shift; n=$((n-1)); done; '
    'cd "$W" || exit 125; exec "$@"'
)
SETUP_FAILED = 125


class SandboxError(RuntimeError):
    """The sandbox could not be set up (missing util-linux tools, unusable temp folder)."""


@dataclass(frozen=True)
class Limits:
    """Per-process limits. ``None`` means "not limited" (the JVM needs a large address space)."""

    wall_s: float = 10.0
    cpu_s: float | None = None  # defaults to the wall limit
    memory_mb: int | None = 2048  # RLIMIT_AS
    nproc: int = 256  # threads count too: the JVM and rustc start dozens
    fsize_mb: int = 64  # largest file the program may write, its stdout/stderr included

    def scaled(self, factor: float) -> "Limits":
        cpu = None if self.cpu_s is None else self.cpu_s * factor
        return Limits(self.wall_s * factor, cpu, self.memory_mb, self.nproc, self.fsize_mb)


@dataclass
class ProcResult:
    returncode: int
    timed_out: bool
    stdout: str  # the last TAIL_BYTES
    stderr: str
    wall_s: float
    setup_failed: bool = False

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


@dataclass(frozen=True)
class IsolationInfo:
    mode: str  # "root-ns" | "user-ns" | "none"
    network: bool
    filesystem: bool
    nproc_binds: bool
    message: str
    readonly_mounts: tuple[str, ...] = field(default=())


def _decode_mount(path: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def writable_mounts() -> list[str]:
    """Mount points of writable, non-virtual filesystems (to re-mount read-only in the sandbox)."""
    out = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ["/"]
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mp, fstype, opts = _decode_mount(parts[1]), parts[2], parts[3].split(",")
        if fstype in _VIRTUAL_FS or "rw" not in opts:
            continue
        if mp not in out:
            out.append(mp)
    return out


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None)


def _try_mode(mode: str, mounts: Sequence[str]) -> bool:
    sb = Sandbox(_forced_mode=mode, _mounts=tuple(mounts))
    try:
        with sb.workdir() as wd:
            (wd / "probe").write_text("x")
            r = sb.run(["/bin/sh", "-c", "cat probe && touch ok"], wd, Limits(wall_s=10, memory_mb=None))
            return r.returncode == 0 and not r.timed_out and r.stdout == "x" and (wd / "ok").exists()
    except (OSError, SandboxError):
        return False


@functools.lru_cache(maxsize=1)
def probe_isolation() -> IsolationInfo:
    """Find the strongest isolation this machine allows (cached; costs ~50 ms once)."""
    if os.environ.get("CODESHELL_SANDBOX") == "none":
        return IsolationInfo("none", False, False, os.geteuid() != 0,
                             "isolation disabled by CODESHELL_SANDBOX=none: no network or filesystem isolation")
    missing = [t for t in ("prlimit",) if _tool(t) is None]
    if missing:
        raise SandboxError(f"the sandbox needs util-linux's {', '.join(missing)} (Debian: apt-get install util-linux)")
    mounts = tuple(writable_mounts())
    have_ns = all(_tool(t) for t in ("unshare", "mount")) and (os.geteuid() != 0 or _tool("setpriv"))
    if have_ns:
        mode = "root-ns" if os.geteuid() == 0 else "user-ns"
        if _try_mode(mode, mounts):
            return IsolationInfo(mode, True, True, True,
                                 f"{mode}: new network, PID and mount namespaces; "
                                 + ("programs run as unprivileged uids" if mode == "root-ns"
                                    else "process count per user namespace"), mounts)
    why = ("unshare/mount/setpriv not found" if not have_ns
           else "the kernel refused new namespaces (unprivileged user namespaces disabled, or a container "
                "without CAP_SYS_ADMIN)")
    return IsolationInfo("none", False, False, os.geteuid() != 0,
                         f"no network or filesystem isolation: {why}; programs only get rlimits and a "
                         "process group" + ("; RLIMIT_NPROC does not bind root" if os.geteuid() == 0 else ""))


class Sandbox:
    """Runs commands for one worker slot. Thread-compatible: give each thread its own slot."""

    def __init__(self, slot: int = 0, *, _forced_mode: str | None = None, _mounts: tuple[str, ...] | None = None):
        self.slot = slot
        if _forced_mode is not None:
            self.mode, self.mounts = _forced_mode, _mounts or ()
        else:
            info = probe_isolation()
            self.mode, self.mounts = info.mode, info.readonly_mounts
        self.uid = SANDBOX_UID_BASE + slot if self.mode == "root-ns" else None
        self._prlimit = _tool("prlimit")
        if self._prlimit is None:
            raise SandboxError("the sandbox needs util-linux's prlimit (Debian: apt-get install util-linux)")

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh private folder, owned by the sandbox uid, removed afterwards."""
        path = Path(tempfile.mkdtemp(prefix="codeshell-sbx-"))
        try:
            os.chmod(path, 0o700)
            if self.uid is not None:
                os.chown(path, self.uid, self.uid)
            yield path
        finally:
            _rmtree(path)

    def chown_tree(self, path: Path) -> None:
        """Give files written by the harness (sources) to the sandbox uid."""
        if self.uid is None:
            return
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                os.chown(os.path.join(root, n), self.uid, self.uid)

    def command(self, argv: Sequence[str], limits: Limits) -> list[str]:
        cpu = _cpu_seconds(limits)
        pl = [self._prlimit, f"--cpu={cpu}:{cpu + 1}", f"--nproc={limits.nproc}", "--core=0",
              f"--fsize={limits.fsize_mb * 1024 * 1024}"]
        if limits.memory_mb is not None:
            pl.append(f"--as={limits.memory_mb * 1024 * 1024}")
        payload = pl + ["--", *argv]
        if self.mode == "none":
            return payload
        if self.mode == "root-ns":
            payload = [_tool("setpriv"), f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                       "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
                       "--bounding-set=-all,+dac_read_search", *payload]
            ns = ["-npfm"]
        else:
            ns = ["-rnpfm"]
        return [_tool("unshare"), *ns, "--kill-child", "--", "/bin/sh", "-c", _SETUP_SCRIPT, "sh",
                str(len(self.mounts)), *self.mounts, *payload]

    def run(self, argv: Sequence[str], cwd: Path, limits: Limits, env: dict[str, str] | None = None) -> ProcResult:
        """Run ``argv`` in ``cwd`` under ``limits``; never raises for the program's own failures."""
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd), "TMPDIR": str(cwd),
                    "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        if env:
            base_env.update(env)
        cmd = self.command(argv, limits)
        # Output goes to files, not pipes: RLIMIT_FSIZE then caps a program that prints forever,
        # and no reader threads are needed.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=cwd, env=base_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            _status, cpu_used, timed_out = _wait(proc, limits.wall_s)
            wall = time.monotonic() - start
            rc = proc.returncode
            # A CPU-limit kill (SIGXCPU, then SIGKILL at the hard limit) is a timeout too. Under
            # unshare the signal is not passed on (unshare exits 1), so go by CPU time used;
            # only for failed runs, since CPU time sums over processes (g++ runs several).
            if rc != 0 and (rc == -signal.SIGXCPU or cpu_used >= _cpu_seconds(limits) - 0.05):
                timed_out = True
            stdout, stderr = _tail(out), _tail(err)
        if stderr.endswith(_UNSHARE_SIGNAL_MSG):
            # unshare could not re-raise its child's fatal signal; report it as a signal death.
            stderr = stderr[: -len(_UNSHARE_SIGNAL_MSG)]
            if rc == 1:
                rc = -signal.SIGKILL
        setup_failed = self.mode != "none" and rc == SETUP_FAILED and not stdout
        return ProcResult(rc, timed_out, stdout, stderr, wall, setup_failed)


_UNSHARE_SIGNAL_MSG = "unshare: sigprocmask unblock failed: Invalid argument\n"


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, float, bool]:
    """Wait up to ``timeout`` s, kill the group, reap; returns (status, CPU seconds, timed out).

    Reaps with wait4 to get the CPU time of the process and its reaped descendants; waits on
    a pidfd where the kernel has them (no polling)."""
    timed_out = False
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            timed_out = not poller.poll(timeout * 1000)
        finally:
            os.close(fd)
    else:  # kernels before 5.3: poll for the exit without reaping (the pgid must stay ours)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
    # Kill the group even after a clean exit: anything that escaped it dies with the PID namespace.
    _killpg(proc.pid)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, ru.ru_utime + ru.ru_stime, timed_out


def _cpu_seconds(limits: Limits) -> int:
    return max(1, int(round(limits.cpu_s if limits.cpu_s is not None else limits.wall_s)))


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - TAIL_BYTES))
    return f.read().decode("utf-8", errors="replace")


def _rmtree(path: Path) -> None:
    def fix(func, p, _exc):  # a program may chmod its files read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


class SlotPool:
    """Hands out one :class:`Sandbox` per concurrently running thread."""

    def __init__(self, n: int):
        self._free = list(range(n))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._boxes: dict[int, Sandbox] = {}

    @contextmanager
    def acquire(self) -> Iterator[Sandbox]:
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.pop()
            box = self._boxes.get(slot) or self._boxes.setdefault(slot, Sandbox(slot))
        try:
            yield box
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()
