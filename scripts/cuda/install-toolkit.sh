#!/usr/bin/env bash
# Installs the CUDA 13.0 build pieces from PyPI (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC,
# CCCL, NCCL) into "$1" with `pip install --target`, once: a marker file names what is there.
# Stays on 13.0: driver 580 (the GPU machines') cannot load PTX from newer toolkits.
set -euo pipefail

dest=${1:?usage: install-toolkit.sh DEST}
packages=(
    "cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2"
    "nvidia-nccl-cu13==2.30.7"
)
marker="$dest/.loractl-installed"
want="${packages[*]}"

if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    echo "cuda: toolkit already in $dest"
    exit 0
fi

# A fresh Debian/Ubuntu has python3 without pip.
if ! python3 -m pip --version >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "cuda: installing python3-pip with apt"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip python3-venv >/dev/null
    else
        echo "cuda: python3 has no pip: install python3-pip (apt-get install python3-pip) and rerun" >&2
        exit 1
    fi
fi

echo "cuda: installing ${want} into $dest (about 1.5 GB)"
rm -rf "$dest"
mkdir -p "$dest"
# --target skips pip's externally-managed-environment check (PEP 668): nothing here touches the
# system's Python.
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$dest" "${packages[@]}"
test -x "$dest/nvidia/cu13/bin/nvcc" || {
    echo "cuda: no nvcc in $dest/nvidia/cu13/bin after pip install" >&2
    exit 1
}
echo "$want" >"$marker"
