#!/usr/bin/env bash
# bubblewrap for the eval sandbox (codeshell/eval/sandbox.py): `codeshell eval run/score` run
# generated programs inside it. Required by CI (.ci/setup-toolchains.sh), so kept apart from
# install-eval.sh's optional language toolchains. Idempotent and quiet.
set -euo pipefail
if ! command -v bwrap >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
fi
command -v bwrap >/dev/null 2>&1 || { echo "install-sandbox: bwrap is still missing" >&2; exit 1; }
