#!/usr/bin/env bash
# Runs every check and test: formatting, lints, Rust unit, in-process and end-to-end tests
# (real binaries, SQLite and PostgreSQL, the Proxmox simulator, real Terraform), the API
# contract (schemathesis against a live trellis; docs/openapi.json drift), the .deb packages
# and systemd units (scripts/packages.sh), the UI's
# type-check, lint, unit tests and build, and the headless-browser end-to-end test.
# PostgreSQL must listen on 127.0.0.1:5432 (override with TRELLIS_TEST_POSTGRES).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step setup
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (binaries the end-to-end tests start)"
cargo build --workspace --bins --locked

step "cargo test"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked --no-fail-fast
fi

step "packages: .debs from the debug binaries, their contents and systemd units"
bash scripts/packages.sh

step "API contract: schemathesis against a live trellis"
bash scripts/api-contract.sh

step "ui: typecheck, lint, unit tests, build"
(cd ui && npm run --silent typecheck && npm run --silent lint && npm test --silent && npm run --silent build)

step "trellis with the UI embedded (release form)"
bash scripts/check-embedded-ui.sh

step "browser end-to-end (headless chromium)"
bash scripts/e2e-browser.sh

step "all checks passed"
