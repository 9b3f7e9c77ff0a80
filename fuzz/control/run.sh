#!/usr/bin/env bash
# Runs the control-socket fuzzer (control_fuzz.py) against both targets: the device
# daemon's socket and the local lane's PATH.ctl (with gRPC calls on the lane's socket).
#   fuzz/control/run.sh --bounded   BOUNDED_SECONDS per target (default 20); exit 1 on findings
#   fuzz/control/run.sh --long      LONG_SECONDS per target (default 600); exit 1 on findings
# ACCELGATE_BIN picks the binary (default .build/debug/accelgate); SEED fixes the seed
# (printed either way, so a run can be repeated). Reproducers go to fuzz/control/findings/;
# replay one with: python3 fuzz/control/control_fuzz.py --replay FILE. CONTROL_FUZZ_VERBOSE=1 logs each batch.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded) SECONDS_EACH="${BOUNDED_SECONDS:-20}" ;;
  --long) SECONDS_EACH="${LONG_SECONDS:-600}" ;;
  *) echo "usage: $0 --bounded|--long" >&2; exit 2 ;;
esac
BIN="${ACCELGATE_BIN:-$ROOT/.build/debug/accelgate}"
[ -x "$BIN" ] || { echo "$BIN is missing or not executable: build it (swift build) or set ACCELGATE_BIN" >&2; exit 2; }
SEED="${SEED:-$(python3 -c 'import random; print(random.SystemRandom().randrange(1 << 32))')}"
echo "== control_fuzz $MODE: seed $SEED (SEED=$SEED $0 $MODE repeats it), ${SECONDS_EACH}s per target, $BIN"
START=$(date +%s)
set +e
python3 "$HERE/control_fuzz.py" --target both --seconds "$SECONDS_EACH" --seed "$SEED" --binary "$BIN" \
  $([ -z "${CONTROL_FUZZ_VERBOSE:-}" ] && echo --quiet)
RC=$?
set -e
echo "== control_fuzz $MODE: seed $SEED, $(( $(date +%s) - START ))s, exit $RC"
exit $RC
