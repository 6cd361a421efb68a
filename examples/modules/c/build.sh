#!/usr/bin/env bash
# Builds the C guest modules into examples/modules/c/out/*.wasm with Debian's clang for
# wasm32-wasi (packages clang, lld, wasi-libc, libclang-rt-14-dev-wasm32). The tests and
# CI run this; without clang it says so and exits 0, and the tests that need the C
# guests skip with the same message.
set -euo pipefail
cd "$(dirname "$0")"

CLANG="${CLANG:-clang}"
SYSROOT="${WASI_SYSROOT:-/usr}"
if ! command -v "$CLANG" >/dev/null 2>&1; then
  echo "build.sh: $CLANG not found; skipping C guests (apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32)" >&2
  exit 0
fi
if [ ! -e "$SYSROOT/lib/wasm32-wasi/libc.a" ]; then
  echo "build.sh: wasi-libc not found under $SYSROOT; skipping C guests (apt-get install wasi-libc)" >&2
  exit 0
fi

mkdir -p out
# A reactor: no main; the host calls _initialize, then init, on_tick, on_message.
flags=(--target=wasm32-wasi --sysroot="$SYSROOT" -O2 -Wall -Werror -mexec-model=reactor
       -Wl,--strip-all)
"$CLANG" "${flags[@]}" -o out/sensor.wasm sensor.c
"$CLANG" "${flags[@]}" -o out/aggregator.wasm aggregator.c
for kind in spin membomb recursion logspam flood; do
  upper=$(echo "$kind" | tr a-z A-Z)
  "$CLANG" "${flags[@]}" -DHOSTILE="$upper" -o "out/hostile_$kind.wasm" hostile.c
done
echo "build.sh: built $(ls out/*.wasm | wc -l) C guests in $(pwd)/out"
