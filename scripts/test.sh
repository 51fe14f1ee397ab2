#!/usr/bin/env bash
# Runs loractl's test suite on a fresh Debian/Ubuntu machine with Rust installed.
# Installs what the tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Dependencies are built with opt-level 3 in the dev profile (Cargo.toml), so numeric tests
# run at release speed without a release build of the workspace.
# Incremental caches only cost disk on a one-shot build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
source scripts/env.sh
cargo test --workspace --locked "$@"
