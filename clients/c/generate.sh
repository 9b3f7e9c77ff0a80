#!/usr/bin/env bash
# Regenerates the committed protobuf-c code in clients/c/gen from proto/ with
# Debian's protoc-c (protobuf-c-compiler 1.4). Usage: clients/c/generate.sh [OUTDIR]
# scripts/check-generated.sh fails if the result differs from what is committed.
#
# protoc-c 1.4 refuses proto3 `optional` fields ("hasn't been updated to support
# optional fields in proto3"). A proto3 optional field *is* a one-field oneof
# (protoc calls it a synthetic oneof named `_<field>`), with the same wire format,
# so the generator gets a copy of the proto in which each
#     optional int32 level = 2;
# is written as
#     oneof _level { int32 level = 2; }
# In C the field is then `level` with `_level_case` telling whether it is set.
# Nothing else changes (same package, names and numbers).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/gen}
command -v protoc-c >/dev/null || { echo "protoc-c missing: run scripts/install-deps.sh test" >&2; exit 1; }
proto=accelgate/v1/accelerator.proto   # it imports nothing
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/$(dirname "$proto")"
sed -E 's/^([[:space:]]*)optional[[:space:]]+([A-Za-z0-9_.]+)[[:space:]]+([A-Za-z0-9_]+)[[:space:]]*=[[:space:]]*([0-9]+)[[:space:]]*;/\1oneof _\3 { \2 \3 = \4; }/' \
  "$root/proto/$proto" > "$tmp/$proto"
if grep -nE '^[[:space:]]*optional[[:space:]]' "$tmp/$proto" >&2; then
  echo "generate.sh: an optional field above was not rewritten (keep each on one line)" >&2
  exit 1
fi
rm -rf "$out/accelgate" && mkdir -p "$out"
(cd "$tmp" && protoc-c -I . --c_out="$out" "$proto")
