"""Execution sandbox for model-written programs.

Model-written code is untrusted: it must not see the host. Each program runs under
bubblewrap (``bwrap``, Debian package ``bubblewrap``) in a sandbox built for it:

* new PID, network, IPC, UTS (and, where possible, cgroup) namespaces: a fresh ``/proc``
  that shows only the program's own processes, no network but a downed loopback, and every
  process of the program dies with it (``--die-with-parent`` and the namespace's init);
* a new root made of read-only binds: ``/usr`` (and the ``/bin``, ``/lib*`` links), ``/etc``
  with its secrets masked (``shadow``, ``gshadow``, ``ssh/``, ``sudoers`` ...: empty), and the
  installation folders of toolchains that live elsewhere (a pyenv Python under ``/root``: that
  folder only). ``/root``, ``/home``, ``/work``, the project's folders and everything else are
  simply not there. Writable: the program's own working folder and a private size-capped
  ``/tmp`` (tmpfs);
* no capabilities (a root harness switches to an unprivileged per-worker uid with ``setpriv``,
  bounding set emptied; bubblewrap sets no_new_privs, so setuid binaries cannot raise them);
* resource limits set by util-linux ``prlimit`` (CPU seconds, address space, process count,
  file size, no core dumps) -- an exec'd binary rather than ``preexec_fn`` because the
  executor runs many sandboxes from threads, where ``preexec_fn`` may deadlock;
* a wall-clock timeout after which the whole process group is SIGKILLed;
* a scrubbed environment (PATH, HOME = the folder, TMPDIR, LANG) and stdin on /dev/null.

:func:`probe_isolation` checks once that this works here (bwrap installed, namespaces
allowed). Without it, :class:`Sandbox` refuses to run anything (:class:`SandboxUnavailable`
says what is missing and how to install it) unless the caller passes ``allow_unsafe=True``
(``--unsafe-no-sandbox``): then programs get only rlimits, a process group and a scrubbed
environment -- no filesystem, process or network isolation.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# uids used for sandboxed programs when running as root: one per worker slot, so that the
# per-uid process limit of one fork bomb cannot starve a neighbour's compiler.
SANDBOX_UID_BASE = 61000
TAIL_BYTES = 16 * 1024
TMP_SIZE_MB = 256  # the private /tmp (tmpfs, so it is memory: capped)
BWRAP_INSTALL = "apt-get install bubblewrap (Debian/Ubuntu; Fedora: dnf install bubblewrap)"
# Files and folders under /etc that hold secrets: masked (an empty file / an empty folder).
_ETC_SECRET_FILES = ("shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "subuid", "subgid",
                     "security/opasswd", "machine-id", ".pwd.lock")
_ETC_SECRET_DIRS = ("ssh", "sudoers.d", "ssl/private", "credstore", "credstore.encrypted", "wireguard",
                    "NetworkManager/system-connections", "ipsec.d/private", "openvpn", "letsencrypt")
# Top-level folders that make up the read-only system view (symlinks are recreated as links).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SETUP_FAILED = 125


class SandboxError(RuntimeError):
    """The sandbox could not be set up (missing util-linux tools, unusable temp folder)."""


class SandboxUnavailable(SandboxError):
    """No working isolation here and running without it was not allowed; says what to install."""


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
    mode: str  # "bwrap" | "none"
    message: str  # what programs get here, or why there is no isolation and how to get it

    @property
    def isolated(self) -> bool:
        return self.mode != "none"


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None)


def _bwrap() -> str | None:
    env = os.environ.get("CODESHELL_BWRAP")  # another bwrap (or a path that is not one, in tests)
    if env:
        return env if os.access(env, os.X_OK) else None
    return _tool("bwrap")


@functools.lru_cache(maxsize=1)
def probe_isolation() -> IsolationInfo:
    """Check once that the bwrap sandbox works here (cached; costs one sandboxed run)."""
    missing = [t for t in ("prlimit",) + (("setpriv",) if os.geteuid() == 0 else ()) if _tool(t) is None]
    if missing:
        return IsolationInfo("none", f"util-linux's {', '.join(missing)} not found: apt-get install util-linux")
    bwrap = _bwrap()
    if bwrap is None:
        return IsolationInfo("none", f"bubblewrap (bwrap) is not installed: {BWRAP_INSTALL}")
    sb = Sandbox(_mode="bwrap")
    try:
        with sb.workdir() as wd:
            (wd / "probe").write_text("x\n")
            r = sb.run(["/bin/sh", "-c", "cat probe && touch ok && grep -E '^Cap(Eff|Bnd):' /proc/self/status "
                        "&& ls /proc"], wd, Limits(wall_s=20, memory_mb=None))
    except (OSError, SandboxError) as e:
        return IsolationInfo("none", f"bubblewrap could not run a program here ({e})")
    caps = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("Cap")]
    pids = [x for x in r.stdout.split() if x.isdigit()]
    if r.returncode != 0 or not r.stdout.startswith("x\n") or caps != ["0000000000000000"] * 2 or len(pids) > 8:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        hint = ("" if os.geteuid() == 0 else
                "; as a non-root user bubblewrap needs unprivileged user namespaces (sysctl "
                "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0), or run as root")
        return IsolationInfo("none", f"bubblewrap is installed but cannot isolate programs here: {why}{hint}")
    who = "unprivileged uids" if os.geteuid() == 0 else "your uid in a user namespace"
    return IsolationInfo("bwrap", f"bwrap: new PID/network/IPC namespaces, fresh /proc, read-only system view "
                                  f"(no /root, /home or project folders), private /tmp, no capabilities, {who}")


def unavailable_message(info: IsolationInfo) -> str:
    return (f"no sandbox for model-written code: {info.message}. Install it (CI: .ci/install-eval.sh), or pass "
            "--unsafe-no-sandbox to run the programs on this machine without isolation")


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class Sandbox:
    """Runs commands for one worker slot. Thread-compatible: give each thread its own slot.

    ``ro_paths``: extra folders (toolchain installations outside ``/usr``) made visible
    read-only at the same path. ``allow_unsafe``: run without isolation where there is none
    (otherwise :class:`SandboxUnavailable` is raised)."""

    def __init__(self, slot: int = 0, *, allow_unsafe: bool = False, _mode: str | None = None):
        self.slot = slot
        if _mode is not None:
            self.mode = _mode
        else:
            info = probe_isolation()
            if not info.isolated and not allow_unsafe:
                raise SandboxUnavailable(unavailable_message(info))
            self.mode = info.mode
        self.uid = SANDBOX_UID_BASE + slot if os.geteuid() == 0 and self.mode != "none" else None
        self._prlimit = _tool("prlimit")
        if self._prlimit is None:
            raise SandboxError("the sandbox needs util-linux's prlimit (Debian: apt-get install util-linux)")
        self._base: list[str] | None = None

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

    def _system_view(self) -> list[str]:
        """bwrap options for the read-only system part of the new root (the same for every run)."""
        if self._base is not None:
            return self._base
        a = [_bwrap(), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--hostname", "sandbox"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        a += ["--ro-bind", "/etc", "/etc"]
        for f in _ETC_SECRET_FILES:
            p = "/etc/" + f
            if os.path.lexists(p) and not os.path.islink(p) and os.path.isfile(p):
                a += ["--ro-bind", "/dev/null", p]
        for d in _ETC_SECRET_DIRS:
            p = "/etc/" + d
            if os.path.isdir(p) and not os.path.islink(p):
                a += ["--tmpfs", p, "--remount-ro", p]
        a += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMP_SIZE_MB << 20), "--tmpfs", "/tmp"]
        self._base = a
        return a

    def _binds(self, ro_paths: Sequence[str], cwd: Path) -> list[str]:
        """Per-run binds: toolchain folders outside the system view (read-only), then the working
        folder (read-write). Folders bwrap would create on the way get mode 0755 (it makes them
        0700, which the sandbox uid could not enter)."""
        shown = ["/usr", "/etc"]  # host content already in the view (read-only)
        exists = ["/proc", "/dev", "/tmp"]  # folders of the view with nothing of the host in them
        made: set[str] = set()
        a: list[str] = []

        def parents(p: str) -> None:
            anc = os.path.dirname(p)
            chain = []
            while anc not in ("/", "", *exists) and not _under(anc, shown) and anc not in made:
                chain.append(anc)
                anc = os.path.dirname(anc)
            for d in reversed(chain):
                a.extend(["--perms", "0755", "--dir", d])
                made.add(d)

        for p in dict.fromkeys(os.path.realpath(x) for x in ro_paths):
            if p == "/" or _under(p, shown) or not os.path.exists(p):
                continue
            parents(p)
            a += ["--ro-bind", p, p]
            shown.append(p)
        wd = str(cwd)
        parents(wd)
        a += ["--bind", wd, wd, "--chdir", wd]
        return a

    def command(self, argv: Sequence[str], limits: Limits, cwd: Path | None = None,
                ro_paths: Sequence[str] = (), as_pid1: bool = False) -> list[str]:
        """The full command line. ``as_pid1``: the program itself is PID 1 of its namespace
        (no bwrap init): the other processes in there cannot kill or stop it."""
        cpu = _cpu_seconds(limits)
        pl = [self._prlimit, f"--cpu={cpu}:{cpu + 1}", f"--nproc={limits.nproc}", "--core=0",
              f"--fsize={limits.fsize_mb * 1024 * 1024}"]
        if limits.memory_mb is not None:
            pl.append(f"--as={limits.memory_mb * 1024 * 1024}")
        payload = pl + ["--", *argv]
        if self.mode == "none":
            return payload
        if self.uid is not None:  # root: become an unprivileged uid with no capabilities at all
            payload = [_tool("setpriv"), f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                       "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", *payload]
        return [*self._system_view(), *(["--as-pid-1"] if as_pid1 else []), *self._binds(ro_paths, cwd or Path.cwd()),
                "--", *payload]

    def run(self, argv: Sequence[str], cwd: Path, limits: Limits, env: dict[str, str] | None = None,
            ro_paths: Sequence[str] = ()) -> ProcResult:
        """Run ``argv`` in ``cwd`` under ``limits``; never raises for the program's own failures."""
        base_env = scrubbed_env(cwd, "/tmp" if self.mode != "none" else str(cwd), env or {})
        cmd = self.command(argv, limits, cwd, ro_paths)
        # Output goes to files, not pipes: RLIMIT_FSIZE then caps a program that prints forever,
        # and no reader threads are needed.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=cwd, env=base_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            _status, cpu_used, timed_out = _wait(proc, limits.wall_s)
            wall = time.monotonic() - start
            rc = proc.returncode
            stdout, stderr = _tail(out), _tail(err)
        setup_failed = False
        if self.mode != "none":
            # bwrap exits 128 + n when the program dies of signal n, and 1 with "bwrap: ..." when
            # it could not build the sandbox (or exec the program).
            if rc > 128:
                rc = -(rc - 128)
            elif rc == 1 and stderr.startswith("bwrap: ") and not stdout:
                setup_failed, rc = True, SETUP_FAILED
        # A CPU-limit kill (SIGXCPU, then SIGKILL at the hard limit) is a timeout too; go by CPU
        # time used as well, only for failed runs, since CPU time sums over processes (g++ runs several).
        if rc != 0 and (rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or cpu_used >= _cpu_seconds(limits) - 0.05):
            timed_out = True
        return ProcResult(rc, timed_out, stdout, stderr, wall, setup_failed)


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


def scrubbed_env(home: str | os.PathLike, tmpdir: str, env: dict[str, str]) -> dict[str, str]:
    """A program's whole environment: a system PATH, HOME, TMPDIR and a UTF-8 locale, then `env`."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": tmpdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", **env}


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

    def __init__(self, n: int, allow_unsafe: bool = False):
        self.allow_unsafe = allow_unsafe
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
        try:  # a Sandbox that cannot be made (no isolation here) must hand its slot back, or the next job waits forever
            box = self._boxes.get(slot) or self._boxes.setdefault(slot, Sandbox(slot, allow_unsafe=self.allow_unsafe))
            yield box
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()
