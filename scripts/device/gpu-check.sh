#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, its driver and the CUDA 13 libraries, but no Rust: checks the
# CUDA build of loractl carried there (built elsewhere by scripts/cuda/build.sh):
#   1. `loractl gpu-check`: NCCL version, device, a one-rank all-reduce, broadcast and barrier
#      through the ranks' NCCL backend and a timed all-reduce of 3.4 M floats, a matmul vs CPU;
#   2. a LoRA training run of 2 steps on the tiny test model, on the GPU and on the CPU, same
#      seed: per-step losses and the saved LoRA weights compared;
#   3. one LoRA training step of the sd15 UNet config at 512x512 (a 64x64 latent) on the GPU
#      (`lora-bench --device cuda`) side by side with diffusers + peft
#      (scripts/bench/torch_step.py --device cuda) when this machine's Python has torch with
#      CUDA, diffusers and peft (otherwise loractl's alone), with the frozen UNet in f32, bf16
#      and fp16 (LoRA and AdamW in f32): time, and GPU memory measured the same way on both
#      sides (the device's used memory at the step's high points).
# Run from the repository root:
#   LORACTL_CUDA_OUT=target/cuda/loractl.gz LORACTL_CUDA_BENCH_OUT=target/cuda/lora-bench.gz \
#       scripts/cuda/build.sh                                      # where Rust is
#   scripts/device/gpu-check.sh [target/cuda/loractl.gz [target/cuda/lora-bench.gz]]
#                                                                  # on the GPU machine
# (gzipped, 22 and 15 MB, because the stripped binaries, 74 and 58 MB, are more than a device
# run may carry.) PYTHON names the interpreter for the PyTorch side; BENCH_STEPS (default 10)
# the timed steps. Writes its work to ${OUT:-/tmp}/loractl-gpu-check. Takes about five minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${1:-${LORACTL_CUDA_BIN:-target/cuda/loractl.gz}}
bench=${2:-${LORACTL_BENCH_BIN:-target/cuda/lora-bench.gz}}
PYTHON=${PYTHON:-python3}
BENCH_STEPS=${BENCH_STEPS:-10}
for f in "$bin" "$bench"; do
    [[ -f $f ]] || {
        echo "gpu-check: no CUDA build at $f: build both with" \
            "LORACTL_CUDA_OUT=$bin LORACTL_CUDA_BENCH_OUT=$bench scripts/cuda/build.sh" >&2
        exit 1
    }
done
work=${OUT:-/tmp}/loractl-gpu-check
rm -rf "$work"
mkdir -p "$work"
work=$(cd "$work" && pwd)
# A gzipped binary is unpacked into the work folder; either way an absolute path comes back.
unpack() {
    local f=$1 name=$2
    if [[ $f == *.gz ]]; then
        gzip -dc "$f" >"$work/$name"
        chmod +x "$work/$name"
        f="$work/$name"
    fi
    echo "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
}
bin=$(unpack "$bin" loractl)
bench=$(unpack "$bench" lora-bench)

nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader ||
    echo "gpu-check: nvidia-smi failed (no driver?)" >&2

# The binary links libcuda (the driver's), cudart, cuBLAS(Lt), cuRAND, NVRTC and NCCL 2.30+ of
# CUDA 13. Use the system's when the loader finds them; otherwise look in the usual toolkit and
# Python wheel folders (PyTorch's CUDA 13 wheels carry them). Never a `stubs` folder: its
# libcuda sees no GPU.
missing() {
    for b in "$bin" "$bench"; do
        LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} ldd "$b" | awk '/not found/ { print $1 }'
    done | sort -u
}
if [[ -n $(missing) ]]; then
    candidates=(/usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/*/lib /usr/local/cuda/lib64
        /usr/lib/x86_64-linux-gnu)
    for py in python3 /usr/bin/python3; do
        command -v "$py" >/dev/null || continue
        while read -r site; do
            candidates+=("$site"/nvidia/cu13/lib "$site"/nvidia/nccl/lib "$site"/nvidia/*/lib)
        done < <("$py" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)
    done
    extra=""
    for lib in $(missing); do
        for d in "${candidates[@]}"; do
            [[ -e $d/$lib && $d != */stubs* ]] || continue
            case ":$extra:" in *":$d:"*) ;; *) extra="$extra:$d" ;; esac
            break
        done
    done
    export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if [[ -n $(missing) ]]; then
        echo "gpu-check: libraries not found: $(missing | tr '\n' ' ')" >&2
        echo "  install CUDA 13 (cudart, cuBLAS, cuRAND, NVRTC) and NCCL >= 2.30, or set LD_LIBRARY_PATH" >&2
        exit 1
    fi
fi
echo "libraries:"
ldd "$bin" | grep -E 'libcuda\.|cudart|cublas|curand|nvrtc|nccl' | sed 's/^/  /' || true

echo "== loractl gpu-check"
"$bin" gpu-check

echo "== LoRA training, 2 steps on the tiny model: GPU vs CPU"
# quickstart writes the generated dataset and the job (and trains once on the CPU, a second).
"$bin" quickstart --dir "$work" --model trainer/tests/fixtures/sd1/diffusers --steps 2 \
    --device cpu >"$work/quickstart.log" 2>&1 || {
    cat "$work/quickstart.log" >&2
    exit 1
}
for dev in cpu cuda:0; do
    name=${dev%%:*}
    sed "s|^output_dir = .*|output_dir = \"out-$name\"|" "$work/job.toml" >"$work/job-$name.toml"
    start=$(date +%s%N)
    "$bin" train --json --device "$dev" "$work/job-$name.toml" >"$work/events-$name.jsonl"
    echo "  $dev: $((($(date +%s%N) - start) / 1000000)) ms"
done

