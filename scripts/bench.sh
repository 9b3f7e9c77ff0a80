#!/usr/bin/env bash
# make bench: measures engine, rings and gRPC layers in one run and writes
# .build-bench/*.json plus the tables in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${BENCH_PORT:-50071}
seconds=${BENCH_SECONDS:-3}
mkdir -p .build-bench
.build/release/accelgate serve --port "$port" --log-level warning > .build-bench/server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "listening" .build-bench/server.log && break; sleep 0.1; done
.build/release/accelbench --target "127.0.0.1:$port" --seconds "$seconds" --json .build-bench/compress.json
python3 scripts/render_bench.py .build-bench/compress.json docs/BENCHMARKS.md
echo "wrote docs/BENCHMARKS.md"
