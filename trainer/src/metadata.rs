//! The metadata sd-scripts writes into a LoRA file (`ss_*` training facts, `sshs_*` hashes,
//! `modelspec.*`), which A1111's and ComfyUI's LoRA browsers read.

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Which base model the LoRA was trained on, as `modelspec` and `ss_base_model_version` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    Sd1,
    Sd2,
    Sd2V,
}

impl BaseModel {
    pub fn ss_version(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd_v1",
            BaseModel::Sd2 => "sd_v2",
            BaseModel::Sd2V => "sd_v2_v",
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "stable-diffusion-v1/lora",
            BaseModel::Sd2 => "stable-diffusion-v2-512/lora",
            BaseModel::Sd2V => "stable-diffusion-v2-768-v/lora",
        }
    }
    pub fn prediction_type(self) -> &'static str {
        match self {
            BaseModel::Sd2V => "v",
            _ => "epsilon",
        }
    }
}

/// `modelspec.*` keys (Stability's model spec 1.0.1, as sd-scripts fills it for LoRA).
pub fn modelspec(
    base: BaseModel,
    title: &str,
    resolution: (usize, usize),
    date: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("modelspec.{k}"), v);
    };
    put("sai_model_spec", "1.0.1".into());
    put("architecture", base.architecture().into());
    put("implementation", "diffusers".into());
    put("title", title.into());
    put("resolution", format!("{}x{}", resolution.0, resolution.1));
    put("date", date.into());
    put("prediction_type", base.prediction_type().into());
    // sd-scripts writes `sd-scripts/<commit>`: the implementation that wrote the file.
    put(
        "implementation_version",
        format!("loractl/{}", env!("CARGO_PKG_VERSION")),
    );
    m
}

/// sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` for `tensors` saved with `metadata`:
/// the hash is taken over the file as written with only the `ss_*` keys (the ones meant to be
/// immutable), so renaming a title later doesn't change it. Model hash = sha256 of the bytes
/// after the header; legacy hash = first 8 hex digits of sha256 of bytes 0x100000..0x110000.
pub fn sshs_hashes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<(String, String)> {
    let ss: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = crate::lora::serialize_safetensors(tensors, &ss)?;
    if bytes.len() < 8 {
        return Err(Error::Lora(
            "serialised LoRA is shorter than its header".into(),
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let header = u64::from_le_bytes(n) as usize;
    let data = bytes.get(8 + header..).unwrap_or(&[]);
    let model_hash = hex(&Sha256::digest(data));
    let start = 0x100000.min(bytes.len());
    let end = (0x100000 + 0x10000).min(bytes.len());
    let legacy = hex(&Sha256::digest(&bytes[start..end]));
    Ok((model_hash, legacy[..8].to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hashes_ignore_non_ss_metadata_and_match_a_hand_computation() -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a.lora_down.weight".to_string(),
            Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?,
        );
        let mut meta = HashMap::new();
        meta.insert("ss_network_dim".to_string(), "4".to_string());
        let (h1, l1) = sshs_hashes(&tensors, &meta)?;
        meta.insert("modelspec.title".to_string(), "renamed".to_string());
        let (h2, l2) = sshs_hashes(&tensors, &meta)?;
        assert_eq!((h1.clone(), l1.clone()), (h2, l2));
        // The data block of this file is the 12 f32 values, little-endian.
        let data: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert_eq!(h1, hex(&Sha256::digest(&data)));
        // A file shorter than 1 MiB hashes the empty slice for the legacy hash.
        assert_eq!(l1, hex(&Sha256::digest(b""))[..8]);
        Ok(())
    }

    #[test]
    fn modelspec_names_the_architecture() {
        let m = modelspec(BaseModel::Sd2V, "zenny", (768, 768), "2026-01-01T00:00:00");
        assert_eq!(
            m["modelspec.architecture"],
            "stable-diffusion-v2-768-v/lora"
        );
        assert_eq!(m["modelspec.prediction_type"], "v");
        assert_eq!(m["modelspec.resolution"], "768x768");
    }
}
