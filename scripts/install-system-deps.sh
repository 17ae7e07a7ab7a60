#!/usr/bin/env bash
# Installs (with apt, as root) the servers the test suite starts on loopback, when they are missing:
# PostgreSQL 15 (the store's conformance suite and the multi-node test), nginx (TLS termination in
# front of the gRPC proxy) and iproute2 (network namespaces for the multi-host test). Idempotent;
# prints what it installs. Not root and something missing: says so, and the affected tests fail
# with a message naming the package.
set -euo pipefail
missing=()
have_pg() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_pg || missing+=(postgresql-15)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: missing ${missing[*]}; install them with apt (needs root)" >&2
  exit 0
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
