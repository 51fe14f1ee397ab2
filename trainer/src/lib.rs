//! loractl's training engine: Stable Diffusion 1.x/2.x models in candle with kohya-style LoRA.
pub mod error;
pub use error::{Error, Result};
