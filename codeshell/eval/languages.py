"""Languages the harness can execute: toolchain discovery, build/run commands, the
end-of-tests sentinel, and how to classify a failed run.

A :class:`Language` turns a complete test program (prompt + completion + tests, built by
:mod:`codeshell.eval.tasks`) into files and sandboxed commands, and an exit status into an
outcome. It does not read datasets or talk to models.

The sentinel: every program gets a statement appended (or spliced in after the tests, where
the tests end the process themselves) that prints a per-run random token. A program passes
only if it exits 0 *and* printed the token, so a completion that calls ``exit(0)`` before
the tests run cannot score.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from codeshell.eval.sandbox import Limits

SENTINEL_PREFIX = "CODESHELL_TESTS_DONE_"


@dataclass(frozen=True)
class Toolchain:
    """Resolved absolute paths of a language's tools (plus extra files such as jars)."""

    tools: dict[str, str]
    extra: dict[str, str]

    @property
    def path_dirs(self) -> list[str]:
        return sorted({os.path.dirname(p) for p in self.tools.values()})

    @property
    def ro_paths(self) -> list[str]:
        """Installation folders the sandbox must show (read-only) for these tools to run: a
        tool's ``<prefix>/bin/<tool>`` gives ``<prefix>``; a file in ``extra`` gives its folder.
        The sandbox ignores those already inside its system view (``/usr``, ``/etc``)."""
        out = []
        for name, p in self.tools.items():
            real = os.path.realpath(p)
            out.append(_install_dir(real))
            if name == "python":  # a venv's site-packages lives in sys.prefix, the stdlib in base_prefix
                out += [sys.prefix, sys.base_prefix]
        out += [os.path.dirname(os.path.realpath(p)) for p in self.extra.values() if os.path.isabs(p)]
        return sorted(set(out))


def _install_dir(tool: str) -> str:
    """``<prefix>`` of ``<prefix>/bin/<tool>``; just the tool's folder where that prefix would be
    ``/``, a home folder or ``/home`` (a binary in ``~/bin`` must not show the whole home)."""
    prefix = os.path.dirname(os.path.dirname(tool))
    homes = {"/", "/root", "/home", os.path.expanduser("~")}
    if prefix in homes or os.path.dirname(prefix) == "/home":
        return os.path.dirname(tool)
    return prefix


@dataclass(frozen=True)
class Language:
    key: str  # the MultiPL-E suffix ("py" for Python)
    name: str
    filename: str
    binaries: tuple[str, ...]
    install: str  # how to get the toolchain on Debian/Ubuntu
    run_limits: Limits
    compile_limits: Limits | None
    build_cmd: Callable[[Toolchain, dict], list[str]] | None
    run_cmd: Callable[[Toolchain, dict], list[str]]
    add_sentinel: Callable[[str, str], str]
    failure_re: re.Pattern
    stderr_is_failure: bool = False  # rackunit reports failed checks on stderr and exits 0
    available_on_debian: bool = True
    env: Callable[[Toolchain], dict[str, str]] | None = None  # extra environment for its commands

    @property
    def compiled(self) -> bool:
        return self.build_cmd is not None


def _append(fmt: str) -> Callable[[str, str], str]:
    return lambda program, token: program.rstrip("\n") + "\n" + fmt.format(token=token) + "\n"


def _splice(marker: str, replacement: str) -> Callable[[str, str], str]:
    """Rewrite the tests' entry point so the sentinel prints after they return."""

    def add(program: str, token: str) -> str:
        idx = program.rfind(marker)
        if idx < 0:
            raise ValueError(f"cannot place the end-of-tests sentinel: the tests have no {marker!r}")
        return program[:idx] + replacement.format(token=token) + program[idx + len(marker):]

    return add


def _java_cp(tc: Toolchain, opts: dict) -> str | None:
    jar = tc.extra.get("javatuples")
    return jar if jar and opts.get("java_javatuples", True) else None


def _javac(tc: Toolchain, opts: dict) -> list[str]:
    cp = _java_cp(tc, opts)
    return [tc.tools["javac"], "-J-Xmx512m", "-J-XX:+UseSerialGC", "-J-XX:-UsePerfData",
            "-encoding", "UTF-8", *(["-cp", cp] if cp else []), "Problem.java"]


def _java(tc: Toolchain, opts: dict) -> list[str]:
    cp = _java_cp(tc, opts)
    return [tc.tools["java"], "-ea", "-Xmx512m", "-XX:+UseSerialGC", "-XX:-UsePerfData",
            "-cp", "." + (f":{cp}" if cp else ""), "Problem"]


_RUN = Limits(wall_s=15.0, memory_mb=2048)
_COMPILE = Limits(wall_s=40.0, memory_mb=4096)
_JVM = Limits(wall_s=15.0, memory_mb=4096)

