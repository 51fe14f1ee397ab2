//! loractl's training engine: Stable Diffusion 1.x/2.x models in candle with kohya-style LoRA.
//!
//! - [`nn`]: frozen layers with input-only gradients, differentiable norms/softmax, LoRA sites.
//! - [`lora`]: kohya LoRA networks (targets, init, file format).
//! - [`clip`]: SD1/SD2 CLIP text encoders; [`tokenizer`]: CLIP's BPE tokenizer.
//! - [`weights`]: memory-mapped tensor stores and key maps between checkpoint layouts.
pub mod clip;
pub mod error;
pub mod lora;
pub mod nn;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
