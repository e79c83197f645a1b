"""MultiPL-E: for each installed toolchain, hand-written correct solutions pass, wrong ones
fail, and a compile error, a runtime error, a timeout and an early exit are each reported as
such. Languages without a toolchain are skipped (reported as skipped, never as failures).

All programs of all languages run in two parallel batches (module fixtures) so the slow
compilers (javac, rustc, ldc) overlap."""

from __future__ import annotations

import pytest

from codeshell.eval import languages as L
from codeshell.eval.execution import ExecOptions, execute
from codeshell.eval.tasks import MULTIPLE_LANGS, get_task
from tests.conftest import require_shared, require_tool

ADD, STRLEN, FIB, SUMPROD = "HumanEval_53_add", "HumanEval_23_strlen", "HumanEval_55_fib", "HumanEval_8_sum_product"

# lang -> case -> (problem, completion). Completions continue the stripped prompt; the tests
# that follow close the function where the language's stop token leaves it open.
CASES: dict[str, dict[str, tuple[str, str]]] = {
    "cpp": {
        "ok_add": (ADD, "\n    return x + y;\n"),
        "ok_strlen": (STRLEN, "\n    return string.size();\n"),
        "wrong": (ADD, "\n    return x - y;\n"),
        "compile_error": (ADD, "\n    return x + ;\n"),
        "runtime_error": (ADD, "\n    std::vector<long> v; return v.at(5);\n"),
        "timeout": (ADD, "\n    volatile long i = 0; while (true) { i++; }\n"),
        "early_exit": (ADD, "\n    exit(0);\n"),
    },
    "java": {
        "ok_add": (ADD, "\n        return x + y;\n"),
        "ok_strlen": (STRLEN, "\n        return string.length();\n"),
        "ok_tuples": (SUMPROD, "\n        long s = 0, p = 1;\n        for (long v : numbers) { s += v; p *= v; }\n"
                               "        return Pair.with(s, p);\n"),
        "wrong": (ADD, "\n        return x - y;\n"),
        "compile_error": (ADD, "\n        return x + ;\n"),
        "runtime_error": (ADD, "\n        throw new RuntimeException(\"boom\");\n"),
        "timeout": (ADD, "\n        while (true) {}\n"),
        "early_exit": (ADD, "\n        System.exit(0);\n        return 0;\n"),
    },
    "js": {
        "ok_add": (ADD, "\n  return x + y;\n}\n"),
        "ok_strlen": (STRLEN, "\n  return string.length;\n}\n"),
        "wrong": (ADD, "\n  return x - y;\n}\n"),
        "runtime_error": (ADD, "\n  return null.x;\n}\n"),
        "timeout": (ADD, "\n  while (true) {}\n}\n"),
        "early_exit": (ADD, "\n  process.exit(0);\n}\n"),
    },
    "php": {
        "ok_add": (ADD, "\n    return $x + $y;\n}\n"),
        "ok_fib": (FIB, "\n    if ($n < 2) return $n;\n    return fib($n - 1) + fib($n - 2);\n}\n"),
        "wrong": (ADD, "\n    return $x - $y;\n}\n"),
        "runtime_error": (ADD, "\n    return intdiv($x, 0);\n}\n"),
        "timeout": (ADD, "\n    while (true) {}\n}\n"),
        "early_exit": (ADD, "\n    exit(0);\n}\n"),
    },
    "lua": {
        "ok_add": (ADD, "\n    return x + y\nend\n"),
        "ok_strlen": (STRLEN, "\n    return #string\nend\n"),
        "wrong": (ADD, "\n    return x - y\nend\n"),
        "runtime_error": (ADD, "\n    return nil + x\nend\n"),
        "timeout": (ADD, "\n    while true do end\nend\n"),
        "early_exit": (ADD, "\n    os.exit(0)\nend\n"),
    },
    "r": {
        "ok_add": (ADD, "\n  x + y\n}\n"),
        "ok_strlen": (STRLEN, "\n  nchar(string)\n}\n"),
        "wrong": (ADD, "\n  x - y\n}\n"),
        "runtime_error": (ADD, "\n  stop('boom')\n}\n"),
        "timeout": (ADD, "\n  while (TRUE) {}\n}\n"),
        "early_exit": (ADD, "\n  quit(status = 0)\n}\n"),
    },
    "rkt": {
        "ok_add": (ADD, "\n  (+ x y))\n"),
        "ok_strlen": (STRLEN, "\n  (string-length string))\n"),
        "wrong": (ADD, "\n  (- x y))\n"),
        "runtime_error": (ADD, "\n  (car '()))\n"),
        "timeout": (ADD, "\n  (let loop () (loop)))\n"),
        "early_exit": (ADD, "\n  (exit 0))\n"),
    },
    "d": {
        "ok_add": (ADD, "\n{\n    return x + y;\n}\n"),
        "ok_strlen": (STRLEN, "\n{\n    return cast(long) string.length;\n}\n"),
        "wrong": (ADD, "\n{\n    return x - y;\n}\n"),
        "compile_error": (ADD, "\n{\n    return x + ;\n}\n"),
        "runtime_error": (ADD, "\n{\n    long[] a;\n    return a[cast(size_t) x + 5];\n}\n"),
        "timeout": (ADD, "\n{\n    while (true) {}\n}\n"),
        "early_exit": (ADD, "\n{\n    import core.stdc.stdlib : exit;\n    exit(0);\n    return 0;\n}\n"),
    },
    "rs": {
        "ok_add": (ADD, "\n    x + y\n"),
        "ok_strlen": (STRLEN, "\n    string.len() as isize\n"),
        "wrong": (ADD, "\n    x - y\n"),
        "compile_error": (ADD, "\n    x + \n"),
        "runtime_error": (ADD, "\n    let v: Vec<isize> = vec![x];\n    v[(y + 5) as usize]\n"),
        "timeout": (ADD, "\n    loop {}\n"),
        "early_exit": (ADD, "\n    std::process::exit(0)\n"),
    },
    "jl": {
        "ok_add": (ADD, "\n    return x + y\nend\n"),
        "ok_strlen": (STRLEN, "\n    return length(string)\nend\n"),
        "wrong": (ADD, "\n    return x - y\nend\n"),
        "runtime_error": (ADD, "\n    error(\"boom\")\nend\n"),
        "timeout": (ADD, "\n    while true end\nend\n"),
        "early_exit": (ADD, "\n    exit(0)\nend\n"),
    },
    "swift": {
        "ok_add": (ADD, "\n    return x + y\n"),
        "ok_strlen": (STRLEN, "\n    return string.count\n"),
        "wrong": (ADD, "\n    return x - y\n"),
        "compile_error": (ADD, "\n    return x + \n"),
        "runtime_error": (ADD, "\n    let a: [Int] = []\n    return a[x + 5]\n"),
        "timeout": (ADD, "\n    while true {}\n"),
        "early_exit": (ADD, "\n    exit(0)\n"),
    },
}
EXPECTED = {"wrong": L.FAILED, "compile_error": L.COMPILE_ERROR, "runtime_error": L.ERROR,
            "timeout": L.TIMEOUT, "early_exit": L.FAILED}
