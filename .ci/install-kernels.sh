#!/usr/bin/env bash
# codeshell.kernels builds its C++ extension on first use: it needs a C++ compiler and ninja.
# Idempotent and quiet. Without them the kernels fall back to torch; CI requires them
# (.ci/setup-toolchains.sh), and its tests run with CODESHELL_REQUIRE_NATIVE=1.
set -euo pipefail
need=()
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v g++ >/dev/null 2>&1 || { echo "install-kernels: g++ is still missing" >&2; exit 1; }
