#!/usr/bin/env bash
# The README's main job on a fresh Debian/Ubuntu machine with only Rust installed: builds
# loractl (protoc comes from the vendored crate, see scripts/env.sh), then runs the quickstart
# job through a coordinator and a worker started in one process on the embedded store.
set -euo pipefail
cd "$(dirname "$0")/.."
# The quickstart needs no etcd; env.sh would otherwise install it for the tests.
export LORACTL_SKIP_ETCD=1
source scripts/env.sh
cargo run --release --locked -p loractl -- quickstart --cluster "$@"