python3 - "$work" <<'PY'
"""Compares the CPU and GPU runs: per-step losses and the saved LoRA tensors.

Tolerances. Both devices compute in f32 with the same seeded host-side noise, so the step-1
loss differs only by summation order (cuBLAS/candle kernels vs CPU gemm): 1e-3 relative is
~100x that. The LoRA update of AdamW's first steps is about +-lr per element whatever the
gradient's size, so a gradient element near zero whose sign differs between devices moves
by 2 lr: the weights are compared by their overall relative L2 difference (5e-2) and by the
share of elements that agree to fp16 storage precision (>= 99%), not element by element."""
import json, math, struct, sys
from pathlib import Path

work = Path(sys.argv[1])

def losses(name):
    out = []
    for line in (work / f"events-{name}.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") == "step":
            out.append(float(e["loss"]))
    return out

def tensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    fmt = {"F16": "e", "F32": "f", "BF16": None}
    out = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        a, b = t["data_offsets"]
        f = fmt[t["dtype"]]
        size = struct.calcsize(f)
        out[key] = struct.unpack(f"<{(b - a) // size}{f}", data[a:b])
    return out

def lora_files(name):
    return {p.name for p in (work / f"out-{name}").glob("*.safetensors")}

ok = True
cpu_l, gpu_l = losses("cpu"), losses("cuda")
print(f"  losses cpu {cpu_l}\n         gpu {gpu_l}")
if len(cpu_l) != len(gpu_l) or not cpu_l:
    sys.exit("the runs did not report the same steps")
worst = max(abs(c - g) / max(abs(c), 1e-8) for c, g in zip(cpu_l, gpu_l))
print(f"  loss: max relative difference {worst:.2e} (tolerance 1e-3)")
ok &= worst <= 1e-3

names = lora_files("cpu")
if not names or names != lora_files("cuda"):
    sys.exit(f"the runs saved different LoRA files: {names} vs {lora_files('cuda')}")
for file in sorted(names):
    cpu_t, gpu_t = tensors(work / "out-cpu" / file), tensors(work / "out-cuda" / file)
    if cpu_t.keys() != gpu_t.keys():
        sys.exit(f"{file}: the runs saved different tensors")
    diff2 = ref2 = 0.0
    close = total = 0
    for key in cpu_t:
        c, g = cpu_t[key], gpu_t[key]
        scale = max(abs(x) for x in c) or 1.0
        for x, y in zip(c, g):
            diff2 += (x - y) ** 2
            ref2 += x * x
            close += abs(x - y) <= 1e-3 * scale + 1e-3 * abs(x)
            total += 1
    rel = math.sqrt(diff2 / max(ref2, 1e-30))
    share = close / total
    print(f"  {file} ({len(cpu_t)} tensors, {total} values): relative L2 difference "
          f"{rel:.2e} (tolerance 5e-2), {100 * share:.2f}% of values agree (need 99%)")
    ok &= rel <= 5e-2 and share >= 0.99
print("  gpu vs cpu:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY

has_torch=0
if "$PYTHON" -c 'import sys, torch, diffusers, peft; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >"$work/python-check.log" 2>&1; then
    has_torch=1
fi
for precision in f32 bf16 fp16; do
echo "== one LoRA training step, sd15 UNet config (batch 1, 512x512 = 64x64 latent, frozen UNet in $precision, LoRA and AdamW f32): GPU"
ours=$(timeout 150 "$bench" sd15 --device cuda --latent 64 --steps "$BENCH_STEPS" --warmup 3 \
    --precision "$precision")
echo "  loractl: $ours"
theirs=""
if [[ $has_torch == 1 ]]; then
    theirs=$(timeout 150 "$PYTHON" scripts/bench/torch_step.py sd15 --device cuda --latent 64 \
        --steps "$BENCH_STEPS" --warmup 3 --precision "$precision")
    echo "  pytorch: $theirs"
else
    echo "  pytorch: skipped: $PYTHON lacks torch with CUDA, diffusers or peft" \
        "($(tail -n1 "$work/python-check.log"))"
fi
"$PYTHON" - "$ours" "$theirs" <<'PY'
"""loractl's step next to PyTorch's: time ratio (above 1: loractl slower) and GPU memory."""
import json, sys

a = json.loads(sys.argv[1])
b = json.loads(sys.argv[2]) if sys.argv[2] else None
mib = lambda v: "-" if v is None else f"{v:.0f}"
print(f'  {"config":<6} {"loractl_ms":>10} {"pytorch_ms":>10} {"ratio":>6} '
      f'{"loractl_gpu_MiB":>15} {"pytorch_gpu_MiB":>15} {"pytorch_alloc_MiB":>17}')
if b is None:
    print(f'  {a["config"]:<6} {a["step_ms"]:10.1f} {"-":>10} {"-":>6} '
          f'{mib(a.get("gpu_used_peak_mib")):>15} {"-":>15} {"-":>17}')
    sys.exit(0)
print(f'  {a["config"]:<6} {a["step_ms"]:10.1f} {b["step_ms"]:10.1f} '
      f'{a["step_ms"] / b["step_ms"]:6.2f} {mib(a.get("gpu_used_peak_mib")):>15} '
      f'{mib(b.get("gpu_used_peak_mib")):>15} {mib(b.get("peak_gpu_mib")):>17}')
print("  (gpu_MiB: the device's used memory sampled after forward and after backward, the CUDA"
      " context and allocator caches included, on both sides; pytorch_alloc: PyTorch's peak of"
      " live tensors alone)")
if a["lora_modules"] != b["lora_modules"]:
    sys.exit(f'the two steps train different LoRA modules: {a["lora_modules"]} vs '
             f'{b["lora_modules"]}')
PY
done
echo "gpu-check.sh: ok"
