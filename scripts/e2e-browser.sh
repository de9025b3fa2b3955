#!/usr/bin/env bash
# Headless-browser end-to-end test: starts the real stack (pve-sim, trellis serving the
# built UI, tendril with Terraform) on free ports, creates a Terraform template repo with
# git, and drives Debian's chromium through ui/e2e/run.mjs (playwright-core).
# Screenshots land in test-output/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/debug}
[ -f ui/dist/index.html ] || (cd ui && npm run --silent build)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR=$(mktemp -d /tmp/trellis-e2e.XXXXXX)
HTTP=$(free_port)
PVE=$(free_port)
ADMIN="e2e-admin-token-$(date +%s)"

# A Terraform template repo: variables, outputs and a resource that prints over a few seconds.
REPO=$DIR/tf-template
mkdir -p "$REPO"
cat >"$REPO/main.tf" <<'TF'
variable "greeting" {
  type    = string
  default = "hello"
}
resource "null_resource" "announce" {
  triggers = { greeting = var.greeting }
  provisioner "local-exec" {
    command = "for i in 1 2 3 4 5 6; do echo \"deploy step $i: ${var.greeting}\"; sleep 0.7; done"
  }
}
output "greeting" {
  value = var.greeting
}
TF
git -C "$REPO" init -q -b main
git -C "$REPO" -c user.email=e2e@trellis -c user.name=e2e add .
git -C "$REPO" -c user.email=e2e@trellis -c user.name=e2e commit -qm "template"
git -C "$REPO" tag v1

# Agents report their VM inventory every 2 s (default 30), so a VM stopped behind Trellis's
# back shows on its node within seconds.
export TRELLIS_INVENTORY_INTERVAL_SECS=${TRELLIS_INVENTORY_INTERVAL_SECS:-2}

. scripts/lib/stack.sh
trap 'stack_cleanup; echo "logs: $DIR"' EXIT
# Short but realistic task timings so the browser watches every stage without waiting long;
# stop and destroy take long enough for the browser to see the node busy with its command.
start_stack "$DIR" "$HTTP" "$PVE" "$ADMIN" --clone-ms 800 --start-ms 500 --agent-boot-ms 1500 --stop-ms 2500 --destroy-ms 1500

mkdir -p test-output/screenshots
TRELLIS_URL="http://127.0.0.1:$HTTP" TRELLIS_ADMIN_TOKEN="$ADMIN" PVE_SIM_URL="http://127.0.0.1:$PVE" \
    TF_TEMPLATE_REPO="$REPO" TF_TEMPLATE_VERSION=v1 TF_TEMPLATE_VARS='{"greeting":"from-e2e"}' \
    E2E_SCREENSHOT_DIR="$PWD/test-output/screenshots" \
    node ui/e2e/run.mjs
