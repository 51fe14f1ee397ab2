#!/usr/bin/env python3
"""One LoRA training step (forward, backward, AdamW) of a diffusers UNet with peft LoRA on
kohya's UNet targets, timed the same way as `lora-bench` so the two run side by side.

Usage: torch_step.py CONFIG [--steps N] [--warmup N] [--threads N] [--device cpu|cuda|cuda:N]
                     [--precision f32|bf16|fp16]
Prints one JSON line: {"impl": "pytorch", "config", "step_ms" (median), "peak_rss_mib", ...}.
On a GPU the step runs in f32 without TF32 (as loractl's does) and ends with a device
synchronisation before its time is taken; "peak_gpu_mib" is PyTorch's peak of allocated memory.
Requirements: scripts/fixtures/requirements.txt (torch, diffusers, peft).
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

# kohya networks/lora.py: every Linear/Conv2d inside Transformer2DModel blocks.
KOHYA_UNET_TARGETS = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$"


def process_cpu_seconds():
    """CPU time of every thread of this process, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["f32", "bf16", "fp16"], default="f32",
                    help="dtype of the frozen UNet; the LoRA and AdamW stay f32 (peft keeps "
                         "adapters in f32 on a half-precision base)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: this PyTorch sees no GPU")
        # loractl computes in full f32 on the GPU: no TF32 in matmuls or convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "unet_configs.json")) as f:
        spec = json.load(f)[args.config]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"])
    unet.requires_grad_(False)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=KOHYA_UNET_TARGETS,
                     init_lora_weights=True)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    unet = unet.to(dtype)
    unet = inject_adapter_in_model(cfg, unet).to(device)
    for n, p in unet.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    n_modules = sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A.default"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    h, w = spec["latent"]
    seq, dim = spec["context"]
    x = torch.randn(1, 4, h, w, device=device, dtype=dtype)
    ctx = torch.randn(1, seq, dim, device=device, dtype=dtype)
    target = torch.randn(1, 4, h, w, device=device)
    times = []
    cpu_seconds = 0.0
    for i in range(args.warmup + args.steps):
        t = torch.randint(0, 1000, (1,), device=device)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        cpu_start = process_cpu_seconds()
        out = unet(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
            cpu_seconds += process_cpu_seconds() - cpu_start
    print(json.dumps({
        "impl": "pytorch",
        "config": args.config,
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "step_cpu_pct": 100 * cpu_seconds / (sum(times) / 1000),
        "device": args.device,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "lora_modules": n_modules,
        "lora_params": sum(p.numel() for p in params),
        "threads": args.threads,
        "precision": args.precision,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
