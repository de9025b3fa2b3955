#!/usr/bin/env bash
# Builds the tendril and trellis .deb packages from the debug binaries the test run has
# already built (no release build), checks what they hold and with which modes, and checks
# the systemd units with `systemd-analyze verify` (any warning fails) and reports their
# `systemd-analyze security` exposure. Installs cargo-deb and systemd if missing.
#
#   scripts/packages.sh            # expects target/debug/{tendril,trellis}
#   PACKAGES_OUT=dir scripts/packages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PACKAGES_OUT:-target/debian}"
started=$(date +%s)

need_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The version this was written against: later ones may refuse `--profile dev` (3.x warns
# that it will become an error).
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb $CARGO_DEB_VERSION (about 2 minutes on 2 cores) ..."
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze) ..."
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
for b in tendril trellis; do
    [ -x "target/debug/$b" ] || { echo "target/debug/$b is missing: cargo build --workspace --bins first" >&2; exit 1; }
done

fail() {
    echo "packages: $*" >&2
    exit 1
}

# The debug profile: cargo-deb warns that it is meant for releases, and strips the
# binaries as it would a release's. `--fast`: CI does not need the smallest archive.
mkdir -p "$out"
for p in tendril trellis; do
    cargo deb -p "$p" --no-build --profile dev --fast --quiet -o "$out/" 2>&1 |
        grep -v -e 'dev profile is not supported' -e 'To enable debug symbols' || true
done
deb() { ls -t "$out/$1"_*.deb 2>/dev/null | head -n1; }
tendril_deb=$(deb tendril)
trellis_deb=$(deb trellis)
[ -n "$tendril_deb" ] && [ -n "$trellis_deb" ] || fail "cargo deb produced no package in $out"

# `expect DEB MODE PATH`: the package holds PATH with mode MODE (ls -l form).
expect() {
    local listing
    listing=$(dpkg-deb -c "$1")
    echo "$listing" | awk -v m="$2" -v p="./$3" '$1 == m && $6 == p { found = 1 } END { exit !found }' ||
        fail "$(basename "$1"): expected $2 ./$3 in:
$listing"
}
expect "$tendril_deb" -rwxr-xr-x usr/bin/tendril
expect "$tendril_deb" -rw-r--r-- usr/lib/systemd/system/tendril.service
expect "$tendril_deb" -rw------- etc/tendril/tendril.env
expect "$trellis_deb" -rwxr-xr-x usr/bin/trellis
expect "$trellis_deb" -rwxr-xr-x usr/lib/trellis/tendril
expect "$trellis_deb" -rw-r--r-- usr/lib/systemd/system/trellis.service
expect "$trellis_deb" -rw------- etc/trellis/trellis.env

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
for d in "$tendril_deb" "$trellis_deb"; do
    name=$(dpkg-deb -f "$d" Package)
    dpkg-deb -e "$d" "$ctl/$name"
    grep -qx "/etc/$name/$name.env" "$ctl/$name/conffiles" || fail "$name: /etc/$name/$name.env is not a conffile"
    grep -q "useradd --system" "$ctl/$name/postinst" || fail "$name: postinst does not create the system user"
    grep -q "chmod 0600 /etc/$name/$name.env" "$ctl/$name/postinst" || fail "$name: postinst does not keep the env file 0600"
    grep -q "deb-systemd-helper" "$ctl/$name/postinst" || fail "$name: no systemd unit handling in postinst"
    sh -n "$ctl/$name/postinst" || fail "$name: postinst is not valid sh"
    echo "$(basename "$d"): $(stat -c %s "$d") bytes, $(dpkg-deb -c "$d" | wc -l) entries, Depends: $(dpkg-deb -f "$d" Depends)"
done
sh -n packaging/install-tendril.sh || fail "install-tendril.sh is not valid sh"

# The units, as packaged, with ExecStart pointed at the binaries here (verify wants an
# executable at that path). Any output is a finding (unknown keys only warn, exit 0).
for name in tendril trellis; do
    dpkg-deb --fsys-tarfile "$(deb "$name")" | tar -x -C "$ctl" "./usr/lib/systemd/system/$name.service"
    unit="$ctl/$name.service"
    sed "s#^ExecStart=/usr/bin/$name#ExecStart=$PWD/target/debug/$name#" \
        "$ctl/usr/lib/systemd/system/$name.service" >"$unit"
    for key in ProtectSystem=strict ProtectHome=true PrivateTmp=true NoNewPrivileges=true \
        "StateDirectory=$name" Restart=on-failure RestartSec= "EnvironmentFile=/etc/$name/$name.env" \
        "User=$name"; do
        grep -q "^$key" "$unit" || fail "$name.service lacks $key"
    done
    findings=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $name.service: $findings"
    [ -z "$findings" ] || fail "systemd-analyze verify $name.service: $findings"
    exposure=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | grep -o 'exposure level for .*' || true)
    echo "$name.service: verify clean; ${exposure:-security not available}"
done
echo "packages: ok ($(( $(date +%s) - started )) s)"
