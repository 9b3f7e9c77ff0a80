#!/usr/bin/env bash
# Builds the C engine harnesses with clang's libFuzzer and ASan and runs them.
#   fuzz/engines/run.sh --bounded   each harness for BOUNDED_SECONDS (default 25)
#   fuzz/engines/run.sh --long      each harness for LONG_SECONDS (default 600)
# Corpora live in .build-fuzz/engines/<harness>/ (not committed); crashes are written
# there as crash-* files, which libFuzzer reruns with: <binary> <crash-file>.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded) SECONDS_EACH="${BOUNDED_SECONDS:-25}" ;;
  --long) SECONDS_EACH="${LONG_SECONDS:-600}" ;;
  *) echo "usage: $0 --bounded|--long" >&2; exit 2 ;;
esac
CLANG="${CLANG:-$(command -v /opt/swift/usr/bin/clang || command -v clang)}"
OUT="$ROOT/.build-fuzz/engines"
mkdir -p "$OUT"
SRC="$ROOT/Sources/CAccelEngines"
INCLUDES=(-I "$SRC/include" -I "$ROOT/Sources/CAccelABI/include" -I "$ROOT/Sources/CAccelCrypto/include")
ENGINE_SOURCES=("$SRC"/*.c)
LIBS=(-lisal -ldeflate -lz -lzstd -llz4 -lcrypto)
status=0
for harness in stream_fuzz oneshot_fuzz; do
  bin="$OUT/$harness"
  "$CLANG" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    "${INCLUDES[@]}" "$ROOT/fuzz/engines/$harness.c" "${ENGINE_SOURCES[@]}" "${LIBS[@]}" -o "$bin" \
    2>"$OUT/$harness.build.log" || { cat "$OUT/$harness.build.log"; exit 1; }
  mkdir -p "$OUT/$harness.corpus"
  echo "== $harness: ${SECONDS_EACH}s"
  if ! (cd "$OUT" && "$bin" -max_total_time="$SECONDS_EACH" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "$OUT/$harness.corpus" 2>"$OUT/$harness.log"); then
    echo "!! $harness found a failure; log: $OUT/$harness.log"; tail -30 "$OUT/$harness.log"; status=1
  else
    grep -E "stat::number_of_executed_units|cov:" "$OUT/$harness.log" | tail -2
  fi
done
exit $status
