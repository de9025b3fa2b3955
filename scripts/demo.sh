#!/usr/bin/env bash
# One command to a working demo on a fresh machine: builds the UI and the binaries, then
# runs the Proxmox VE API simulator, the control plane (embedded SQLite, serving the UI)
# and one tendril agent. Data stays in .demo/ between runs. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${TRELLIS_DEMO_PORT:-8080}
PVE_PORT=${PVE_SIM_PORT:-8006}
ADMIN=${TRELLIS_ADMIN_TOKEN:-trellis-demo-admin-token}
DIR=$PWD/.demo

bash scripts/setup.sh --no-browser
echo "== building the UI"
(cd ui && npm run --silent build)
echo "== building trellis, tendril and pve-sim"
cargo build --workspace --bins
BIN=$PWD/target/debug

. scripts/lib/stack.sh
trap stack_cleanup EXIT INT TERM
start_stack "$DIR" "$PORT" "$PVE_PORT" "$ADMIN"

cat <<MSG

  Trellis is running.
    UI:           http://127.0.0.1:$PORT   (admin token: $ADMIN)
    Hypervisor:   pve-lab-1 (tendril) → Proxmox simulator at http://127.0.0.1:$PVE_PORT
    Logs:         $DIR/{trellis,tendril,pve-sim}.log
  Try: Nodes → New node → Provision, or Deploy with a Terraform repo.
  Ctrl-C stops everything.
MSG
wait
