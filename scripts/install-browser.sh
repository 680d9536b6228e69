#!/usr/bin/env bash
# Installs Debian's chromium (/usr/bin/chromium) for the browser tests, if missing.
# Playwright itself comes from pyproject.toml; never run `playwright install` here:
# it downloads a browser build, which this network cannot reach.
# Safe to run again: a no-op when chromium is already there. When it cannot
# install (not root, or no apt-get) it says so in one line and exits 0, and the
# browser tests skip with a reason.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "${EUID:-$(id -u)}" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: $CHROMIUM missing and cannot install it (needs root and apt-get); browser tests will skip" >&2
    exit 0
fi

printf '==> %s\n' "installing chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
"$CHROMIUM" --version >&2 2>/dev/null
