#!/usr/bin/env bash
# Installs the system tools some tests drive, if missing: Debian's chromium
# (/usr/bin/chromium, the monitor's browser tests), curl (the PanDA pilot calls the
# dispatcher through it) and redis-server (arq's broker in the peers benchmark, which
# starts a server of its own on a free port). Playwright itself comes from pyproject.toml; never run
# `playwright install` here: it downloads a browser build, which this network cannot reach.
# Safe to run again: a no-op when both are there. When it cannot install (not root, or
# no apt-get) it says so in one line and exits 0; the browser tests then skip with a
# reason, the pilot tests fail saying curl is missing, and the peers test skips arq.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "${EUID:-$(id -u)}" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools: ${missing[*]} missing and cannot install (needs root and apt-get)" >&2
    exit 0
fi

printf '==> %s\n' "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
