# Starts a local Trellis stack: the Proxmox VE API simulator, the control plane (embedded
# SQLite, serving the built UI) and one tendril agent connected to both. Sourced by
# demo.sh and e2e-browser.sh. Requires built binaries in $BIN.

PVE_TOKEN_ID='root@pam!trellis'
PVE_TOKEN_SECRET='5e1f5b3c-7d0a-4a43-9f3e-2b8c1d0e6a77'
STACK_PIDS=()

stack_cleanup() {
    for pid in "${STACK_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

wait_http() { # url, seconds
    local url=$1 limit=${2:-30} i=0
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt $((limit * 10)) ]; then echo "timed out waiting for $url" >&2; return 1; fi
        sleep 0.1
    done
}

# start_stack DIR HTTP_PORT PVE_PORT ADMIN_TOKEN [pve-sim flags...]
start_stack() {
    local dir=$1 http=$2 pve=$3 admin=$4
    shift 4
    mkdir -p "$dir"
    "$BIN/pve-sim" --listen "127.0.0.1:$pve" "$@" >"$dir/pve-sim.log" 2>&1 &
    STACK_PIDS+=($!)
    TRELLIS_ADMIN_TOKEN="$admin" "$BIN/trellis" serve --listen "127.0.0.1:$http" \
        --database-url "sqlite://$dir/trellis.db" --ui-dir "$PWD/ui/dist" >"$dir/trellis.log" 2>&1 &
    STACK_PIDS+=($!)
    wait_http "http://127.0.0.1:$http/readyz" 60
    wait_http "http://127.0.0.1:$pve/_sim/stats" 30

    local token_file="$dir/agent.token"
    if [ ! -s "$token_file" ]; then
        curl -fsS -X POST "http://127.0.0.1:$http/api/agents" \
            -H "authorization: Bearer $admin" -H 'content-type: application/json' \
            -d '{"name":"pve-lab-1","maxConcurrency":4}' |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$token_file"
    fi
    local tf_env=()
    if [ -f .tools/terraform.env ]; then
        while IFS= read -r line; do [ -n "$line" ] && tf_env+=("$line"); done <.tools/terraform.env
    fi
    env "${tf_env[@]}" \
        TENDRIL_SERVER_URL="ws://127.0.0.1:$http/api/agents/connect" \
        TENDRIL_TOKEN="$(cat "$token_file")" \
        TENDRIL_WORK_DIR="$dir/agent" \
        TENDRIL_HOSTNAME="pve-lab-1" \
        PROXMOX_URL="http://127.0.0.1:$pve" \
        PROXMOX_TOKEN_ID="$PVE_TOKEN_ID" \
        PROXMOX_TOKEN_SECRET="$PVE_TOKEN_SECRET" \
        "$BIN/tendril" >"$dir/tendril.log" 2>&1 &
    STACK_PIDS+=($!)
    local i=0
    until curl -fsS "http://127.0.0.1:$http/api/agents" -H "authorization: Bearer $admin" | grep -q '"online"'; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then echo "the agent did not come online; see $dir/tendril.log" >&2; return 1; fi
        sleep 0.1
    done
}
