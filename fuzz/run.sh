#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time from the committed seed corpus
# (fuzz/corpus/<target>/); CI calls it from .ci/run. A crash fails the script, and
# libFuzzer leaves the input in fuzz/artifacts/<target>/ (add it to the corpus and to a
# unit test once fixed). Where fuzz/seeds/<target>.py exists, it regenerates that
# target's seed corpus.
#
#   bash fuzz/run.sh            # each target for FUZZ_SECONDS (default 30)
#   FUZZ_SECONDS=600 bash fuzz/run.sh handshake
#
# Toolchain: only stable Rust is installed here, and cargo-fuzz defaults to nightly
# features. Found on rustc 1.95 stable with cargo-fuzz 0.13.2:
# - `cargo fuzz build` (AddressSanitizer, the default) fails: it passes
#   `-Zsanitizer=address`, which stable rustc refuses ("the option `Z` is only accepted on
#   the nightly compiler"), with or without RUSTC_BOOTSTRAP=1 in the environment.
# - `-s none` (`--sanitizer none`) works on stable as it is: the coverage instrumentation
#   (`-Cpasses=sancov-module`, `-Cllvm-args=-sanitizer-coverage-*`), `--cfg fuzzing` and
#   `-Cdebug-assertions` are all stable flags; libfuzzer-sys compiles libFuzzer with the
#   system C++ compiler (g++). No RUSTC_BOOTSTRAP needed.
# Losing ASan costs little here: wsbeat forbids `unsafe`, so what fuzzing can find is a
# panic (an unwrap, an index out of range, an overflow: the fuzz build has debug
# assertions on), which libFuzzer catches without a sanitizer.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH="${FUZZ_SECONDS:-30}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(config handshake frame proxy_protocol heartbeat_inflate)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

for target in "${TARGETS[@]}"; do
    # New inputs go to a scratch corpus (the first directory), never into the committed
    # seeds (the second, read only).
    scratch="$(mktemp -d)"
    log="$scratch.log"
    echo "fuzz: $target for ${SECONDS_EACH}s"
    status=0
    cargo fuzz run -s none "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$SECONDS_EACH" -max_len=70000 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^#[0-9]+[[:space:]]+DONE|^Done' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz: $target FAILED (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    rm -rf "$scratch" "$log"
done
echo "fuzz: ${#TARGETS[@]} targets, ${SECONDS_EACH}s each, no crash"
