#!/usr/bin/env bash
# Installs what tests/metrics.rs and tests/conformance.rs need besides Rust: the reference Prometheus text parser
# (Python `prometheus_client`) and `promtool` (Debian's `prometheus` package), which
# lints every scrape; and kosoku (PyPI: the Autobahn TestSuite's cases driven by a native
# runner, Python >= 3.10) for tests/conformance.rs. Idempotent: safe to run on a machine
# that already has them.
set -euo pipefail

python3 -m pip install --quiet --disable-pip-version-check prometheus_client 'kosoku==0.1.0'

if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

python3 -c 'import prometheus_client.parser, kosoku'
promtool --version >/dev/null
