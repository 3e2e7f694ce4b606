#!/usr/bin/env bash
# Installs what tests/metrics.rs needs besides Rust: the reference Prometheus text parser
# (Python `prometheus_client`) and `promtool` (Debian's `prometheus` package), which
# lints every scrape. Idempotent: safe to run on a machine that already has both.
set -euo pipefail

python3 -m pip install --quiet --disable-pip-version-check prometheus_client

if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

python3 -c 'import prometheus_client.parser'
promtool --version >/dev/null
