//! loractl's training engine: Stable Diffusion 1.x/2.x models in candle with kohya-style LoRA.
//!
//! - [`nn`] — frozen layers with input-only gradients, differentiable norms/softmax, LoRA sites.
//! - [`lora`] — kohya LoRA networks (targets, init, file format).
//! - [`unet`] — the SD1.x/SD2.x UNet (diffusers and single-file LDM weights).
//! - [`vae`] — the AutoencoderKL encoder/decoder.
//! - [`clip`] — the SD1/SD2 CLIP text encoders (clip skip, kohya long prompts, checkpoint layouts).
//! - [`tokenizer`] — CLIP's BPE tokenizer with transformers' slow-tokenizer ids.
//! - [`schedule`] — the DDPM noise schedule (noising, velocity, SNR).
//! - [`weights`] — memory-mapped tensor stores and key maps between checkpoint layouts.
//! - [`optim`] — optimizers.
//! - [`sample`] — preview images (sd-scripts' `--sample_prompts`): samplers, prompt files, PNGs.
pub mod clip;
pub mod error;
pub mod lora;
pub mod nn;
pub mod optim;
pub mod sample;
pub mod schedule;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
