"""Adversarial samples against the real sandbox, each run through the harness as a sample would be.

Every attack is written as a HumanEval-style sample whose answer is right *only if the attack
worked*: ``f(2, 3)`` returns 5 when it read the secret / reached the network / killed the
process ..., and ``None`` otherwise. So each test asserts two things: the attack failed (its
own evidence, and what the test sees on the host), and the harness reports the sample as
failed (or timed out), never as passed. The control test at the end runs two of the attacks
without isolation, where they do succeed and pass: the attacks are real.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from codeshell.eval import languages as L
from codeshell.eval.execution import ExecOptions, python_server, run_program
from codeshell.eval.sandbox import Sandbox, probe_isolation
from tests.conftest import REPO, require_tool, shared_dir
from tests.eval.test_sandbox import _alive_with

# CI installs bubblewrap (.ci/install-eval.sh) and lists it in CODESHELL_REQUIRE_TOOLS: missing fails there
require_tool("bwrap", probe_isolation().isolated, "no sandbox here: " + probe_isolation().message)

SECRET = "sk-codeshell-test-" + secrets.token_hex(8)
TEMPLATE = '''import os, sys

{attack}

def f(x, y):
    return x + y if attack() else None

def check(candidate):
    assert candidate(2, 3) == 5

check(f)
'''


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(slot=5)


@pytest.fixture(scope="module")
def server(sandbox):
    srv = python_server(sandbox)
    assert srv is not None
    yield srv
    srv.close()


@pytest.fixture(params=["fresh", "server"])
def box(request, sandbox, server):
    """Each attack runs both ways Python samples run: a fresh sandboxed interpreter, and a fork
    of the warm sandboxed server (what `eval run` / `eval score` use)."""
    return sandbox, (server if request.param == "server" else None)


@pytest.fixture(scope="module")
def canary(sandbox):
    """A host process of the sandbox's own uid, holding a secret in its command line and
    environment: without a PID namespace the sandboxed program could read, signal and
    ptrace it."""
    cmd = ["/bin/sh", "-c", "sleep 300; :", SECRET]  # the shell stays, with SECRET in its argv
    if sandbox.uid is not None:
        cmd = ["setpriv", f"--reuid={sandbox.uid}", f"--regid={sandbox.uid}", "--clear-groups", *cmd]
    proc = subprocess.Popen(cmd, env={"OPENAI_API_KEY": SECRET, "PATH": "/usr/bin:/bin"}, cwd="/",
                            start_new_session=True)
    time.sleep(0.2)
    assert proc.poll() is None
    yield proc
    proc.kill()
    proc.wait()


def attack(box, body: str, opts: ExecOptions = ExecOptions(timeout_factor=3.0)):
    sandbox, server = box
    out = run_program(sandbox, "py", TEMPLATE.format(attack=body), opts, server)
    assert out.status != L.PASSED, out  # the harness never reports an attack as a pass
    return out


def test_read_etc_shadow(box):
    host = Path("/etc/shadow").read_text() if os.access("/etc/shadow", os.R_OK) else ""
    out = attack(box, '''
def attack():
    try:
        data = open("/etc/shadow").read()
    except OSError as e:
        print("shadow: blocked", e.errno, file=sys.stderr)
        return False
    print("shadow: read", len(data), "bytes", file=sys.stderr)
    return len(data) > 0
''')
    assert out.status == L.FAILED and "AssertionError" in out.stderr
    assert ("shadow: read 0 bytes" in out.stderr) or ("shadow: blocked" in out.stderr)
    for line in host.splitlines():
        assert line not in out.stderr


def test_host_folders_are_not_there(box, tmp_path):
    # a canary file in root's home (we may be root), the project, the reference data, /home
    canary = None
    home = Path(os.path.expanduser("~"))
    if os.access(home, os.W_OK):
        canary = home / f"codeshell-canary-{secrets.token_hex(4)}"
        canary.write_text(SECRET)
    paths = [str(REPO), str(REPO / "pyproject.toml"), "/home", "/work", str(tmp_path)]
    if shared_dir() is not None:
        paths.append(str(shared_dir()))
    if canary is not None:
        paths.append(str(canary))
    try:
        out = attack(box, f'''
def attack():
    seen = [p for p in {paths!r} if os.path.exists(p)]
    root = os.listdir("/root") if os.path.isdir("/root") else []
    print("seen:", seen, "root:", root, file=sys.stderr)
    return bool(seen) or any(n.startswith("codeshell-canary") for n in root)
''')
    finally:
        if canary is not None:
            canary.unlink()
    assert out.status == L.FAILED and "seen: []" in out.stderr
    # /root holds at most the path down to a toolchain installed there (pyenv, rustup)
    listed = out.stderr.split("root:")[1].splitlines()[0]
    assert "codeshell-canary" not in listed and ".bash" not in listed and ".ssh" not in listed


def test_read_proc_cmdline_and_another_process_environ(box, canary):
    host_init = Path("/proc/1/cmdline").read_bytes()
    out = attack(box, f'''
def attack():
    found = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for name in ("cmdline", "environ"):
            try:
                data = open(f"/proc/{{pid}}/{{name}}", "rb").read()
            except OSError:
                continue
            if {SECRET.encode()!r} in data:
                found.append((pid, name))
    print("pids:", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), file=sys.stderr)
    print("init:", open("/proc/1/cmdline", "rb").read()[:60], file=sys.stderr)
    for pid in ({canary.pid}, 1):
        try:
            print("environ", pid, len(open(f"/proc/{{pid}}/environ", "rb").read()), file=sys.stderr)
        except OSError as e:
            print("environ", pid, "blocked", e.errno, file=sys.stderr)
    print("found:", found, file=sys.stderr)
    return bool(found)
''')
    assert out.status == L.FAILED and "found: []" in out.stderr and SECRET not in out.stderr
    pids = eval(out.stderr.split("pids:")[1].splitlines()[0])
    assert canary.pid not in pids or canary.pid < 10  # a fresh /proc: only the sandbox's processes
    assert len(pids) < 10
    assert f"init: {host_init[:60]!r}" not in out.stderr  # pid 1 is the sandbox's own init


def test_environment_is_scrubbed(box, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    out = attack(box, f'''
def attack():
    print("env:", sorted(os.environ), file=sys.stderr)
    return any({SECRET!r} in v for v in os.environ.values()) or "OPENAI_API_KEY" in os.environ
''')
    assert out.status == L.FAILED and "OPENAI_API_KEY" not in out.stderr and SECRET not in out.stderr


def test_no_capabilities_and_no_privilege_gain(box):
    out = attack(box, '''
def attack():
    status = open("/proc/self/status").read()
    caps = {l.split(":")[0]: int(l.split()[1], 16) for l in status.splitlines() if l.startswith("Cap")}
    nnp = [l for l in status.splitlines() if l.startswith("NoNewPrivs")]
    print("caps:", caps, nnp, "uid", os.getuid(), file=sys.stderr)
    gained = any(caps.values()) or os.getuid() == 0
    try:
        os.setuid(0)
        gained = True
    except OSError as e:
        print("setuid: blocked", e.errno, file=sys.stderr)
    return gained
''')
    assert out.status == L.FAILED and "setuid: blocked" in out.stderr
    assert "'CapEff': 0" in out.stderr and "'CapBnd': 0" in out.stderr and "'CapPrm': 0" in out.stderr
    assert "NoNewPrivs:\\t1" in out.stderr


def test_write_outside_its_folder(box, tmp_path):
    targets = [str(REPO / f"escape-{secrets.token_hex(4)}"), f"/etc/escape-{secrets.token_hex(4)}",
               f"/usr/escape-{secrets.token_hex(4)}", f"/dev/shm/escape-{secrets.token_hex(4)}",
               str(tmp_path / "escape"), os.path.expanduser(f"~/escape-{secrets.token_hex(4)}"),
               f"/escape-{secrets.token_hex(4)}", f"/dev/escape-{secrets.token_hex(4)}"]
    out = attack(box, f'''
def attack():
    wrote = []
    for p in {targets!r}:
        try:
            open(p, "w").write("pwned")
            wrote.append(p)
        except OSError as e:
            print("blocked", p, e.errno, file=sys.stderr)
    open("inside.txt", "w").write("ok")  # its own folder is writable
    open("/tmp/private.txt", "w").write("ok")  # and so is its private /tmp
    print("wrote:", wrote, file=sys.stderr)
    return bool(wrote)
''')
    assert out.status == L.FAILED and "wrote: []" in out.stderr
    assert out.stderr.count("blocked") == len(targets)
    for p in targets:
        assert not os.path.exists(p), p


def test_network_connection(box):
    # a server on the host's loopback: reachable from any process that shares the host's network
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        out = attack(box, f'''
def attack():
    import socket
    ok = []
    for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
        try:
            socket.create_connection(addr, timeout=2).close()
            ok.append(addr)
        except OSError as e:
            print("refused", addr, e.errno, file=sys.stderr)
    print("connected:", ok, file=sys.stderr)
    return bool(ok)
''')
    finally:
        srv.close()
    assert out.status == L.FAILED and "connected: []" in out.stderr and out.stderr.count("refused") == 3


def test_fork_bomb(box):
    start = time.monotonic()
    out = attack(box, '''
def attack():
    import time
    n = 0
    try:
        while n < 5000:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
    except OSError as e:
        print("fork refused after", n, e.errno, file=sys.stderr)
    return n >= 5000
''')
    assert out.status == L.FAILED and "fork refused after" in out.stderr
    assert int(out.stderr.split("fork refused after")[1].split()[0]) < 256  # the nproc limit
    assert time.monotonic() - start < 30  # and the sleeping children did not outlive it


def test_eat_memory(box):
    out = attack(box, '''
def attack():
    try:
        hog = bytearray(8 * 1024 ** 3)
        hog[::4096] = b"x" * len(hog[::4096])
        return True
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        return False
''')
    assert out.status == L.FAILED and "MemoryError" in out.stderr


def test_hang_with_children(box):
    token = f"{secrets.randbelow(10 ** 6)}.{secrets.randbelow(10 ** 6)}"
    start = time.monotonic()
    out = attack(box, f'''
def attack():
    import subprocess
    subprocess.Popen(["sleep", "{token}"])
    subprocess.Popen(["sleep", "{token}"], start_new_session=True)  # leaves the process group
    if os.fork() == 0:
        os.setsid()
        while True:
            pass
    while True:
        pass
''', ExecOptions(run_timeout_s=1.5))
    assert out.status == L.TIMEOUT
    assert time.monotonic() - start < 10
    time.sleep(0.3)
    assert not _alive_with(token)


def test_kill_or_signal_the_harness(box, canary):
    out = attack(box, f'''
def attack():
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hit = []
    for pid, sig in [({os.getpid()}, signal.SIGTERM), ({os.getpid()}, 0), ({canary.pid}, signal.SIGKILL)]:
        try:
            os.kill(pid, sig)
            hit.append((pid, sig))
        except OSError as e:
            print("kill", pid, "blocked", e.errno, file=sys.stderr)
    try:  # the sandbox's own init: bwrap's (root: EPERM), or the server, which ignores it
        os.kill(1, signal.SIGKILL)
    except OSError as e:
        print("kill 1 blocked", e.errno, file=sys.stderr)
    print("signalled:", hit, file=sys.stderr)
    return bool(hit)
''')
    for pid in (os.getpid(), canary.pid):  # ESRCH: not in its PID namespace
        assert f"kill {pid} blocked 3" in out.stderr, out.stderr
    if box[1] is None and os.geteuid() == 0:
        assert "kill 1 blocked 1" in out.stderr
    assert out.status == L.FAILED and "signalled: []" in out.stderr
    assert canary.poll() is None  # the host process of the same uid is alive


def test_kill_every_process_it_may(box, canary):
    out = attack(box, '''
def attack():
    try:
        os.kill(-1, 9)  # every process of its uid that it can see, but itself and init
        print("kill -1: signalled something", file=sys.stderr)
        return True
    except OSError as e:
        print("kill -1: blocked", e.errno, file=sys.stderr)
        return False
''')
    # nothing else is there: init (bwrap's, or the server as PID 1) is spared by kill(-1)
    assert out.status == L.FAILED and "kill -1: blocked 3" in out.stderr
    assert canary.poll() is None


def test_ptrace(box, canary):
    out = attack(box, f'''
def attack():
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    PTRACE_ATTACH, PTRACE_DETACH = 16, 17
    attached = []
    for pid in ({canary.pid}, {os.getpid()}, 1, os.getppid()):  # the last: its parent (init, or the server)
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
            attached.append(pid)
            libc.ptrace(PTRACE_DETACH, pid, None, None)
        else:
            print("ptrace", pid, "blocked", ctypes.get_errno(), file=sys.stderr)
    print("attached:", attached, file=sys.stderr)
    return bool(attached)
''')
    assert out.status == L.FAILED and "attached: []" in out.stderr and out.stderr.count("blocked") == 4
    assert canary.poll() is None and psutil.Process(canary.pid).status() != psutil.STATUS_TRACING_STOP


@pytest.mark.parametrize("body", ["    sys.exit(0)", "    os._exit(0)", "    raise SystemExit(0)",
                                  "    os.kill(os.getpid(), 9)"])
def test_exit_early_with_0_to_fake_a_pass(box, body):
    out = attack(box, f"def attack():\n{body}\n")
    assert out.status in (L.FAILED, L.ERROR)
    if "kill" not in body:
        assert out.status == L.FAILED and "sentinel" in out.reason


def test_control_the_same_attacks_succeed_without_isolation(canary):
    """Without the sandbox (what --unsafe-no-sandbox gets), the network and /proc attacks work
    and the harness would count them as passes: the attacks above are real."""
    bare = Sandbox(slot=5, _mode="none")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    try:
        net = run_program(bare, "py", TEMPLATE.format(attack=f'''
def attack():
    import socket
    socket.create_connection(("127.0.0.1", {srv.getsockname()[1]}), timeout=2).close()
    return True
'''), ExecOptions(timeout_factor=3.0))
    finally:
        srv.close()
    assert net.status == L.PASSED
    proc = run_program(bare, "py", TEMPLATE.format(attack=f'''
def attack():
    return {SECRET.encode()!r} in open("/proc/{canary.pid}/cmdline", "rb").read()
'''), ExecOptions(timeout_factor=3.0))
    assert proc.status == L.PASSED


def test_a_program_cannot_kill_or_stop_the_server(sandbox):
    """The warm server is PID 1 of its namespace: its programs' signals do not reach it."""
    srv = python_server(sandbox)
    try:
        out = run_program(sandbox, "py", TEMPLATE.format(attack='''
def attack():
    import signal
    for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(os.getppid(), sig)
    print("parent:", os.getppid(), file=sys.stderr)
    return False
'''), ExecOptions(timeout_factor=3.0), srv)
        assert out.status == L.FAILED and "parent: 1" in out.stderr
        server_pid = srv.proc.pid
        ok = run_program(sandbox, "py", TEMPLATE.format(attack="def attack():\n    return True\n"),
                         ExecOptions(timeout_factor=3.0), srv)
        assert ok.status == L.PASSED and srv.proc.pid == server_pid  # the same server answered
    finally:
        srv.close()


