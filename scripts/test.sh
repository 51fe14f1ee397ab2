#!/usr/bin/env bash
# Runs loractl's test suite on a fresh Debian/Ubuntu machine with Rust installed.
# Installs what the tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Dependencies are built with opt-level 3 in the dev profile (Cargo.toml), so numeric tests
# run at release speed without a release build of the workspace.
cargo test --workspace --locked "$@"