LANGUAGES: dict[str, Language] = {lang.key: lang for lang in [
    Language(
        "py", "Python", "prog.py", ("python",), "(always available)",
        Limits(wall_s=3.0, memory_mb=2048), None, None,
        # -S -s: no site hooks (.pth files can cost 100+ ms per start); installed packages stay
        # importable through PYTHONPATH, as they were in the old in-process harness.
        lambda tc, o: [tc.tools["python"], "-S", "-s", "prog.py"],
        _append("print({token!r})"),
        re.compile(r"AssertionError"),
        env=lambda tc: {"PYTHONPATH": os.pathsep.join(_site_packages()), "PYTHONDONTWRITEBYTECODE": "1",
                        "PYTHONIOENCODING": "utf-8"}),
    Language(
        "js", "JavaScript", "prog.js", ("node",), "apt-get install nodejs",
        Limits(wall_s=15.0, memory_mb=4096), None, None,
        lambda tc, o: [tc.tools["node"], "prog.js"],
        _append("console.log({token!r});"),
        re.compile(r"AssertionError|ERR_ASSERTION")),
    Language(
        "cpp", "C++", "prog.cpp", ("g++",), "apt-get install g++",
        _RUN, _COMPILE,
        lambda tc, o: [tc.tools["g++"], "-std=c++17", "prog.cpp", "-o", "prog"],
        lambda tc, o: ["./prog"],
        _splice("int main() {", 'void __codeshell_tests();\nint main() {{ __codeshell_tests(); '
                'printf("%s\\n", "{token}"); return 0; }}\nvoid __codeshell_tests() {{'),
        re.compile(r"Assertion .* failed")),
    Language(
        "java", "Java", "Problem.java", ("javac", "java"), "apt-get install default-jdk libjavatuples-java",
        _JVM, _COMPILE, _javac, _java,
        _splice("public static void main(String[] args) {",
                'public static void main(String[] args) throws Exception {{ __codeshellTests(args); '
                'System.out.println("{token}"); }}\n    public static void __codeshellTests(String[] args) '
                'throws Exception {{'),
        re.compile(r"java\.lang\.AssertionError")),
    Language(
        "php", "PHP", "prog.php", ("php",), "apt-get install php-cli",
        _RUN, None, None, lambda tc, o: [tc.tools["php"], "prog.php"],
        _append('echo "{token}\\n";'),
        re.compile(r"Test failed!")),
    Language(
        "lua", "Lua", "prog.lua", ("lua",), "apt-get install lua5.3 lua-unit",
        _RUN, None, None, lambda tc, o: [tc.tools["lua"], "prog.lua"],
        _splice("os.exit(lu.LuaUnit.run())",
                'local __codeshell_rc = lu.LuaUnit.run()\nif __codeshell_rc == 0 then print("{token}") end\n'
                "os.exit(__codeshell_rc)"),
        re.compile(r"expected: .*actual: ")),
    Language(
        "r", "R", "prog.r", ("Rscript",), "apt-get install r-base-core",
        _RUN, None, None, lambda tc, o: [tc.tools["Rscript"], "prog.r"],
        _append('cat("{token}\\n")'),
        re.compile(r"is not TRUE|are not all TRUE")),
    Language(
        "rkt", "Racket", "prog.rkt", ("racket",), "apt-get install racket",
        _RUN, None, None, lambda tc, o: [tc.tools["racket"], "prog.rkt"],
        _append('(displayln "{token}")'),
        re.compile(r"FAILURE"), stderr_is_failure=True),
    Language(
        "d", "D", "prog.d", ("ldmd2",), "apt-get install ldc",
        _RUN, _COMPILE,
        # Same as `ldmd2 -unittest -run prog.d`, split in two to tell compile errors apart.
        lambda tc, o: [tc.tools["ldmd2"], "-unittest", "-of=prog", "prog.d"],
        lambda tc, o: ["./prog"],
        _append('unittest {{ import std.stdio : writeln; writeln("{token}"); }}'),
        re.compile(r"Assertion failure|AssertError")),
    Language(
        "rs", "Rust", "prog.rs", ("rustc",), "apt-get install rustc",
        _RUN, _COMPILE,
        lambda tc, o: [tc.tools["rustc"], "--edition=2021", *tc.extra.get("rustc_flags", "").split(), "prog.rs",
                       "-o", "prog"],
        lambda tc, o: ["./prog"],
        _splice("fn main() {", 'fn main() {{ __codeshell_tests(); println!("{token}"); }}\n'
                "fn __codeshell_tests() {{"),
        re.compile(r"assertion .*failed|assertion failed")),
    Language(
        "jl", "Julia", "prog.jl", ("julia",), "julia is not packaged by Debian: see https://julialang.org/downloads/",
        Limits(wall_s=30.0, memory_mb=None), None, None, lambda tc, o: [tc.tools["julia"], "prog.jl"],
        _append('println("{token}")'),
        re.compile(r"Test Failed|Some tests did not pass"), available_on_debian=False),
    Language(
        "swift", "Swift", "prog.swift", ("swiftc",), "swift is not packaged by Debian: see https://www.swift.org/install/",
        _RUN, Limits(wall_s=60.0, memory_mb=None),
        lambda tc, o: [tc.tools["swiftc"], "prog.swift", "-o", "prog"],
        lambda tc, o: ["./prog"],
        _append('print("{token}")'),
        re.compile(r"Assertion failed|Fatal error"), available_on_debian=False),
]}

