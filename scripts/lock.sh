#!/usr/bin/env bash
# Regenerates requirements.lock: the runtime dependencies of pyproject.toml, pinned with their hashes, which
# the Dockerfile installs with `pip --require-hashes` so an image build is reproducible. Uses uv (the `lock`
# dependency group, installed into the venv on first use). tests/unit/test_packaging.py checks the lock
# against pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/uv" ] || "$VENV/bin/pip" install -q --disable-pip-version-check --group lock
# The machine's CA bundle, where a proxy re-signs TLS.
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
"$VENV/bin/uv" pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
  --python-platform linux --custom-compile-command "scripts/lock.sh" -o requirements.lock
