#!/usr/bin/env bash
# Builds the DescriptorRules harness with swiftc -sanitize=fuzzer,address and runs it.
#   fuzz/descriptor/run.sh --bounded   BOUNDED_SECONDS (default 20)
#   fuzz/descriptor/run.sh --long      LONG_SECONDS (default 600)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded) SECONDS_EACH="${BOUNDED_SECONDS:-20}" ;;
  --long) SECONDS_EACH="${LONG_SECONDS:-600}" ;;
  *) echo "usage: $0 --bounded|--long" >&2; exit 2 ;;
esac
OUT="$ROOT/.build-fuzz/descriptor"
mkdir -p "$OUT/corpus" "$OUT/modules/CAccelABI"
# swiftc needs a module map for the ABI header (SwiftPM writes its own in .build).
cat >"$OUT/modules/CAccelABI/module.modulemap" <<MAP
module CAccelABI { header "$ROOT/Sources/CAccelABI/include/accel_abi.h" export * }
MAP
ABI="$ROOT/Sources/AccelABI"
swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name AccelABIFuzz \
  -I "$OUT/modules" "$ROOT/fuzz/descriptor/DescriptorRulesFuzz.swift" \
  "$ABI/DescriptorRules.swift" "$ABI/RegionLayout.swift" "$ABI/DeviceStatus.swift" \
  -o "$OUT/descriptor_fuzz" 2>"$OUT/build.log" || { cat "$OUT/build.log"; exit 1; }
echo "== descriptor_fuzz: ${SECONDS_EACH}s"
if ! (cd "$OUT" && ./descriptor_fuzz -max_total_time="$SECONDS_EACH" -max_len=256 -timeout=10 \
    -print_final_stats=1 corpus 2>"$OUT/run.log"); then
  echo "!! descriptor_fuzz found a failure; log: $OUT/run.log"; grep -v "^    #" "$OUT/run.log" | tail -20; exit 1
fi
grep -E "DONE|stat::number_of_executed_units" "$OUT/run.log" | tail -2
