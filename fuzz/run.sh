#!/usr/bin/env bash
# Every fuzzer of the repository, one after the other (fuzz/README.md).
#   fuzz/run.sh --bounded   the CI run inside `make test`: about 4 minutes in all
#   fuzz/run.sh --long      `make fuzz`: a long campaign (LONG_SECONDS per fuzzer, default 600)
# Each fuzzer's own run.sh takes the same flag; a failure is reported with how to
# replay it, and the others still run. Exit status 1 if any fuzzer found something.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded | --long) ;;
  *) echo "usage: $0 --bounded|--long" >&2; exit 2 ;;
esac
# Bounded seconds per fuzzer (per harness or target; the api fuzzer runs each
# target on both edges): together at most 5 minutes with their builds on the CI machine.
declare -A BOUNDED=([engines]=12 [descriptor]=12 [ring]=10 [control]=15 [api]=20)
export ACCELGATE_BIN="${ACCELGATE_BIN:-$ROOT/.build/debug/accelgate}"
export ACCELRINGFUZZ_BIN="${ACCELRINGFUZZ_BIN:-$ROOT/.build/debug/accelringfuzz}"
failed=()
start=$(date +%s)
for fuzzer in engines descriptor ring control api; do
  script="$ROOT/fuzz/$fuzzer/run.sh"
  [[ -x "$script" ]] || continue
  echo "==== fuzz/$fuzzer ($MODE)"
  t0=$(date +%s)
  if [[ "$MODE" == --bounded ]]; then
    BOUNDED_SECONDS="${BOUNDED[$fuzzer]}" "$script" --bounded || failed+=("$fuzzer")
  else
    "$script" --long || failed+=("$fuzzer")
  fi
  echo "==== fuzz/$fuzzer took $(($(date +%s) - t0)) s"
done
echo "==== all fuzzers took $(($(date +%s) - start)) s"
if ((${#failed[@]})); then
  echo "!! findings in: ${failed[*]}"
  exit 1
fi
echo "no findings"
