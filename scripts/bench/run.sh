#!/usr/bin/env bash
# One LoRA training step (forward, backward, AdamW; rank 8 / alpha 8 on kohya's UNet targets,
# batch 1, one timestep per sample) in loractl and in diffusers + peft, side by side.
# Usage: [PRECISION=bf16] [BENCH_ARGS=...] scripts/bench/run.sh [CONFIG...]
#        (default configs: tiny small sd15)
# BENCH_ARGS go to both sides: --text-encoder (train the config's CLIP text encoder too),
# --latent SIZE, --rank R, --alpha A, --warmup N.
# Needs Python with scripts/fixtures/requirements.txt installed; PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-5}
# The frozen UNet's dtype on both sides (f32, bf16 or fp16); the LoRA and AdamW stay f32.
PRECISION=${PRECISION:-f32}
read -r -a extra <<< "${BENCH_ARGS:-}"
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(tiny small sd15)
cargo build --release -q -p loractl-trainer --bin lora-bench
printf '%-6s %14s %14s %8s %16s %16s %12s %12s\n' config loractl_ms pytorch_ms ratio loractl_peak_MiB pytorch_peak_MiB loractl_cpu% pytorch_cpu%
for c in "${configs[@]}"; do
  ours=$(target/release/lora-bench "$c" --steps "$STEPS" --precision "$PRECISION" ${extra[@]+"${extra[@]}"})
  theirs=$("$PYTHON" scripts/bench/torch_step.py "$c" --steps "$STEPS" --precision "$PRECISION" ${extra[@]+"${extra[@]}"})
  "$PYTHON" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert a["lora_modules"] == b["lora_modules"], (a["lora_modules"], b["lora_modules"])
print(f'{a["config"]:<6} {a["step_ms"]:14.1f} {b["step_ms"]:14.1f} {a["step_ms"]/b["step_ms"]:8.2f} '
      f'{a["peak_rss_mib"]:16.0f} {b["peak_rss_mib"]:16.0f} '
      f'{a["step_cpu_pct"]:12.0f} {b["step_cpu_pct"]:12.0f}')
PY
done
