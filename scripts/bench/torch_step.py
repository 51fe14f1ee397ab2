#!/usr/bin/env python3
"""One LoRA training step (forward, backward, AdamW) of a diffusers UNet with peft LoRA on
kohya's UNet targets, timed the same way as `lora-bench` so the two run side by side. With
--text-encoder the config's transformers CLIP text encoder, with LoRA on kohya's text-encoder
targets, encodes fixed token ids into the UNet's context and is trained too.

Usage: torch_step.py CONFIG [--steps N] [--warmup N] [--threads N] [--device cpu|cuda|cuda:N]
                     [--precision f32|bf16|fp16] [--text-encoder] [--latent SIZE]
Prints one JSON line: {"impl": "pytorch", "config", "step_ms" (median), "peak_rss_mib", ...}.
On a GPU the step runs in f32 without TF32 (as loractl's does) and ends with a device
synchronisation before its time is taken; "peak_gpu_mib" is PyTorch's peak of allocated memory
and "gpu_used_peak_mib" the device's used memory after forward and after backward, sampled as
lora-bench samples it.
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
from transformers import CLIPTextConfig, CLIPTextModel

# kohya networks/lora.py: every Linear/Conv2d inside Transformer2DModel blocks.
KOHYA_UNET_TARGETS = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$"
# kohya networks/lora.py: every Linear inside CLIPAttention and CLIPMLP.
KOHYA_TE_TARGETS = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"


def with_lora(model, targets, args, dtype, device):
    """The frozen `model` in `dtype` with peft LoRA (f32) on `targets`, moved to `device`."""
    model.requires_grad_(False)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                     init_lora_weights=True)
    model = inject_adapter_in_model(cfg, model.to(dtype)).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


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
    ap.add_argument("--latent", type=int, help="train on SIZE x SIZE latents instead of the config's")
    ap.add_argument("--text-encoder", action="store_true",
                    help="train the config's CLIP text encoder's LoRA as well")
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
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    unet = with_lora(UNet2DConditionModel(**spec["unet"]), KOHYA_UNET_TARGETS, args, dtype, device)
    models = [unet]
    te = None
    if args.text_encoder:
        te_cfg = CLIPTextConfig(**spec["text_encoder"])
        te = with_lora(CLIPTextModel(te_cfg), KOHYA_TE_TARGETS, args, dtype, device)
        models.append(te)
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    n_modules = sum(1 for m in models for n, _ in m.named_modules()
                    if n.endswith("lora_A.default"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    h, w = (args.latent, args.latent) if args.latent else spec["latent"]
    seq, dim = spec["context"]
    x = torch.randn(1, 4, h, w, device=device, dtype=dtype)
    ctx = torch.randn(1, seq, dim, device=device, dtype=dtype)
    if te is not None:
        vocab = spec["text_encoder"]["vocab_size"]
        ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(seq)]], device=device)
    target = torch.randn(1, 4, h, w, device=device)
    times = []
    cpu_seconds = 0.0
    # The device's used memory (all processes, as nvidia-smi shows it) at the step's high
    # points, sampled as lora-bench samples it.
    used_peak = None

    def sample_used():
        nonlocal used_peak
        if cuda:
            free, total = torch.cuda.mem_get_info(device)
            used_peak = max(used_peak or 0, total - free)
    for i in range(args.warmup + args.steps):
        t = torch.randint(0, 1000, (1,), device=device)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        cpu_start = process_cpu_seconds()
        if te is not None:
            ctx = te(ids).last_hidden_state
        out = unet(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        sample_used()
        loss.backward()
        sample_used()
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
        "gpu_used_peak_mib": used_peak / 2**20 if used_peak is not None else None,
        "lora_modules": n_modules,
        "lora_params": sum(p.numel() for p in params),
        "threads": args.threads,
        "precision": args.precision,
        "text_encoder": args.text_encoder,
        "latent": [h, w],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
