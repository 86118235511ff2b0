#!/usr/bin/env bash
# Installs what the web console's browser test (tests/console.rs) drives: Debian's `chromium`
# and `chromium-driver` (headless Chromium through chromedriver), only when either is missing.
# Logs go to stderr; nothing to stdout.
#
#   bash scripts/install-browser.sh
#
# The test finds them at /usr/bin (or at $CHROMIUM_BIN and $CHROMEDRIVER_BIN), and fails with a
# message naming this script when they are not there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "browser: $(chromium --version 2>/dev/null) / $(chromedriver --version 2>/dev/null)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: chromium and chromedriver are needed by the console's browser test: install them (Debian: chromium, chromium-driver)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing chromium and chromium-driver (Debian packages) for the console's browser test" >&2
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq chromium chromium-driver >&2
echo "browser: $(chromium --version 2>/dev/null) / $(chromedriver --version 2>/dev/null)" >&2
