#!/usr/bin/env bash
# Installs what the tests need besides Rust: for tests/metrics.rs, the reference
# Prometheus text parser (Python `prometheus_client`) and `promtool` (Debian's
# `prometheus` package), which lints every scrape; for tests/netns.rs, `ip` (iproute2).
# Idempotent: safe to run on a machine that already has them.
set -euo pipefail

python3 -m pip install --quiet --disable-pip-version-check prometheus_client

if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

python3 -c 'import prometheus_client.parser'
promtool --version >/dev/null

# tests/netns.rs makes network namespaces with `ip` (iproute2); it runs as root in CI.
if ! command -v ip >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
ip -V >/dev/null
