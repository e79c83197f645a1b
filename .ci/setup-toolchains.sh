#!/usr/bin/env bash
# Runs every .ci/install-*.sh in the folder given (default: this one). Each installs system
# packages an area uses and is idempotent.
#
# Two kinds, by name:
# - REQUIRED below: toolchains CI relies on (the kernels' compiler, chromium for the web UI
#   test, bubblewrap for the eval sandbox, the llama.cpp build the GGUF tests run). If one
#   fails, or is missing, this script fails and so does the CI run. install-eval.sh is one:
#   it fails only for bubblewrap, and itself only warns about MultiPL-E's optional toolchains
#   (Java, R, Racket...), whose tests then skip and say how to install them.
# - Any other install-*.sh: an optional toolchain. A failure is a warning; its tests skip.
# Add a script CI must have to REQUIRED; an optional one needs no change here.
set -uo pipefail
dir="${1:-$(dirname "$0")}"
REQUIRED=(install-kernels.sh install-serve.sh install-eval.sh install-llamacpp.sh)

failed=()
for name in "${REQUIRED[@]}"; do
    [ -e "$dir/$name" ] || failed+=("$name (missing)")
done
for s in "$dir"/install-*.sh; do
    [ -e "$s" ] || continue
    name=$(basename "$s")
    echo "== $name"
    if bash "$s"; then
        continue
    fi
    if [[ " ${REQUIRED[*]} " == *" $name "* ]]; then
        echo "error: $name failed, and CI requires what it installs" >&2
        failed+=("$name")
    else
        echo "warning: $name failed (optional toolchain); tests needing it will skip" >&2
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "error: required install scripts failed: ${failed[*]}" >&2
    exit 1
fi
