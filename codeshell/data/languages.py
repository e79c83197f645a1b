"""A Linguist-style language table: file extensions and names, shebang interpreters and a few
content sniffs, for the ~90 languages CodeShell's corpus covers.

It is a lookup table, not a classifier: files it cannot place get `None` (the `langid`
stage may then drop them or keep them as "unknown").
"""

from __future__ import annotations

import re

# language -> (extensions, exact file names). Extensions are lower-case, with the dot.
LANGUAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ada": ((".adb", ".ads", ".ada"), ()),
    "agda": ((".agda",), ()),
    "alloy": ((".als",), ()),
    "antlr": ((".g4",), ()),
    "applescript": ((".applescript", ".scpt"), ()),
    "assembly": ((".asm", ".s", ".nasm"), ()),
    "augeas": ((".aug",), ()),
    "awk": ((".awk",), ()),
    "batchfile": ((".bat", ".cmd"), ()),
    "bluespec": ((".bsv",), ()),
    "c": ((".c", ".h"), ()),
    "c-sharp": ((".cs", ".csx"), ()),
    "clojure": ((".clj", ".cljs", ".cljc", ".edn"), ()),
    "cmake": ((".cmake",), ("CMakeLists.txt",)),
    "coffeescript": ((".coffee",), ()),
    "common-lisp": ((".lisp", ".lsp", ".cl"), ()),
    "cpp": ((".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx", ".c++", ".h++", ".ino"), ()),
    "css": ((".css",), ()),
    "cuda": ((".cu", ".cuh"), ()),
    "dart": ((".dart",), ()),
    "dockerfile": ((".dockerfile",), ("Dockerfile", "Containerfile")),
    "elixir": ((".ex", ".exs"), ()),
    "elm": ((".elm",), ()),
    "emacs-lisp": ((".el",), (".emacs",)),
    "erlang": ((".erl", ".hrl"), ()),
    "f-sharp": ((".fs", ".fsi", ".fsx"), ()),
    "fortran": ((".f", ".f90", ".f95", ".f03", ".for", ".f77"), ()),
    "glsl": ((".glsl", ".vert", ".frag", ".geom"), ()),
    "go": ((".go",), ()),
    "groovy": ((".groovy", ".gradle"), ()),
    "haskell": ((".hs", ".lhs"), ()),
    "html": ((".html", ".htm", ".xhtml"), ()),
    "idris": ((".idr",), ()),
    "isabelle": ((".thy",), ()),
    "java": ((".java",), ()),
    "java-server-pages": ((".jsp",), ()),
    "javascript": ((".js", ".mjs", ".cjs", ".jsx"), ()),
    "json": ((".json", ".jsonl", ".geojson"), (".babelrc", ".eslintrc")),
    "julia": ((".jl",), ()),
    "jupyter": ((".ipynb",), ()),
    "kotlin": ((".kt", ".kts"), ()),
    "lean": ((".lean",), ()),
    "literate-agda": ((".lagda",), ()),
    "literate-coffeescript": ((".litcoffee",), ()),
    "literate-haskell": ((".lhs",), ()),
    "lua": ((".lua",), ()),
    "makefile": ((".mk", ".mak"), ("Makefile", "makefile", "GNUmakefile")),
    "maple": ((".mpl",), ()),
    "markdown": ((".md", ".markdown", ".mdown"), ()),
    "mathematica": ((".nb", ".wl", ".wls"), ()),
    "matlab": ((".matlab",), ()),
    "objective-c": ((".m", ".mm"), ()),
    "ocaml": ((".ml", ".mli"), ()),
    "pascal": ((".pas", ".pp", ".dpr"), ()),
    "perl": ((".pl", ".pm", ".t"), ()),
    "php": ((".php", ".php3", ".php4", ".php5", ".phtml"), ()),
    "powershell": ((".ps1", ".psm1", ".psd1"), ()),
    "prolog": ((".pro", ".prolog"), ()),
    "protocol-buffer": ((".proto",), ()),
    "python": ((".py", ".pyw", ".pyi"), ("SConstruct", "SConscript")),
    "r": ((".r", ".rmd"), ()),
    "racket": ((".rkt",), ()),
    "restructuredtext": ((".rst", ".rest"), ()),
    "rmarkdown": ((".rmarkdown",), ()),
    "ruby": ((".rb", ".rake", ".gemspec"), ("Rakefile", "Gemfile")),
    "rust": ((".rs",), ()),
    "sas": ((".sas",), ()),
    "scala": ((".scala", ".sc"), ()),
    "scheme": ((".scm", ".ss"), ()),
    "shell": ((".sh", ".bash", ".zsh", ".ksh"), (".bashrc", ".bash_profile", ".zshrc")),
    "smalltalk": ((".st",), ()),
    "solidity": ((".sol",), ()),
    "sparql": ((".sparql", ".rq"), ()),
    "sql": ((".sql",), ()),
    "stan": ((".stan",), ()),
    "standard-ml": ((".sml", ".sig"), ()),
    "stata": ((".do", ".ado"), ()),
    "systemverilog": ((".sv", ".svh"), ()),
    "tcl": ((".tcl", ".tk"), ()),
    "tcsh": ((".tcsh", ".csh"), ()),
    "tex": ((".tex", ".sty", ".cls", ".bib"), ()),
    "thrift": ((".thrift",), ()),
    "toml": ((".toml",), ("Cargo.lock", "Pipfile")),
    "typescript": ((".ts", ".tsx", ".mts", ".cts"), ()),
    "verilog": ((".v", ".vh"), ()),
    "vhdl": ((".vhd", ".vhdl"), ()),
    "visual-basic": ((".vb", ".bas", ".vbs"), ()),
    "vue": ((".vue",), ()),
    "xml": ((".xml", ".xsd", ".xsl", ".xslt", ".svg", ".plist"), ()),
    "xslt": ((".xslt",), ()),
    "yacc": ((".y", ".yy"), ()),
    "yaml": ((".yaml", ".yml"), (".clang-format",)),
    "zig": ((".zig",), ()),
    "text": ((".txt",), ("README", "LICENSE", "COPYING", "NEWS", "CHANGES")),
}