def test_a_program_whose_server_dies_is_an_error_and_the_next_one_runs(sandbox):
    """Should the server die mid-program anyway (here: killed from the host), that run is an
    error, never a pass, and the next program gets a fresh sandbox."""
    import threading

    srv = python_server(sandbox)
    try:
        run_program(sandbox, "py", "print(1)\n", ExecOptions(), srv)  # started
        threading.Timer(0.5, lambda: os.killpg(srv.proc.pid, 9)).start()
        out = run_program(sandbox, "py", TEMPLATE.format(attack="def attack():\n    import time\n"
                                                                 "    time.sleep(2)\n    return True\n"),
                          ExecOptions(timeout_factor=3.0), srv)
        assert out.status == L.ERROR and "server died" in out.stderr
        ok = run_program(sandbox, "py", TEMPLATE.format(attack="def attack():\n    return True\n"),
                         ExecOptions(timeout_factor=3.0), srv)
        assert ok.status == L.PASSED
    finally:
        srv.close()


def test_server_programs_do_not_see_each_other(sandbox):
    """One program's background process and /tmp files are gone before the next one starts."""
    srv = python_server(sandbox)
    token = secrets.token_hex(6)
    try:
        first = run_program(sandbox, "py", TEMPLATE.format(attack=f'''
def attack():
    import subprocess, ctypes
    libc = ctypes.CDLL(None)
    assert libc.shmget(0x5eed, 4096, 0o1600) >= 0  # IPC_CREAT | 0600: outlives the process
    open("/tmp/left-{token}", "w").write("x")
    subprocess.Popen(["sleep", "300"], start_new_session=True)
    if os.fork() == 0:
        os.setsid()
        import time
        time.sleep(300)
    return False
'''), ExecOptions(timeout_factor=3.0), srv)
        assert first.status == L.FAILED
        second = run_program(sandbox, "py", TEMPLATE.format(attack=f'''
def attack():
    others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())]
    left = os.path.exists("/tmp/left-{token}")
    shm = open("/proc/sysvipc/shm").read().splitlines()[1:]
    print("others:", others, "left:", left, "shm:", shm, file=sys.stderr)
    return bool(others) or left or bool(shm)
'''), ExecOptions(timeout_factor=3.0), srv)
        assert second.status == L.FAILED and "others: [] left: False shm: []" in second.stderr, second
    finally:
        srv.close()


