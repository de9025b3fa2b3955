#!/bin/sh
# Installs the Tendril agent from a Trellis control plane, which serves this script at
# /install/tendril.sh and the agent binary at /install/tendril:
#
#   curl -fsSL https://trellis.example.com/install/tendril.sh | sh -s -- --server https://trellis.example.com
#
# Secrets never go on a command line (where `ps` and shell history would show them): the
# agent token comes from $TENDRIL_TOKEN, the Proxmox API token secret from
# $PROXMOX_TOKEN_SECRET; either is asked for on the terminal when unset.
#
# It downloads the binary, writes <prefix>/etc/tendril/tendril.env (0600), installs and
# starts the systemd unit (or, with --no-systemd, starts tendril in the background with a
# pid file), then waits until trellis reports the agent online and prints its name.
set -eu

usage() {
    cat <<'EOF'
Usage: install-tendril.sh --server URL [options]

  --server URL               Trellis base URL (https://host[:port]; http:// only on a trusted network)
  --prefix DIR               Install under DIR instead of / (default /)
  --no-systemd               Do not install a systemd unit: start tendril in the background,
                             pid file <prefix>/run/tendril.pid, log <prefix>/var/log/tendril.log
  --server-public-key KEY    Pin the control plane's dispatch-signing key (base64)
  --server-ca-file PEM       Extra CA to trust for the control plane's certificate
  --insecure-plaintext       Allow ws:// to a host that is not loopback (token in clear)
  --proxmox-url URL          Proxmox VE API, e.g. https://127.0.0.1:8006
  --proxmox-token-id ID      Proxmox API token id, user@realm!name
  --proxmox-fingerprint FP   SHA-256 fingerprint of the Proxmox certificate (default on a
                             Proxmox host: read from /etc/pve/local/pveproxy-ssl.pem, else
                             pve-ssl.pem)
  --wait-secs N              How long to wait for the agent to come online (default 120)

Environment: TENDRIL_TOKEN (the agent token), PROXMOX_TOKEN_SECRET (with --proxmox-token-id).
EOF
}

die() {
    printf 'tendril install: %s\n' "$*" >&2
    exit 1
}

server=""
prefix="/"
systemd=1
server_key=""
server_ca=""
insecure=""
pve_url=""
pve_token_id=""
pve_fp=""
wait_secs=120

while [ $# -gt 0 ]; do
    case "$1" in
    --server) server="${2:-}"; shift 2 || die "--server needs a value" ;;
    --server=*) server="${1#*=}"; shift ;;
    --prefix) prefix="${2:-}"; shift 2 || die "--prefix needs a value" ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --no-systemd) systemd=0; shift ;;
    --server-public-key) server_key="${2:-}"; shift 2 || die "--server-public-key needs a value" ;;
    --server-ca-file) server_ca="${2:-}"; shift 2 || die "--server-ca-file needs a value" ;;
    --insecure-plaintext) insecure=true; shift ;;
    --proxmox-url) pve_url="${2:-}"; shift 2 || die "--proxmox-url needs a value" ;;
    --proxmox-token-id) pve_token_id="${2:-}"; shift 2 || die "--proxmox-token-id needs a value" ;;
    --proxmox-fingerprint) pve_fp="${2:-}"; shift 2 || die "--proxmox-fingerprint needs a value" ;;
    --wait-secs) wait_secs="${2:-}"; shift 2 || die "--wait-secs needs a value" ;;
    --token | --token=* | --proxmox-token-secret | --proxmox-token-secret=*)
        die "secrets are not taken as arguments (ps and shell history show them): set TENDRIL_TOKEN / PROXMOX_TOKEN_SECRET or answer the prompt" ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ -n "$server" ] || { usage >&2; die "--server is required"; }
