#!/usr/bin/env bash
# Regenerates the committed Swift code and the descriptor set from proto/.
# Uses Debian's protoc and the plugins built from the pinned packages (the
# SwiftPM build plugin compiles protoc from source, which is far too slow).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "protoc missing: run scripts/install-deps.sh" >&2; exit 1; }
swift build -q --product protoc-gen-swift
swift build -q --product protoc-gen-grpc-swift-2
bin=$(swift build --show-bin-path)
out=Sources/AccelProto/Generated
rm -rf "$out" && mkdir -p "$out"
protoc -I proto \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --plugin=protoc-gen-grpc-swift="$bin/protoc-gen-grpc-swift-2" \
  --swift_out="$out" --swift_opt=Visibility=Public,UseAccessLevelOnImports=true \
  --grpc-swift_out="$out" --grpc-swift_opt=Visibility=Public,UseAccessLevelOnImports=true \
  accelgate/v1/accelerator.proto grpc/health/v1/health.proto
mkdir -p proto/descriptors
protoc -I proto --include_imports --descriptor_set_out=proto/descriptors/accelgate.v1.pb \
  accelgate/v1/accelerator.proto grpc/health/v1/health.proto
