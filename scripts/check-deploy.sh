#!/usr/bin/env bash
# make check-deploy: lints deploy/Dockerfile (hadolint), validates the Kubernetes
# manifests (kubernetes-validate --strict; custom resources against the CRDs in
# deploy/schemas/crds), the compose file (compose-spec JSON schema) and the Grafana
# dashboard, and that Package.swift pins the whole resolved graph with exact:. The
# work is in scripts/check_deploy.py (--help); extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/check_deploy.py "$@"