server="${server%/}"
case "$server" in
https://*) ws_url="wss://${server#https://}/api/agents/connect" ;;
http://*) ws_url="ws://${server#http://}/api/agents/connect" ;;
*) die "--server must start with https:// or http://" ;;
esac
case "$wait_secs" in
'' | *[!0-9]*) die "--wait-secs must be a number of seconds" ;;
esac
command -v curl >/dev/null 2>&1 || die "curl is required"
prefix="${prefix%/}"
if [ "$systemd" = 1 ]; then
    # The unit names /usr/local/bin/tendril and /etc/tendril: a service is for this host.
    [ -z "$prefix" ] || die "--prefix other than / needs --no-systemd"
    [ "$(id -u)" = 0 ] || die "installing the systemd service needs root (or use --prefix DIR --no-systemd)"
fi

# Reads a secret from the terminal without echoing it (this script's stdin is the pipe
# it came from, so the terminal is /dev/tty).
ask_secret() {
    [ -r /dev/tty ] || die "$1 is not set and there is no terminal to ask for it"
    printf '%s: ' "$2" >/dev/tty
    stty -echo </dev/tty 2>/dev/null || true
    IFS= read -r answer </dev/tty || answer=""
    stty echo </dev/tty 2>/dev/null || true
    printf '\n' >/dev/tty
    printf '%s' "$answer"
}

token="${TENDRIL_TOKEN:-}"
[ -n "$token" ] || token=$(ask_secret TENDRIL_TOKEN "Agent token (from Register hypervisor or trellis agents create)")
[ -n "$token" ] || die "no agent token"
pve_secret="${PROXMOX_TOKEN_SECRET:-}"
if [ -n "$pve_token_id" ] && [ -z "$pve_secret" ]; then
    pve_secret=$(ask_secret PROXMOX_TOKEN_SECRET "Proxmox API token secret for $pve_token_id")
fi

# On a Proxmox host the API's certificate is pinned by its fingerprint: the one port 8006
# serves, pveproxy-ssl.pem when a custom (e.g. ACME) certificate is installed, else pve-ssl.pem.
if [ -n "$pve_url" ] && [ -z "$pve_fp" ] && command -v openssl >/dev/null 2>&1; then
    for pem in /etc/pve/local/pveproxy-ssl.pem /etc/pve/local/pve-ssl.pem; do
        if [ -r "$pem" ]; then
            pve_fp=$(openssl x509 -noout -fingerprint -sha256 -in "$pem" | sed 's/^[^=]*=//')
            break
        fi
    done
fi

# Values go into the environment file single-quoted (systemd and sh read it alike).
check_value() {
    case "$2" in
    *"'"* | *'
'*) die "$1 must not contain a quote or a newline" ;;
    esac
}

bindir="$prefix/usr/local/bin"
etcdir="$prefix/etc/tendril"
envfile="$etcdir/tendril.env"
if [ "$systemd" = 1 ]; then
    workdir="/var/lib/tendril"
else
    workdir="$prefix/var/lib/tendril"
fi

# curl reads its options (the Authorization header included) from stdin, never argv.
curl_cfg() {
    printf 'silent\nshow-error\nfail\nlocation\n'
    [ -z "$server_ca" ] || printf 'cacert = "%s"\n' "$server_ca"
}

(umask 022 && mkdir -p "$bindir")
umask 077
mkdir -p "$etcdir"
# Under systemd the work dir is the unit's StateDirectory, made by systemd for its user.
[ "$systemd" = 1 ] || mkdir -p "$workdir"
tmp="$bindir/.tendril.download.$$"
trap 'rm -f "$tmp"' EXIT
echo "Downloading tendril from $server/install/tendril ..." >&2
curl_cfg | curl -K - -o "$tmp" "$server/install/tendril" || die "cannot download $server/install/tendril"
chmod 0755 "$tmp"
"$tmp" --version >/dev/null 2>&1 || die "the downloaded file is not a tendril binary for this machine"
mv -f "$tmp" "$bindir/tendril"

for pair in "TENDRIL_TOKEN:$token" "PROXMOX_TOKEN_SECRET:$pve_secret" "PROXMOX_URL:$pve_url" \
    "PROXMOX_TOKEN_ID:$pve_token_id" "PROXMOX_TLS_FINGERPRINT:$pve_fp" \
    "TENDRIL_SERVER_PUBLIC_KEY:$server_key" "TENDRIL_SERVER_CA_FILE:$server_ca"; do
    check_value "${pair%%:*}" "${pair#*:}"
