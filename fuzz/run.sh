#!/bin/sh
# Coverage-guided fuzzing on the stable toolchain (no nightly, no sanitizers: walcore forbids
# unsafe code, so AddressSanitizer would add little). Usage, from anywhere:
#
#     fuzz/run.sh <target> [seconds]      # e.g. fuzz/run.sh wal_page_header 300
#
# New inputs go to target/corpus/<target>/ (not committed); crashes to artifacts/<target>/.
# The committed seeds in corpus/<target>/ are read, never written.
set -eu
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh <target> [seconds]}
seconds=${2:-60}
host=$(rustc -vV | sed -n 's/^host: //p')

# The instrumentation cargo-fuzz adds, minus -Zsanitizer (nightly only). --target keeps these
# flags off build scripts and proc macros, which cannot link the coverage callbacks.
RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --target "$host" --target-dir target/stable --bin "$target"

mkdir -p "target/corpus/$target" "artifacts/$target"
exec "target/stable/$host/release/$target" \
    -max_total_time="$seconds" -artifact_prefix="artifacts/$target/" \
    "target/corpus/$target" "corpus/$target"
