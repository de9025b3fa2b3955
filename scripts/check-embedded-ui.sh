#!/usr/bin/env bash
# Builds trellis with the UI embedded (the release form) and checks that it serves the UI
# from a directory with no ui/dist beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f ui/dist/index.html ] || (cd ui && npm run --silent build)
# --workspace keeps feature unification the same as the main build: only trellis rebuilds
cargo build --workspace --bins --features trellis/embed-ui --locked
bin=$PWD/target/debug/trellis
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# `exec`: $! is trellis itself, so the trap below stops it (not just a subshell).
(cd "$tmp" && TRELLIS_ADMIN_TOKEN=embedded-check-token-123 exec "$bin" serve --listen "127.0.0.1:$port" \
    --database-url "sqlite://$tmp/t.db" >"$tmp/log" 2>&1) &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break; sleep 0.1; done
page=$(curl -fsS "http://127.0.0.1:$port/hypervisors")
grep -q '<div id="root">' <<<"$page" || { echo "embedded UI not served: $page" >&2; exit 1; }
asset=$(grep -o 'assets/[^"]*\.js' <<<"$page" | head -1)
curl -fsS -o /dev/null "http://127.0.0.1:$port/$asset"
echo "embedded UI served (index.html and $asset)"
