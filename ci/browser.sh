#!/usr/bin/env bash
# Headless Chromium and its ChromeDriver for tests/test_browser.py (Debian's packages).
#
#   bash ci/browser.sh     install chromium and chromium-driver if missing (root with apt-get);
#                          idempotent; otherwise prints why and exits 0 (the tests marked
#                          `browser` then skip, saying what is missing)
set -uo pipefail

PACKAGES=(chromium chromium-driver)
LOG=${DMLKIT_BROWSER_LOG:-/tmp/dmlkit-browser-apt.log}

say() { echo "ci/browser.sh: $*" >&2; }

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
if (( EUID != 0 )) || ! command -v apt-get >/dev/null; then
    say "chromium or chromedriver missing and this is not root with apt-get: the browser tests will skip (install ${PACKAGES[*]})"
    exit 0
fi
say "installing ${PACKAGES[*]}"
apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 "${PACKAGES[@]}")
if ! "${apt[@]}" >"$LOG" 2>&1; then
    apt-get update -qq -o DPkg::Lock::Timeout=120 >>"$LOG" 2>&1
    if ! "${apt[@]}" >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        say "could not install ${PACKAGES[*]} (log: $LOG): the browser tests will skip"
        exit 0
    fi
fi
/usr/bin/chromium --version >&2 || true
