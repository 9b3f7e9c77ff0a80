#!/usr/bin/env bash
# Installs whatever the build, the server and the tests need and is missing.
# Idempotent and quiet when everything is present.
#   scripts/install-deps.sh run    -> packages to build and run the server
#   scripts/install-deps.sh test   -> plus the interop test peers (pip)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}

# Engines: ISA-L, libdeflate, zlib, zstd, lz4, OpenSSL. Codegen: protoc.
# The C-core network edge (Sources/CAccelGRPC): gRPC's C core.
debs=(libisal-dev libdeflate-dev zlib1g-dev libzstd-dev liblz4-dev libssl-dev protobuf-compiler pkg-config libgrpc-dev)
# make test scrapes /metrics with a real Prometheus server and promtool;
# make bench counts syscalls per job with strace.
# make test also builds the C client (gRPC C core, protobuf-c).
if [ "$mode" = "test" ] || [ "$mode" = "bench" ]; then
  debs+=(prometheus libprotobuf-c-dev protobuf-c-compiler)
fi
# make bench also builds the inline libgrpc++ peer (Benchmarks/peer).
if [ "$mode" = "bench" ]; then debs+=(strace libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev); fi
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v swift >/dev/null || { echo "swift is not on PATH (expected /opt/swift/usr/bin)" >&2; exit 1; }

if [ "$mode" = "test" ] || [ "$mode" = "bench" ]; then
  have_peers() {
    python3 - <<'PY' 2>/dev/null || return 1
import grpc, grpc_tools, grpc_reflection, pytest, cryptography, cryptography_vectors, google.protobuf, zstandard, lz4.frame, jsonschema, kubernetes_validate  # noqa: F401
PY
    command -v hadolint >/dev/null && command -v kubernetes-validate >/dev/null
  }
  if ! have_peers; then
    echo "installing Python test peers"
    python3 -m pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
  fi
fi
