#!/usr/bin/env bash
# API contract test: runs schemathesis (PyPI, in .tools/st-venv) against a live trellis
# started from target/debug on a free port with its own SQLite database, over every
# operation of the OpenAPI document the server serves, with a bounded number of examples.
# It fails on any 5xx, any response that does not conform to the documented schema
# (every error, whatever its status, is documented as `{error: {code, message}}`), an
# undocumented status code or a wrong content type.
#
# Real ids (an agent, a template, a node, a command) are created first and handed to
# schemathesis per path, so operations on `/{id}` reach their logic, not only 404s.
# Usage: scripts/api-contract.sh [--max-examples N]   (default 25)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/debug}
examples=25
while [ $# -gt 0 ]; do
    case "$1" in
        --max-examples) examples=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

ST_VERSION=4.32.5
venv=$ROOT/.tools/st-venv
if [ ! -x "$venv/bin/schemathesis" ] || ! "$venv/bin/schemathesis" --version | grep -q "$ST_VERSION"; then
    echo "== installing schemathesis $ST_VERSION into .tools/st-venv"
    mkdir -p "$ROOT/.tools"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR=$(mktemp -d /tmp/trellis-contract.XXXXXX)
PORT=$(free_port)
TOKEN="contract-admin-token-$RANDOM$RANDOM"
URL=http://127.0.0.1:$PORT
# Schemathesis fuzzes sign-in with wrong tokens: at the default 10 failures a minute the
# address would be limited and every operation would answer 429 (the limiter has its own
# tests), so the contract run allows many.
TRELLIS_ADMIN_TOKEN=$TOKEN TRELLIS_MAX_AUTH_FAILURES=1000000 RUST_LOG=warn "$BIN/trellis" serve --listen "127.0.0.1:$PORT" \
    --database-url "sqlite://$DIR/trellis.db" >"$DIR/trellis.log" 2>&1 &
PID=$!
cleanup() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -fs "$URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

api() { curl -fsS -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' "$@"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
agent=$(api -X POST "$URL/api/agents" -d '{"name":"contract-agent"}' | json "['agent']['id']")
template=$(api "$URL/api/templates" | json "['items'][0]['id']")
new_node() { api -X POST "$URL/api/nodes" -d "{\"name\":\"$1\",\"templateId\":\"$template\"}" | json "['node']['id']"; }
node=$(new_node contract-node)
# Operations that remove their target get their own, so the others keep theirs.
forget_node=$(new_node contract-forget)
delete_node=$(new_node contract-delete)
revoke_agent=$(api -X POST "$URL/api/agents" -d '{"name":"contract-revoke"}' | json "['agent']['id']")
command=$(api -X POST "$URL/api/commands" -d "{\"agentId\":\"$agent\",\"type\":\"ping\",\"params\":{}}" | json "['commandId']")
api -X POST "$URL/api/commands/$command/cancel" >/dev/null

cat >"$DIR/schemathesis.toml" <<TOML
[[operations]]
include-path-regex = '^/api/nodes/\{id\}/forget$'
parameters = { "id" = "$forget_node" }

[[operations]]
include-path-regex = '^/api/nodes/\{id\}$'
include-method = "DELETE"
parameters = { "id" = "$delete_node" }

[[operations]]
include-path-regex = '^/api/agents/\{id\}$'
include-method = "DELETE"
parameters = { "id" = "$revoke_agent" }

[[operations]]
include-path-regex = "^/api/agents/"
parameters = { "id" = "$agent" }

[[operations]]
include-path-regex = "^/api/templates/"
parameters = { "id" = "$template" }

[[operations]]
include-path-regex = "^/api/nodes/"
parameters = { "id" = "$node" }

[[operations]]
include-path-regex = "^/api/commands/"
parameters = { "id" = "$command" }
TOML

# Every operation, the SSE stream included: the fixture command is terminal, so its
# stream replays the backlog and ends.
status=0
"$venv/bin/schemathesis" --config-file "$DIR/schemathesis.toml" run "$URL/api/openapi.json" \
    -H "Authorization: Bearer $TOKEN" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$examples" --seed 1 --workers 1 \
    --request-timeout 70 || status=$?
if grep -q "internal error" "$DIR/trellis.log"; then
    echo "trellis logged internal errors:" >&2
    grep "internal error" "$DIR/trellis.log" | head -20 >&2
    status=1
fi
exit $status
