"""Run test programs in the sandbox, in parallel, and classify each outcome.

Given (language, program) pairs this builds each program's files, compiles it where the
language needs it, runs it with the language's limits scaled by ``timeout_factor``, and
returns one :class:`Outcome` per program (passed / failed / error / compile_error /
timeout / skipped). Languages whose toolchain is missing come back ``skipped``, never
failed. This module does not know about tasks or models.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from codeshell.eval import languages as L
from codeshell.eval.sandbox import Limits, ProcResult, Sandbox, SlotPool
from codeshell.eval.zygote import PythonServer, ServerDied

STDERR_TAIL = 2000


@dataclass(frozen=True)
class ExecOptions:
    timeout_factor: float = 1.0
    workers: int | None = None  # default: all cores
    java_javatuples: bool = True  # False reproduces the old harness (javatuples off the classpath)
    run_timeout_s: float | None = None  # overrides the run step's wall/CPU limit (compiles keep theirs)
    allow_unsafe: bool = False  # run without isolation where the sandbox does not work (--unsafe-no-sandbox)
    # Python programs run as forks of one warm sandboxed interpreter per worker
    # (codeshell.eval.zygote); False starts a fresh sandbox and interpreter for each.
    python_server: bool = True

    def __post_init__(self) -> None:
        if not self.timeout_factor > 0:
            raise ValueError(f"timeout_factor must be > 0, got {self.timeout_factor}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class Outcome:
    status: str
    reason: str = ""
    stderr: str = ""  # tail
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == L.PASSED

    def to_dict(self) -> dict:
        return asdict(self)


def run_program(box: Sandbox, lang_key: str, program: str, opts: ExecOptions = ExecOptions(),
                server: PythonServer | None = None) -> Outcome:
    """Compile (if needed) and run one complete test program in a fresh sandbox folder;
    a Python program runs in ``server`` (a fork of a warm sandboxed interpreter) when given."""
    lang = L.LANGUAGES[lang_key]
    tc = L.find_toolchain(lang_key)
    if tc is None:
        return Outcome(L.SKIPPED, L.missing_reason(lang_key))
    token = L.SENTINEL_PREFIX + secrets.token_hex(12)
    try:
        source = lang.add_sentinel(program, token)
    except ValueError as e:
        return Outcome(L.ERROR, str(e))
    cmd_opts = {"java_javatuples": opts.java_javatuples}
    env = _env(lang, tc)
    if server is not None and lang_key == "py":
        limits = _run_limits(lang, opts)
        with server.workdir() as wd:
            (wd / lang.filename).write_text(source, encoding="utf-8")
            box.chown_tree(wd)
            r = server.run(lang.filename, wd, limits, env)
        return _outcome(lang, r, token, r.wall_s)
    with box.workdir() as wd:
        (wd / lang.filename).write_text(source, encoding="utf-8")
        box.chown_tree(wd)
        total = 0.0
        if lang.build_cmd is not None:
            r = box.run(lang.build_cmd(tc, cmd_opts), wd, lang.compile_limits.scaled(opts.timeout_factor), env,
                        tc.ro_paths)
            total += r.wall_s
            if r.setup_failed:
                return Outcome(L.ERROR, "sandbox setup failed", r.stderr[-STDERR_TAIL:], total)
            if r.timed_out:
                return Outcome(L.TIMEOUT, "compilation timed out", r.stderr[-STDERR_TAIL:], total)
            if r.returncode != 0:
                return Outcome(L.COMPILE_ERROR, f"compiler exit status {r.returncode}",
                               (r.stderr or r.stdout)[-STDERR_TAIL:], total)
        limits = _run_limits(lang, opts)
        r = box.run(lang.run_cmd(tc, cmd_opts), wd, limits, env, tc.ro_paths)
        total += r.wall_s
    return _outcome(lang, r, token, total)


def _env(lang: L.Language, tc: L.Toolchain) -> dict[str, str]:
    """A program's whole environment: the toolchain's folders first on PATH, then its language's variables."""
    env = {"PATH": ":".join([*tc.path_dirs, "/usr/local/bin", "/usr/bin", "/bin"])}
    if lang.env is not None:
        env.update(lang.env(tc))
    return env


def _run_limits(lang: L.Language, opts: ExecOptions) -> Limits:
    """The limits of running (not compiling) a program: the language's, scaled, or ``run_timeout_s``."""
    limits = lang.run_limits.scaled(opts.timeout_factor)
    if opts.run_timeout_s is not None:
        limits = dataclasses.replace(limits, wall_s=opts.run_timeout_s, cpu_s=opts.run_timeout_s)
    return limits


def _outcome(lang: L.Language, r: ProcResult, token: str, total: float) -> Outcome:
    if r.setup_failed:
        return Outcome(L.ERROR, "sandbox setup failed", r.stderr[-STDERR_TAIL:], total)
    status, reason = L.classify(lang, r.returncode, r.timed_out, r.stdout, r.stderr, token)
    tail = r.stderr if r.stderr.strip() else r.stdout.replace(token, "")
    return Outcome(status, reason, "" if status == L.PASSED else tail[-STDERR_TAIL:], total)


def python_server(box: Sandbox, opts: ExecOptions = ExecOptions()) -> PythonServer | None:
    """A warm sandboxed Python for ``box`` (not started until its first program), or ``None``
    where programs run unisolated or the option is off."""
    tc = L.find_toolchain("py")
    if not opts.python_server or box.mode == "none" or tc is None or not hasattr(os, "pidfd_open"):
        return None
    return PythonServer(box, tc.tools["python"], _env(L.LANGUAGES["py"], tc), tc.ro_paths)


def execute(jobs: Sequence[tuple[str, str]], opts: ExecOptions = ExecOptions(),
            on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run ``(language, program)`` jobs on ``opts.n_workers`` threads (each drives one sandbox
    process at a time, so the threads only wait); results come back in job order."""
    pool = SlotPool(opts.n_workers, allow_unsafe=opts.allow_unsafe)
    results: list[Outcome | None] = [None] * len(jobs)
    servers: dict[int, PythonServer | None] = {}  # per slot: only the thread holding the slot uses it

    def one(i: int) -> None:
        lang, program = jobs[i]
        with pool.acquire() as box:
            server = None
            if lang == "py":
                if box.slot not in servers:
                    servers[box.slot] = python_server(box, opts)
                server = servers[box.slot]
            try:
                out = run_program(box, lang, program, opts, server)
            except ServerDied:  # could not start here: fresh interpreters for this slot from now on
                servers[box.slot] = None
                out = run_program(box, lang, program, opts)
            except OSError as e:  # the harness's own failure (disk full, fork refused)
                out = Outcome(L.ERROR, f"harness error: {e}")
        results[i] = out
        if on_done is not None:
            on_done(i, out)

    try:
        with ThreadPoolExecutor(max_workers=opts.n_workers) as ex:
            for f in [ex.submit(one, i) for i in range(len(jobs))]:
                f.result()
    finally:
        for s in servers.values():
            if s is not None:
                s.close()
    return results  # type: ignore[return-value]
