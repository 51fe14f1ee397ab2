#!/usr/bin/env python3
"""Writes a random-weight checkpoint with the exact SD1.5 architecture and LDM key layout (fp16
single-file .safetensors, about 2 GB) for load-memory and speed measurements without
downloading a real model. Uses the fixture generator's own diffusers->LDM mapping.

Usage: make_sd15_shaped.py OUT.safetensors
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_fixtures as mf  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768))
    sd = mf.build_ldm_state_dict("sd1", unet, vae, te)
    sd = mf.cast_sd(sd, torch.float16)
    save_file(sd, str(out))
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB, {len(sd)} tensors)")


if __name__ == "__main__":
    main()