done
{
    printf '# Written by install-tendril.sh from %s. Root-only (0600): it holds secrets.\n' "$server"
    printf "TENDRIL_SERVER_URL='%s'\n" "$ws_url"
    printf "TENDRIL_TOKEN='%s'\n" "$token"
    printf "TENDRIL_WORK_DIR='%s'\n" "$workdir"
    [ -z "$insecure" ] || printf "TENDRIL_INSECURE_PLAINTEXT='true'\n"
    [ -z "$server_key" ] || printf "TENDRIL_SERVER_PUBLIC_KEY='%s'\n" "$server_key"
    [ -z "$server_ca" ] || printf "TENDRIL_SERVER_CA_FILE='%s'\n" "$server_ca"
    [ -z "$pve_url" ] || printf "PROXMOX_URL='%s'\n" "$pve_url"
    [ -z "$pve_token_id" ] || printf "PROXMOX_TOKEN_ID='%s'\n" "$pve_token_id"
    [ -z "$pve_secret" ] || printf "PROXMOX_TOKEN_SECRET='%s'\n" "$pve_secret"
    [ -z "$pve_fp" ] || printf "PROXMOX_TLS_FINGERPRINT='%s'\n" "$pve_fp"
} >"$envfile.new"
chmod 0600 "$envfile.new"
mv -f "$envfile.new" "$envfile"
echo "Wrote $envfile (0600)" >&2

if [ "$systemd" = 1 ]; then
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: use --no-systemd"
    if [ "$prefix" = "" ] && ! getent passwd tendril >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/tendril --no-create-home \
            --shell /usr/sbin/nologin --comment "tendril service" tendril
    fi
    unitdir="$prefix/etc/systemd/system"
    mkdir -p "$unitdir"
    curl_cfg | curl -K - -o "$unitdir/tendril.service.new" "$server/install/tendril.service" ||
        die "cannot download $server/install/tendril.service"
    sed "s#^ExecStart=/usr/bin/tendril#ExecStart=/usr/local/bin/tendril#" \
        "$unitdir/tendril.service.new" >"$unitdir/tendril.service"
    rm -f "$unitdir/tendril.service.new"
    chmod 0644 "$unitdir/tendril.service"
    systemctl daemon-reload
    systemctl enable tendril >/dev/null 2>&1
    systemctl restart tendril
    echo "Started tendril.service (logs: journalctl -u tendril)" >&2
else
    rundir="$prefix/run"
    logdir="$prefix/var/log"
    mkdir -p "$rundir" "$logdir"
    if [ -f "$rundir/tendril.pid" ] && kill -0 "$(cat "$rundir/tendril.pid")" 2>/dev/null; then
        kill "$(cat "$rundir/tendril.pid")" 2>/dev/null || true
        sleep 1
    fi
    # The settings reach tendril through its environment, as under systemd.
    (
        set -a
        . "$envfile"
        set +a
        exec "$bindir/tendril" </dev/null >>"$logdir/tendril.log" 2>&1
    ) &
    echo $! >"$rundir/tendril.pid"
    echo "Started tendril (pid $(cat "$rundir/tendril.pid"), log $logdir/tendril.log)" >&2
fi

# Wait until trellis sees the agent: GET /api/agents/self with the agent token.
echo "Waiting for the agent to come online ..." >&2
deadline=$(($(date +%s) + wait_secs))
while :; do
    answer=$({
        curl_cfg
        printf 'header = "Authorization: Bearer %s"\n' "$token"
    } | curl -K - "$server/api/agents/self" 2>/dev/null) || answer=""
    case "$answer" in
    *'"status":"online"'*)
        name=$(printf '%s' "$answer" | sed -n 's/.*"name":"\([^"]*\)".*/\1/p')
        echo "tendril is online as agent $name"
        exit 0
        ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        if [ "$systemd" = 1 ]; then
            die "the agent did not come online within ${wait_secs}s; see journalctl -u tendril"
        fi
        die "the agent did not come online within ${wait_secs}s; see $logdir/tendril.log"
    fi
    sleep 1
done