_LUA_NAMES = ("lua5.3", "lua5.4", "lua")
_JAVATUPLES = ("/usr/share/java/javatuples.jar",)


@functools.lru_cache(maxsize=1)
def _site_packages() -> tuple[str, ...]:
    import site

    paths = [*site.getsitepackages(), site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    return tuple(p for p in paths if os.path.isdir(p))


def _which(name: str) -> str | None:
    path = shutil.which(name)
    return os.path.realpath(path) if path else None


def _rustc() -> str | None:
    # rustup's proxy needs RUSTUP_HOME/$HOME, which the sandbox replaces: use the real binary.
    proxy = shutil.which("rustc")
    if not proxy:
        return None
    try:
        sysroot = subprocess.run([proxy, "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    real = Path(sysroot, "bin", "rustc")
    return str(real) if sysroot and real.exists() else os.path.realpath(proxy)


@functools.lru_cache(maxsize=None)
def find_toolchain(key: str) -> Toolchain | None:
    """The language's tools, or ``None`` when one is missing (never raises)."""
    lang = LANGUAGES[key]
    tools: dict[str, str] = {}
    extra: dict[str, str] = {}
    for b in lang.binaries:
        if b == "python":
            path = sys.executable
        elif b == "lua":
            path = next((p for p in map(_which, _LUA_NAMES) if p), None)
        elif b == "rustc":
            path = _rustc()
        else:
            path = _which(b)
        if not path:
            return None
        tools[b] = path
    if key == "java":
        jar = os.environ.get("CODESHELL_JAVATUPLES") or next((j for j in _JAVATUPLES if os.path.exists(j)), None)
        if jar:
            extra["javatuples"] = os.path.realpath(jar)
    if key == "rs" and _accepts(tools["rustc"], "-C", "linker-features=-lld"):
        # rustc >= 1.90 links with its bundled lld through gcc (found with access() in the
        # toolchain's folder); the system linker works everywhere, whatever the sandbox shows.
        extra["rustc_flags"] = "-C linker-features=-lld"
    if key == "lua" and not _lua_has_luaunit(tools["lua"]):
        return None
    return Toolchain(tools, extra)


def _accepts(tool: str, *flags: str) -> bool:
    try:
        return subprocess.run([tool, *flags, "--print", "sysroot"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _lua_has_luaunit(lua: str) -> bool:
    try:
        r = subprocess.run([lua, "-e", "require('luaunit')"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def missing_reason(key: str) -> str:
    lang = LANGUAGES[key]
    if key == "lua" and any(map(_which, _LUA_NAMES)):
        return "the Lua module luaunit is missing (apt-get install lua-unit)"
    return f"toolchain for {lang.name} not found ({', '.join(lang.binaries)}); install: {lang.install}"


# Outcome classification ---------------------------------------------------------------------
PASSED, FAILED, ERROR, COMPILE_ERROR, TIMEOUT, SKIPPED = (
    "passed", "failed", "error", "compile_error", "timeout", "skipped")


def classify(lang: Language, rc: int, timed_out: bool, stdout: str, stderr: str, token: str) -> tuple[str, str]:
    """(status, reason) of a finished run."""
    if timed_out:
        return TIMEOUT, "killed at the time limit"
    sentinel = token in stdout
    clean_stderr = not (lang.stderr_is_failure and stderr.strip())
    if rc == 0 and sentinel and clean_stderr:
        return PASSED, ""
    if rc == 0 and not sentinel:
        return FAILED, "exited with status 0 before the tests finished (no end-of-tests sentinel)"
    if lang.failure_re.search(stderr) or lang.failure_re.search(stdout[-4000:]):
        return FAILED, "a test assertion failed"
    if rc < 0:
        return ERROR, f"killed by signal {-rc}"
    if rc == 0:
        return ERROR, "errors reported on stderr"
    return ERROR, f"exit status {rc}"
