#!/usr/bin/env bash
# llama.cpp for the GGUF tests (tests/quant/test_gguf_llamacpp.py) and the benchmarks that compare
# with it: builds llama-server, llama-bench, llama-simple and llama-quantize once per machine into
# ${XDG_CACHE_HOME:-~/.cache}/codeshell/llama.cpp (the converter convert_hf_to_gguf.py and its
# gguf-py come with it), with ../shared/tools/build_llamacpp.sh (source: the llama-cpp-python sdist
# on PyPI; ~15-30 min on 2 cores). Idempotent: a cache whose programs run is kept. CI requires it
# (a failure here must fail the run): tests run with CODESHELL_REQUIRE_LLAMACPP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${CODESHELL_LLAMACPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/codeshell/llama.cpp}
BIN="$DEST/build/bin"
STAMP="$DEST/.codeshell-built"

# GGML_NATIVE builds for this CPU's instruction sets: a cache built on another CPU is rebuilt.
cpu() { grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-16; }

works() {
    [ -f "$STAMP" ] && grep -q "cpu $(cpu)" "$STAMP" || return 1
    for t in llama-server llama-bench llama-simple llama-quantize; do
        [ -x "$BIN/$t" ] || return 1
    done
    "$BIN/llama-server" --version >/dev/null 2>&1 && [ -f "$DEST/convert_hf_to_gguf.py" ]
}

if works; then
    echo "llama.cpp: using $BIN ($("$BIN/llama-server" --version 2>&1 | grep -m1 '^version' || true))"
    exit 0
fi

SHARED=${CODESHELL_SHARED:-../shared}
BUILD="$SHARED/tools/build_llamacpp.sh"
[ -f "$BUILD" ] || { echo "error: $BUILD not found (set CODESHELL_SHARED)" >&2; exit 1; }

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

mkdir -p "$(dirname "$DEST")"
exec 9>"$DEST.lock"
flock 9  # one build at a time on this machine; a second caller waits, then finds it built
if works; then exit 0; fi
echo "llama.cpp: building into $DEST (once per machine; ~15-30 min on 2 cores)"
# Built in place (the build tree's RPATHs are absolute, so it cannot be moved afterwards); the
# stamp is written last, so an interrupted build is redone, not used.
bash "$BUILD" "$DEST"
echo "$("$BIN/llama-server" --version 2>&1 | grep -m1 '^version'); cpu $(cpu)" > "$STAMP"
works || { echo "error: llama.cpp built into $DEST but its programs do not run" >&2; exit 1; }
echo "llama.cpp: built $(cat "$STAMP")"
