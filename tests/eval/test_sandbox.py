"""The sandbox contains what model-written code may do: escape its folder, reach the network,
fork-bomb, eat memory, outlive its time limit, read our secrets, or fake a pass."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import psutil
import pytest

from codeshell.eval import languages as L
from codeshell.eval.execution import ExecOptions, run_program
from codeshell.eval.sandbox import Limits, Sandbox, probe_isolation
from tests.conftest import require_tool

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX only")


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(slot=7)


def isolated() -> bool:
    return probe_isolation().mode != "none"


def py(box: Sandbox, code: str, limits: Limits = Limits(wall_s=10)):
    with box.workdir() as wd:
        (wd / "p.py").write_text(code)
        box.chown_tree(wd)
        tc = L.find_toolchain("py")
        return box.run([tc.tools["python"], "-I", "p.py"], wd, limits, ro_paths=tc.ro_paths)


def test_runs_and_captures(box):
    r = py(box, "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)


def test_isolation_is_reported():
    info = probe_isolation()
    assert info.mode in ("bwrap", "none")
    assert info.message
    if info.mode == "none":
        assert "install" in info.message


def test_cannot_write_outside_its_folder(box, tmp_path):
    if not isolated():
        pytest.skip(probe_isolation().message)
    target = Path(__file__).resolve().parent / f"escape-{secrets.token_hex(4)}"
    tmp_target = Path("/tmp") / f"escape-{secrets.token_hex(4)}"
    shm_target = Path("/dev/shm") / f"escape-{secrets.token_hex(4)}"
    targets = [str(target), str(tmp_target), str(shm_target), str(tmp_path / "x"), os.path.expanduser("~/escape")]
    code = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('pwned')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('blocked', p, e.errno)\n"
        "print(open('inside.txt').read())\n"
    )
    r = py(box, code)
    assert r.returncode == 0, r.stderr
    # /tmp is the sandbox's private tmpfs: a write there succeeds and never reaches the host's /tmp
    assert [line for line in r.stdout.splitlines() if line.startswith("WROTE")] == [f"WROTE {tmp_target}"]
    assert r.stdout.count("blocked") == 4 and r.stdout.rstrip().endswith("ok")
    for p in (target, tmp_target, shm_target, tmp_path / "x"):
        assert not p.exists()


def test_no_network(box):
    if not isolated():
        pytest.skip(probe_isolation().message)
    code = (
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('127.0.0.1', 22)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=3)\n"
        "        print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "try:\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('listening on a private loopback')\n"
        "except OSError as e:\n"
        "    print('no loopback', e.errno)\n"
    )
    r = py(box, code)
    assert r.returncode == 0, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2


def test_fork_bomb_is_contained(box):
    if not isolated():
        pytest.skip("RLIMIT_NPROC cannot bind here: " + probe_isolation().message)
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork refused after', n, e.errno)\n"
    )
    start = time.monotonic()
    r = py(box, code, Limits(wall_s=20, nproc=64))
    assert "fork refused after" in r.stdout, (r.stdout, r.stderr)
    n = int(r.stdout.split("after")[1].split()[0])
    assert n < 64
    assert time.monotonic() - start < 20  # the sleeping children died with the program


def test_memory_is_limited(box):
    code = (
        "try:\n"
        "    x = bytearray(8 * 1024 ** 3)\n"
        "    print('ALLOCATED')\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    r = py(box, code, Limits(wall_s=10, memory_mb=1024))
    assert r.stdout.strip() == "MemoryError"


def _alive_with(token: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(token in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_timeout_kills_the_program_and_its_children(box):
    token = f"{secrets.randbelow(10 ** 6)}.{secrets.randbelow(10 ** 6)}"
    code = (
        "import subprocess, os, time\n"
        # a child in the group, and a grandchild that left the group with setsid
        f"subprocess.Popen(['sleep', '{token}'])\n"
        f"subprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
        "while True: pass\n"
    )
    start = time.monotonic()
    r = py(box, code, Limits(wall_s=1.5))
    elapsed = time.monotonic() - start
    assert r.timed_out and elapsed < 8
    time.sleep(0.3)
    left = _alive_with(token)
    if left and not isolated():
        pytest.skip("without a PID namespace a setsid()ed grandchild survives: " + probe_isolation().message)
    assert not left


def test_cpu_limit_counts_as_timeout(box):
    r = py(box, "while True: pass\n", Limits(wall_s=30, cpu_s=1))
    assert r.timed_out


def test_environment_scrubbed_and_stdin_closed(box, monkeypatch):
    monkeypatch.setenv("CODESHELL_TEST_SECRET", "hunter2")
    code = ("import os, sys\n"
            "print(sorted(os.environ))\n"
            "print(repr(sys.stdin.read()))\n")
    r = py(box, code)
    assert r.returncode == 0, r.stderr
    assert "CODESHELL_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    assert r.stdout.splitlines()[-1] == "''"


def test_huge_output_is_capped(box):
    r = py(box, "import sys\nwhile True: sys.stdout.write('x' * 65536)\n", Limits(wall_s=20, fsize_mb=1))
    assert r.returncode != 0 and not r.timed_out
    assert len(r.stdout) <= 16 * 1024


# ---- faking a pass --------------------------------------------------------------------------------
PROGRAM = "def f():\n{body}\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)\n"


@pytest.mark.parametrize("body", [
    "    import sys; sys.exit(0)",
    "    import os; os._exit(0)",
    "    raise SystemExit(0)",
])
def test_early_exit_cannot_fake_a_pass(box, body):
    out = run_program(box, "py", PROGRAM.format(body=body))
    assert out.status == L.FAILED and "sentinel" in out.reason


def test_correct_program_passes_and_wrong_fails(box):
    assert run_program(box, "py", PROGRAM.format(body="    return 1")).status == L.PASSED
    out = run_program(box, "py", PROGRAM.format(body="    return 2"))
    assert out.status == L.FAILED and "AssertionError" in out.stderr
    out = run_program(box, "py", PROGRAM.format(body="    return 1/0"))
    assert out.status == L.ERROR and "ZeroDivisionError" in out.stderr


def test_early_exit_js(box):
    require_tool("js toolchain", L.find_toolchain("js") is not None, L.missing_reason("js"))
    prog = "function f(){ process.exit(0); }\nconst assert = require('node:assert');\nassert.deepEqual(f(), 1);\n"
    assert run_program(box, "js", prog).status == L.FAILED
    good = "function f(){ return 1; }\nconst assert = require('node:assert');\nassert.deepEqual(f(), 1);\n"
    assert run_program(box, "js", good).status == L.PASSED


def test_timeout_outcome(box):
    out = run_program(box, "py", PROGRAM.format(body="    while True: pass"), ExecOptions(run_timeout_s=1.0))
    assert out.status == L.TIMEOUT


def test_wait_without_pidfd(box, monkeypatch):
    # kernels before 5.3 have no pidfd: the polling path must behave the same
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    r = py(box, "print('ok')")
    assert (r.returncode, r.stdout, r.timed_out) == (0, "ok\n", False)
    r = py(box, "import time\ntime.sleep(30)\n", Limits(wall_s=1))
    assert r.timed_out and r.wall_s < 5


def test_extra_read_only_folders_are_shown_and_nothing_beside_them(box, tmp_path):
    """A toolchain folder outside /usr (here one under the host's /tmp, which the sandbox
    replaces with its own) is shown read-only at its path; its neighbours are not there."""
    if not isolated():
        pytest.skip(probe_isolation().message)
    tool = tmp_path / "toolchain"
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "data.txt").write_text("toolchain file")
    (tmp_path / "neighbour.txt").write_text("secret")
    for p in (tmp_path, tool, tool / "bin"):
        os.chmod(p, 0o755)
    os.chmod(tool / "bin" / "data.txt", 0o644)
    code = (f"import os\nprint(open({str(tool / 'bin' / 'data.txt')!r}).read())\n"
            f"print(os.path.exists({str(tmp_path / 'neighbour.txt')!r}))\n"
            f"try:\n    open({str(tool / 'bin' / 'new')!r}, 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n")
    with box.workdir() as wd:
        (wd / "p.py").write_text(code)
        box.chown_tree(wd)
        tc = L.find_toolchain("py")
        r = box.run([tc.tools["python"], "-I", "p.py"], wd, Limits(wall_s=10), ro_paths=[*tc.ro_paths, str(tool)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["toolchain file", "False", "ro 30"]  # EROFS


def test_install_dir_never_shows_a_whole_home():
    assert L._install_dir("/opt/julia-1.10/bin/julia") == "/opt/julia-1.10"
    assert L._install_dir("/root/.rustup/toolchains/stable/bin/rustc") == "/root/.rustup/toolchains/stable"
    assert L._install_dir("/root/bin/tool") == "/root/bin"
    assert L._install_dir("/home/ann/bin/tool") == "/home/ann/bin"
    assert L._install_dir("/bin/tool") == "/bin"


def test_non_root_user_gets_the_same_sandbox():
    """Run by a normal user, bubblewrap isolates through an unprivileged user namespace: checked
    here by running the sandbox module as `nobody` with the system Python."""
    import subprocess

    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or not isolated():
        pytest.skip("needs root (to become nobody), /usr/bin/python3 and a working sandbox")
    import shutil
    import tempfile

    src = Path(__file__).resolve().parents[2] / "codeshell" / "eval" / "sandbox.py"
    tmp_path = Path(tempfile.mkdtemp())  # (pytest's tmp_path is in a folder nobody cannot enter)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "sandbox.py").write_bytes(src.read_bytes())  # nobody may not read the project either
    os.chmod(tmp_path / "sandbox.py", 0o644)
    script = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('sbx', {str(tmp_path / 'sandbox.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['sbx'] = m; spec.loader.exec_module(m)\n"
        "info = m.probe_isolation(); print(info.mode)\n"
        "sb = m.Sandbox(0)\n"
        "with sb.workdir() as wd:\n"
        "    open(wd / 'p.py', 'w').write('import os\\n"
        "print(os.getuid(), sorted(p for p in os.listdir(\"/proc\") if p.isdigit()), "
        "open(\"/proc/self/status\").read().split(\"CapEff:\")[1].split()[0], "
        "[p for p in (\"/root\", \"/home\", \"/work\") if os.path.exists(p)])')\n"
        "    r = sb.run(['/usr/bin/python3', 'p.py'], wd, m.Limits(wall_s=10))\n"
        "    print(r.returncode, r.stdout.strip(), r.stderr.strip())\n"
    )
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                            script], capture_output=True, text=True, cwd="/", timeout=60,
                           env={"PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x.strip() for x in r.stdout.splitlines()] == ["bwrap", "0 65534 ['1', '2'] 0000000000000000 []"], r.stdout


def test_no_isolation_fails_every_job_instead_of_hanging(monkeypatch):
    """A slot whose Sandbox cannot be made (no bwrap here) goes back to the pool: with more jobs
    than workers the next job used to wait forever for it (a fresh machine hung the test run)."""
    import concurrent.futures
    import threading

    from codeshell.eval import execution, sandbox
    monkeypatch.setattr(sandbox, "probe_isolation", lambda: sandbox.IsolationInfo("none", "no bwrap (test)"))
    done = concurrent.futures.Future()

    def go():
        try:
            execution.execute([("py", "print(1)")] * 4, execution.ExecOptions(workers=1))
            done.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            done.set_exception(e)

    threading.Thread(target=go, daemon=True).start()
    with pytest.raises(sandbox.SandboxUnavailable, match="no bwrap"):
        done.result(timeout=30)
