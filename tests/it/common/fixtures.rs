//! Paths and readers for ../shared/fixtures (see its README.md).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    assert!(root.exists(), "{} is missing: the shared fixtures sit beside the checkout", root.display());
    root
}

pub fn model_dir(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// All tensors of a reference safetensors file.
pub fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("reference").join(file), &Device::Cpu).unwrap()
}

pub fn json(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("reference").join(file)).unwrap()).unwrap()
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}
