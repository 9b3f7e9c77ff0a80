#!/usr/bin/env bash
# Ring-level fuzz games (accelringfuzz, a SwiftPM executable of this package).
#   fuzz/ring/run.sh --bounded   each game for BOUNDED_SECONDS (default 15), one seed
#   fuzz/ring/run.sh --long      each game for LONG_SECONDS (default 600) in 60 s rounds, new seed each
# A finding prints its seed; replay it with:
#   .build/debug/accelringfuzz <game> --seed N --seconds S
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded) TOTAL="${BOUNDED_SECONDS:-15}"; ROUND="$TOTAL" ;;
  --long) TOTAL="${LONG_SECONDS:-600}"; ROUND=60 ;;
  *) echo "usage: $0 --bounded|--long" >&2; exit 2 ;;
esac
SWIFT="${SWIFT:-swift}"
BIN="${ACCELRINGFUZZ_BIN:-}"
if [[ -z "$BIN" ]]; then
  (cd "$ROOT" && "$SWIFT" build --product accelringfuzz >/dev/null)
  BIN="$ROOT/.build/debug/accelringfuzz"
fi
status=0
for game in hostile-driver hostile-device; do
  spent=0
  while (( spent < TOTAL )); do
    seed="${SEED:-$((RANDOM * 32768 + RANDOM))}"
    echo "== $game seed=$seed ${ROUND}s"
    rc=0
    "$BIN" "$game" --seed "$seed" --seconds "$ROUND" || rc=$?
    if (( rc != 0 )); then
      echo "!! $game failed (exit $rc) with seed $seed: replay with $BIN $game --seed $seed --seconds $ROUND"
      status=1
      break
    fi
    spent=$((spent + ROUND))
  done
done
exit $status
