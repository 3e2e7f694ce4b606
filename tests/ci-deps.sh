#!/usr/bin/env bash
# Installs what the tests need besides Rust: for tests/it/metrics.rs, the reference
# Prometheus text parser (Python `prometheus_client`) and `promtool` (Debian's
# `prometheus` package), which lints every scrape; for tests/it/netns.rs, `ip` (iproute2);
# for tests/it/tls.rs the `openssl` command line (PKCS#1 and SEC1 keys); for
# tests/it/conformance.rs kosoku (PyPI: the Autobahn TestSuite's cases driven by a native
# runner, Python >= 3.10); for tests/it/haproxy.rs a real HAProxy (Debian's `haproxy`) as
# the load balancer in front. Idempotent: safe to run on a machine that already has them.
set -euo pipefail

python3 -m pip install --quiet --disable-pip-version-check prometheus_client 'kosoku==0.1.0'

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# tests/it/netns.rs makes network namespaces with `ip`; it runs as root in CI.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# tests/it/haproxy.rs and tests/it/proxy_protocol.rs put a real HAProxy in front of wsbeat
# (mode http; mode tcp with send-proxy[-v2]).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -c 'import prometheus_client.parser, kosoku'
promtool --version >/dev/null
openssl version >/dev/null
ip -V >/dev/null
/usr/sbin/haproxy -v >/dev/null