# Early exits of the compiled languages cost a compile each and prove what the Python/JS/... ones
# prove already: in the slow run.
SLOW = {(lang, "early_exit") for lang in ("cpp", "java", "d", "rs", "swift")}
INSTALLED = [lang for lang in MULTIPLE_LANGS if L.find_toolchain(lang) is not None]
OPTS = ExecOptions(timeout_factor=3.0)
# Cases that need more than the language's toolchain: (lang, case) -> the extra piece.
NEEDS_JAR = {("java", "ok_tuples"): "javatuples"}
JAVATUPLES_WHY = "the javatuples jar is not installed (apt-get install libjavatuples-java)"


def _has_javatuples() -> bool:
    tc = L.find_toolchain("java")
    return tc is not None and "javatuples" in tc.extra


def _programs(kinds, slow=False):
    data = require_shared("eval-data")
    jobs, keys = [], []
    for lang in INSTALLED:
        task = get_task(f"multiple-{lang}", data)
        problems = {p.task_id: p for p in task.problems()}
        for case, (pid, completion) in CASES[lang].items():
            if kinds(case) and ((lang, case) in SLOW) == slow:
                jobs.append((lang, task.program(problems[pid], completion)))
                keys.append((lang, case))
    return keys, jobs


@pytest.fixture(scope="module")
def outcomes():
    keys, jobs = _programs(lambda c: c != "timeout")
    res = dict(zip(keys, execute(jobs, OPTS)))
    keys, jobs = _programs(lambda c: c == "timeout")
    res.update(zip(keys, execute(jobs, ExecOptions(run_timeout_s=2.0, timeout_factor=3.0))))
    return res


