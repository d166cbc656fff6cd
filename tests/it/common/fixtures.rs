//! Paths and readers for ../shared/fixtures (see its README.md), and for the fixtures of
//! this repository's own in tests/fixtures (a model of a family that ../shared lacks, with
//! its reference, made by tests/fixtures/gen_gemma3.py).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};

/// The fixture models of the 2024-2026 families: the seven of ../shared and Gemma 3.
pub const MODERN: [&str; 8] = [
    "tiny-llama3",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-gemma2",
    "tiny-phi3",
    "tiny-pythia",
    "tiny-gemma3",
];

pub fn root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    assert!(root.exists(), "{} is missing: the shared fixtures sit beside the checkout", root.display());
    root
}

/// This repository's fixtures.
fn own() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture model's checkpoint folder. The repository's own models keep only their
/// config and weights; they are assembled once per process in a temporary folder with the
/// shared Llama-2 tokenizer they were made with.
pub fn model_dir(name: &str) -> PathBuf {
    static OWN: OnceLock<PathBuf> = OnceLock::new();
    if !own().join(name).exists() {
        return root().join("models").join(name);
    }
    let base = OWN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fusellm-own-fixtures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for entry in
            std::fs::read_dir(own()).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().join("config.json").exists())
        {
            let model = dir.join(entry.file_name());
            std::fs::create_dir_all(&model).unwrap();
            for file in ["config.json", "model.safetensors"] {
                std::fs::copy(entry.path().join(file), model.join(file)).unwrap();
            }
            std::fs::copy(root().join("tokenizers/llama2/tokenizer.json"), model.join("tokenizer.json")).unwrap();
        }
        dir
    });
    base.join(name)
}

/// A reference file: the repository's own where it has one, else the shared one.
fn reference(file: &str) -> PathBuf {
    let own = own().join("reference").join(file);
    if own.exists() {
        own
    } else {
        root().join("reference").join(file)
    }
}

/// All tensors of a reference safetensors file.
pub fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference(file), &Device::Cpu).unwrap()
}

pub fn json(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(reference(file)).unwrap()).unwrap()
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}
