#!/usr/bin/env bash
# Builds `loractl` (the CLI and rank program) with the `cuda` feature on a machine without a GPU
# or a CUDA install: CUDA 13.0 and NCCL from PyPI into a cache folder, a link stub for the
# driver's libcuda, then a release build for one GPU architecture.
#
#   scripts/cuda/build.sh
#   scripts/cuda/build.sh -- COMMAND...   run COMMAND in the build's environment instead of the
#                                         build, e.g. cargo clippy --features cuda, or the
#                                         NCCL backend's tests (COMMAND sees
#                                         LORACTL_CUDA_LD_PATH, the stub and wheel libraries)
#
# Environment:
#   CUDA_COMPUTE_CAP    GPU architecture, e.g. 90 (H100/H200, the default), 89, 80
#   LORACTL_CUDA_CACHE  toolkit and stub (default ~/.cache/loractl/cuda); outside the clone so
#                       CI keeps it between runs
#   LORACTL_CUDA_BUILD  target folder, stripped binaries and loractl-cuda.env (default
#                       $LORACTL_CUDA_CACHE): a second clone on the machine builds into a
#                       folder of its own and shares the toolkit
#   LORACTL_CUDA_OUT    also copy the stripped binary here (e.g. to carry it to a GPU machine);
#                       gzipped when the name ends in .gz (74 MB stripped, 22 MB gzipped)
#   LORACTL_CUDA_BENCH_OUT  also build the step benchmark `lora-bench` with CUDA and copy it
#                       here the same way (for scripts/device/gpu-check.sh)
#
# Writes $LORACTL_CUDA_BUILD/loractl-cuda.env (LORACTL_CUDA_BIN, LORACTL_CUDA_LD_PATH) for the
# tests that run the binary here. The stub under root/lib/stubs is for linking and for those
# tests only: on a GPU machine the binary must find the driver's libcuda.so.1, never the stub.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${LORACTL_CUDA_CACHE:-$HOME/.cache/loractl/cuda}
cap=${CUDA_COMPUTE_CAP:-90}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
build=${LORACTL_CUDA_BUILD:-$cache}
mkdir -p "$build"
build=$(cd "$build" && pwd)
command=()
if [[ ${1:-} == -- ]]; then
    shift
    command=("$@")
    [[ ${#command[@]} -gt 0 ]] || { echo "cuda: nothing to run after --" >&2; exit 1; }
elif [[ $# -gt 0 ]]; then
    echo "cuda: unknown argument \`$1\`: scripts/cuda/build.sh [-- COMMAND...]" >&2
    exit 1
fi
pip="$cache/pip"
root="$cache/root"

die() {
    echo "cuda: $*" >&2
    exit 1
}

[[ $cap =~ ^[0-9]+$ ]] || die "CUDA_COMPUTE_CAP must be a number like 90 (sm_90a), not \`$cap\`"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
command -v python3 >/dev/null || die "python3 not found: apt-get install python3"

# nvcc needs a C++ host compiler; the stub needs a C compiler.
if ! command -v c++ >/dev/null || ! command -v cc >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "cuda: installing g++ with apt (nvcc's host compiler)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        die "no C/C++ compiler: install g++ (apt-get install g++); nvcc needs it"
    fi
fi

# 1. CUDA 13.0 toolkit pieces and NCCL (once).
"$here/install-toolkit.sh" "$pip"

# 2. A CUDA_ROOT the build scripts understand: bin/include/nvvm of the wheels, and a lib folder
# with the wheels' versioned libraries under their own and their unversioned names (the linker
# wants libcublas.so, the wheels ship only libcublas.so.13).
mkdir -p "$root/lib/stubs"
for d in bin include nvvm; do
    ln -sfn "$pip/nvidia/cu13/$d" "$root/$d"
done
for f in "$pip"/nvidia/cu13/lib/lib*.so.* "$pip"/nvidia/nccl/lib/lib*.so.*; do
    name=$(basename "$f")
    ln -sf "$f" "$root/lib/$name"
    ln -sf "$f" "$root/lib/${name%%.so.*}.so"
done
for lib in cudart cublas cublasLt curand nvrtc nccl; do
    [[ -e $root/lib/lib$lib.so ]] || die "the wheels in $pip lack lib$lib.so.*: remove $pip and rerun"
done

# 3. The link stub for libcuda, from the driver functions cudarc (the version in Cargo.lock)
# declares.
cd "$repo"
cudarc=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
[[ -n $cudarc ]] || die "no cudarc in Cargo.lock"
cargo fetch --locked --quiet
registry=${CARGO_HOME:-$HOME/.cargo}/registry
bindings=$(ls "$registry"/src/*/"cudarc-$cudarc"/src/driver/sys/mod.rs 2>/dev/null | head -n1 || true)
if [[ -z $bindings ]]; then
    # `cargo fetch` may leave only the .crate archive: unpack it ourselves.
    crate=$(ls "$registry"/cache/*/"cudarc-$cudarc.crate" 2>/dev/null | head -n1 || true)
    [[ -n $crate ]] || die "cudarc $cudarc not in $registry after cargo fetch"
    mkdir -p "$cache/src"
    tar -xzf "$crate" -C "$cache/src"
    bindings="$cache/src/cudarc-$cudarc/src/driver/sys/mod.rs"
fi
stub_marker="$root/lib/stubs/.from"
if [[ ! -e $root/lib/stubs/libcuda.so.1 || "$(cat "$stub_marker" 2>/dev/null)" != "$bindings" ]]; then
    "$here/make-stub.sh" "$bindings" "$root/lib/stubs"
    echo "$bindings" >"$stub_marker"
fi

# 4. The build. CUDA_PATH and friends from the caller could mix another toolkit in.
unset CUDA_PATH CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB
export CUDA_ROOT="$root" CUDA_HOME="$root"
export NVCC="$root/bin/nvcc"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="$cap"
export PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$build/target"
# PROTOC for etcd-client's build script; the etcd server itself is not needed here.
LORACTL_SKIP_ETCD=1
# shellcheck source=../env.sh
source "$repo/scripts/env.sh"
ld_path="$root/lib/stubs:$root/lib"

if [[ ${#command[@]} -gt 0 ]]; then
    export LORACTL_CUDA_LD_PATH="$ld_path"
    exec "${command[@]}"
fi

echo "cuda: building loractl --features cuda for CUDA_COMPUTE_CAP=$cap in $CARGO_TARGET_DIR ($("$NVCC" --version | tail -n2 | head -n1))"
start=$SECONDS
if [[ -n ${LORACTL_CUDA_BENCH_OUT:-} ]]; then
    # One cargo call for both, so they share one set of features (one candle, one cudarc).
    cargo build --release --locked -p loractl -p loractl-trainer \
        --features loractl/cuda,loractl-trainer/cuda --bin loractl --bin lora-bench
else
    cargo build --release --locked -p loractl --features cuda
fi
bin="$CARGO_TARGET_DIR/release/loractl"
echo "cuda: built in $((SECONDS - start)) s"

# A stripped copy is what travels to a GPU machine (about 74 MB, half of it candle's kernels),
# gzipped when the destination's name ends in .gz.
copy_out() {
    local name=$1 dest=$2
    mkdir -p "$build/bin"
    strip -o "$build/bin/$name.tmp" "$CARGO_TARGET_DIR/release/$name"
    mv "$build/bin/$name.tmp" "$build/bin/$name"
    [[ -n $dest ]] || return 0
    mkdir -p "$(dirname "$dest")"
    case $dest in
    *.gz) gzip -6 -c "$build/bin/$name" >"$dest" ;;
    *) cp "$build/bin/$name" "$dest" ;;
    esac
}
copy_out loractl "${LORACTL_CUDA_OUT:-}"
if [[ -n ${LORACTL_CUDA_BENCH_OUT:-} ]]; then
    copy_out lora-bench "$LORACTL_CUDA_BENCH_OUT"
fi

cat >"$build/loractl-cuda.env" <<ENV
LORACTL_CUDA_BIN=$bin
LORACTL_CUDA_LD_PATH=$ld_path
ENV

cat <<MSG
cuda: binary $bin (CUDA_COMPUTE_CAP=$cap)
      stripped copy $build/bin/loractl${LORACTL_CUDA_OUT:+, and $LORACTL_CUDA_OUT}${LORACTL_CUDA_BENCH_OUT:+
      lora-bench: $build/bin/lora-bench, and $LORACTL_CUDA_BENCH_OUT}
  On a GPU machine (NVIDIA driver >= 580 and the CUDA 13 libraries cudart, cuBLAS, cuRAND,
  NVRTC, NCCL >= 2.30 installed; check with: ldconfig -p | grep -E 'cublas|curand|cudart|nccl'):
      loractl gpu-check
      loractl train --device cuda:0 job.toml
  (or LD_LIBRARY_PATH=/path/to/cuda-13/lib:/path/to/nccl/lib if they are not in ldconfig;
   $root/lib holds the wheel libraries, without the stub.)
  Here, without a GPU (every CUDA call fails with CUDA_ERROR_NO_DEVICE):
      LD_LIBRARY_PATH=$ld_path $bin gpu-check
MSG
