#!/usr/bin/env bash
# Installs what tests/browser (run by tests/it/browser.rs) needs besides Rust and Node:
# Debian's Chromium (playwright-core drives it; nothing downloads a browser build) and the
# locked npm packages (playwright-core, ws, typescript for the type checks). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

npm ci --no-audit --no-fund --loglevel=error

# (Debian's wrapper script prints a harmless shell warning on some machines.)
chromium --version >/dev/null 2>&1
node -e 'require.resolve("playwright-core"); require.resolve("ws"); require.resolve("typescript")'
