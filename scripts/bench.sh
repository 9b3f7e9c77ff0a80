#!/usr/bin/env bash
# make bench: every benchmark in one run. Writes .build-bench/*.json and the
# generated tables in docs/BENCHMARKS.md. Servers listen on loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${BENCH_PORT:-50071}
seconds=${BENCH_SECONDS:-3}
out=.build-bench
mkdir -p "$out"
servers=()
cleanup() { for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_server() { # log-file, then accelgate serve flags
  local log=$1; shift
  .build/release/accelgate serve --port "$port" --log-level warning "$@" > "$log" 2>&1 &
  servers+=($!)
  for _ in $(seq 1 100); do grep -q "listening" "$log" && return 0; sleep 0.1; done
  echo "server did not start: $log" >&2; cat "$log" >&2; exit 1
}
stop_servers() { cleanup; servers=(); }

# 1. Compression layers: engine, rings, gRPC.
start_server "$out/server-layers.log"
.build/release/accelbench layers --target "127.0.0.1:$port" --seconds "$seconds" --json "$out/compress.json"
# 1b. Crypto: AES-256-GCM and SHA-256, raw OpenSSL engine vs the service.
.build/release/accelbench crypto --target "127.0.0.1:$port" --seconds "$seconds" --json "$out/crypto.json"
# 1c. A mixed load from the command-line load generator, closed loop, then open loop at a fixed rate.
mix=compress:3,decompress:1,encrypt:1,decrypt:1,digest:1
.build/release/accelctl bench -t "127.0.0.1:$port" -c 16 --duration "$seconds" --mix "$mix" --sizes 4K,64K,1M \
  --json "$out/mix-closed.json" --plot docs/bench-mix-closed.svg
.build/release/accelctl bench -t "127.0.0.1:$port" -c 16 --duration "$seconds" --mix "$mix" --sizes 4K,64K,1M \
  --rate 400 --json "$out/mix-open.json" --plot docs/bench-mix-open.svg
stop_servers

# 1d. Zero-copy lanes: network lane (copies / pooled) vs the local lane (shared memory).
python3 scripts/bench_lanes.py "$out/lanes.json"

# 2. Tenants: fairness shares and isolation, fair vs fifo, on a device capped
#    at 50 MB/s per engine so the device, not gRPC, is the bottleneck.
hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
cat > "$out/tenants.yaml" <<YAML
tenants:
  - { id: w1, weight: 1, api_key_sha256: [$(hash bench-w1)] }
  - { id: w2, weight: 2, api_key_sha256: [$(hash bench-w2)] }
  - { id: w4, weight: 4, api_key_sha256: [$(hash bench-w4)] }
  - { id: light, weight: 1, api_key_sha256: [$(hash bench-light)] }
  - { id: heavy0, weight: 1, api_key_sha256: [$(hash bench-heavy0)] }
  - { id: heavy1, weight: 1, api_key_sha256: [$(hash bench-heavy1)] }
YAML
for sched in fair fifo; do
  start_server "$out/server-$sched.log" --tenants "$out/tenants.yaml" --scheduler "$sched" --engine-cap-mbps 50
  .build/release/accelbench fairness --target "127.0.0.1:$port" --label "$sched" \
    --tenant w1=bench-w1=1 --tenant w2=bench-w2=2 --tenant w4=bench-w4=4 --json "$out/fairness-$sched.json"
  .build/release/accelbench isolation --target "127.0.0.1:$port" --label "$sched" \
    --light-key bench-light --heavy-key bench-heavy0 --heavy-key bench-heavy1 --json "$out/isolation-$sched.json"
  stop_servers
  .build/release/accelbench isolation-rings --scheduler "$sched" --json "$out/isolation-rings-$sched.json"
done

# 2b. Streams: gateway peak RSS by stream length, and interleaving with a stream.
python3 scripts/bench_streams.py "$out/streams.json"

# 3. Doorbells at the driver layer (no gRPC): adaptive vs an eventfd per job,
#    then the syscalls each costs per job, counted by strace -f -c.
.build/release/accelbench doorbell --seconds "$seconds" --json "$out/doorbell.json"
python3 scripts/count_syscalls.py .build/release/accelbench "$out/doorbell-syscalls.json" 200000

# 4. The edge (issue 18): AccelGate on gRPC's C core against the inline
#    libgrpc++ peer, both driven by the C-core load generator, A/B alternating.
python3 scripts/bench_edge.py "$out/edge.json"

python3 scripts/render_bench.py "$out" docs/BENCHMARKS.md
echo "wrote docs/BENCHMARKS.md"