# Other spellings (The Stack, Linguist, GitHub) -> our names.
ALIASES = {"c++": "cpp", "c#": "c-sharp", "csharp": "c-sharp", "f#": "f-sharp", "fsharp": "f-sharp",
           "js": "javascript", "ts": "typescript", "bash": "shell", "sh": "shell", "golang": "go",
           "objective-c++": "objective-c", "objc": "objective-c", "emacs lisp": "emacs-lisp",
           "common lisp": "common-lisp", "visual basic": "visual-basic", "vb": "visual-basic", "tsx": "typescript",
           "protocol buffer": "protocol-buffer", "jupyter notebook": "jupyter", "plain text": "text",
           "standard ml": "standard-ml", "literate haskell": "literate-haskell", "batch": "batchfile"}


def canonical(name: str) -> str:
    """Our name for a language label from elsewhere ("C++" -> "cpp"); unknown labels pass through."""
    low = name.strip().lower()
    return ALIASES.get(low, low.replace(" ", "-"))


EXTENSIONS: dict[str, str] = {}
FILENAMES: dict[str, str] = {}
for _lang, (_exts, _names) in LANGUAGES.items():
    for _e in _exts:
        EXTENSIONS.setdefault(_e, _lang)  # first listed wins (".lhs" -> haskell)
    for _n in _names:
        FILENAMES[_n] = _lang

INTERPRETERS = {
    "python": "python", "python2": "python", "python3": "python", "pypy": "python", "pypy3": "python",
    "sh": "shell", "bash": "shell", "zsh": "shell", "ksh": "shell", "dash": "shell", "ash": "shell",
    "node": "javascript", "nodejs": "javascript", "deno": "typescript", "ts-node": "typescript",
    "perl": "perl", "perl5": "perl", "ruby": "ruby", "php": "php", "lua": "lua", "luajit": "lua",
    "Rscript": "r", "julia": "julia", "tclsh": "tcl", "wish": "tcl", "awk": "awk", "gawk": "awk",
    "csh": "tcsh", "tcsh": "tcsh", "pwsh": "powershell", "escript": "erlang", "racket": "racket",
    "guile": "scheme", "sbcl": "common-lisp", "scala": "scala", "groovy": "groovy", "make": "makefile",
    "runghc": "haskell", "stack": "haskell", "elixir": "elixir", "osascript": "applescript",
}
SHEBANG = re.compile(r"^#!\s*(\S+)(?:\s+(\S+))?")

# Content sniffs for files with no extension or shebang, checked in order on the first 2 KB.
SNIFFS: list[tuple[str, re.Pattern]] = [
    ("php", re.compile(r"<\?php")),
    ("html", re.compile(r"<!DOCTYPE html|<html[\s>]", re.I)),
    ("xml", re.compile(r"^\s*<\?xml ")),
    ("c", re.compile(r"^#include\s*[<\"]", re.M)),
    ("go", re.compile(r"^package \w+\s*$", re.M)),
    ("python", re.compile(r"^(?:def \w+\(.*\):|import \w+|from [\w.]+ import )", re.M)),
    ("shell", re.compile(r"^(?:set -e|export \w+=|if \[ )", re.M)),
    ("json", re.compile(r"\A\s*[\[{]\s*\"")),
]


def language_of(path: str | None, text: str = "") -> str | None:
    """Language from file name, then extension, then shebang, then content; or None."""
    if path:
        name = path.rsplit("/", 1)[-1]
        if name in FILENAMES:
            return FILENAMES[name]
        dot = name.rfind(".")
        if dot > 0 or (dot == 0 and name.count(".") > 1):
            lang = EXTENSIONS.get(name[dot:].lower())
            if lang:
                return lang
        if name.startswith("Dockerfile"):
            return "dockerfile"
    if text.startswith("#!"):
        m = SHEBANG.match(text)
        if m:
            prog = m.group(1).rsplit("/", 1)[-1]
            if prog == "env" and m.group(2):
                prog = m.group(2)
            prog = re.sub(r"[\d.]+$", "", prog) if prog not in INTERPRETERS else prog
            if prog in INTERPRETERS:
                return INTERPRETERS[prog]
    head = text[:2048]
    for lang, pat in SNIFFS:
        if pat.search(head):
            return lang
    return None
