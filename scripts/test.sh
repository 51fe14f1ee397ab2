#!/usr/bin/env bash
# Runs loractl's test suite on a fresh Debian/Ubuntu machine with Rust installed.
# Installs what the tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Dependencies are built with opt-level 3 in the dev profile (Cargo.toml), so numeric tests
# run at release speed without a release build of the workspace.
# Incremental caches only cost disk on a one-shot build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Training steps allocate and free large activation buffers; glibc's default of returning every
# buffer over 128 KiB to the kernel makes each step page-fault them back in (half the test time).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-8589934592}"
source scripts/env.sh
cargo test --workspace --locked "$@"
