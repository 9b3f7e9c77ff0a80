#!/usr/bin/env bash
# Public gRPC API fuzzer (api_fuzz.py) against both targets: `embedded` (accelgate serve
# with its embedded device) and `daemon` (accelgate device + a gateway attached to it).
#   fuzz/api/run.sh --bounded   each target for BOUNDED_SECONDS (default 45): under 2 minutes in all
#   fuzz/api/run.sh --long      each target for LONG_SECONDS (default 600)
# ACCELGATE_BIN chooses the binary (default .build/debug/accelgate; it is not built here).
# SEED fixes the seed (default: random, printed). Extra arguments go to api_fuzz.py.
# Exit status 1 on findings; reproducers are written to fuzz/api/findings/ and replay with
#   python3 fuzz/api/api_fuzz.py --replay fuzz/api/findings/<file>.jsonl [--repeat N]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODE="${1:---bounded}"
case "$MODE" in
  --bounded) SECONDS_EACH="${BOUNDED_SECONDS:-45}" ;;
  --long) SECONDS_EACH="${LONG_SECONDS:-600}" ;;
  *) echo "usage: $0 --bounded|--long [api_fuzz.py options]" >&2; exit 2 ;;
esac
shift || true
BIN="${ACCELGATE_BIN:-$ROOT/.build/debug/accelgate}"
if [[ ! -x "$BIN" ]]; then
  echo "$BIN is missing or not executable: build it (swift build --product accelgate) or set ACCELGATE_BIN" >&2
  exit 2
fi
SEED="${SEED:-$(python3 -c 'import random; print(random.SystemRandom().randrange(1 << 32))')}"
echo "== fuzz/api $MODE: seed $SEED, ${SECONDS_EACH}s per target, binary $BIN"
rc=0
python3 "$HERE/api_fuzz.py" --target both --seconds "$SECONDS_EACH" --seed "$SEED" --binary "$BIN" "$@" || rc=$?
if (( rc != 0 )); then
  echo "!! fuzz/api found something (seed $SEED); rerun with SEED=$SEED $0 $MODE," \
       "replay a reproducer with python3 fuzz/api/api_fuzz.py --replay FILE"
fi
exit $rc