def test_other_languages_get_the_same_sandbox(sandbox, canary):
    """MultiPL-E programs run in a fresh sandbox each: the same attacks from JavaScript."""
    if L.find_toolchain("js") is None:
        pytest.skip(L.missing_reason("js"))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    prog = f"""
const fs = require('fs'), net = require('net'), assert = require('node:assert');
let got = [];
try {{ if (fs.readFileSync('/etc/shadow', 'utf8').length > 0) got.push('shadow'); }} catch (e) {{}}
try {{ if (fs.readFileSync('/proc/{canary.pid}/environ').includes('{SECRET}')) got.push('environ'); }} catch (e) {{}}
for (const p of ['{REPO}', '/home', '/work']) if (fs.existsSync(p)) got.push(p);
try {{ process.kill({canary.pid}, 'SIGKILL'); got.push('kill'); }} catch (e) {{}}
const s = net.connect({srv.getsockname()[1]}, '127.0.0.1');
s.on('connect', () => {{ got.push('net'); finish(); }});
s.on('error', () => finish());
function finish() {{
  console.error('got: ' + JSON.stringify(got));
  assert.deepEqual(got.length, 5);
}}
"""
    try:
        out = run_program(sandbox, "js", prog, ExecOptions(timeout_factor=2.0))
    finally:
        srv.close()
    assert out.status == L.FAILED and 'got: []' in out.stderr, out
    assert canary.poll() is None
