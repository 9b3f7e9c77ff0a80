#!/usr/bin/env bash
# Fails if regenerating the protobuf code changes any committed file
# (in the spirit of grpc-swift's dev/check-generated-code.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/generate-proto.sh
if ! git diff --exit-code --stat -- Sources/AccelMessages/Generated Sources/AccelProto/Generated proto/descriptors; then
  echo "generated code is stale: run scripts/generate-proto.sh and commit the result" >&2
  exit 1
fi
untracked=$(git ls-files --others --exclude-standard -- Sources/AccelMessages/Generated Sources/AccelProto/Generated proto/descriptors)
if [ -n "$untracked" ]; then echo "uncommitted generated files: $untracked" >&2; exit 1; fi
echo "generated code is up to date"

# The C client's protobuf-c code (clients/c/gen), from the same proto/.
clients/c/generate.sh
if ! git diff --exit-code --stat -- clients/c/gen; then
  echo "generated C code is stale: run clients/c/generate.sh and commit the result" >&2
  exit 1
fi
untracked=$(git ls-files --others --exclude-standard -- clients/c/gen)
if [ -n "$untracked" ]; then echo "uncommitted generated files: $untracked" >&2; exit 1; fi
echo "generated C code is up to date"