def test_every_language_has_cases():
    assert set(CASES) == set(MULTIPLE_LANGS)
    for lang, cases in CASES.items():
        assert sum(c.startswith("ok_") for c in cases) >= 2 and "wrong" in cases and "timeout" in cases
        assert ("compile_error" in cases) == L.LANGUAGES[lang].compiled


@pytest.mark.parametrize("lang", MULTIPLE_LANGS)
def test_language(lang, outcomes):
    require_tool(f"{lang} toolchain", lang in INSTALLED, L.missing_reason(lang))
    for case in CASES[lang]:
        if (lang, case) in SLOW or (lang, case) in NEEDS_JAR:
            continue
        o = outcomes[(lang, case)]
        want = L.PASSED if case.startswith("ok_") else EXPECTED[case]
        if case == "early_exit" and lang == "lua":
            # luaunit traps os.exit() itself and fails the run: no fake pass either way
            want = L.ERROR
        assert o.status == want, f"{lang}/{case}: {o.status} ({o.reason})\n{o.stderr[-800:]}"
        if case == "early_exit" and want == L.FAILED:
            assert "sentinel" in o.reason
        if case in ("compile_error", "runtime_error", "wrong") and lang != "lua":
            assert o.stderr, f"{lang}/{case}: no stderr tail"


@pytest.mark.slow
def test_compiled_early_exit():
    keys, jobs = _programs(lambda c: True, slow=True)
    for (lang, case), o in zip(keys, execute(jobs, OPTS)):
        assert o.status == L.FAILED and "sentinel" in o.reason, (lang, o)


def test_missing_toolchain_is_skipped_not_failed(monkeypatch):
    monkeypatch.setattr(L, "find_toolchain", lambda key: None)
    from codeshell.eval.sandbox import Sandbox
    from codeshell.eval.execution import run_program

    o = run_program(Sandbox(0), "swift", "print(1)")
    assert o.status == L.SKIPPED and "Swift" in o.reason and not o.passed


def test_java_with_javatuples(outcomes):
    require_tool("java toolchain", "java" in INSTALLED, L.missing_reason("java"))
    require_tool("javatuples", _has_javatuples(), JAVATUPLES_WHY)
    o = outcomes[("java", "ok_tuples")]
    assert o.status == L.PASSED, f"java/ok_tuples: {o.status} ({o.reason})\n{o.stderr[-800:]}"


def test_java_without_javatuples_reproduces_the_old_failure():
    require_tool("java toolchain", "java" in INSTALLED, L.missing_reason("java"))
    require_tool("javatuples", _has_javatuples(), JAVATUPLES_WHY)
    task = get_task("multiple-java", require_shared("eval-data"))
    p = next(p for p in task.problems() if p.task_id == SUMPROD)
    prog = task.program(p, CASES["java"]["ok_tuples"][1])
    (old,) = execute([("java", prog)], ExecOptions(timeout_factor=3.0, java_javatuples=False))
    assert old.status == L.COMPILE_ERROR and "javatuples" in old.stderr


def test_sentinel_fits_every_test_file():
    # every MultiPL-E test file has the entry point the sentinel is spliced into
    data = require_shared("eval-data")
    for lang in MULTIPLE_LANGS:
        task = get_task(f"multiple-{lang}", data)
        for p in task.problems():
            L.LANGUAGES[lang].add_sentinel(task.program(p, ""), "TOKEN")
