//! Bad checkpoints and inputs get clear errors, never panics.

use std::path::{Path, PathBuf};

use crate::common::fixtures;
use candle_core::{DType, Device, Tensor};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::{LoadMode, Transformer};
use fusellm_core::plugins::Registry;

/// A copy of a fixture checkpoint's small files (config edited by `edit`), with its
/// weights linked, in a fresh folder.
fn variant(name: &str, model: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-bad-model-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures::model_dir(model);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let registry = Registry::with_builtins().unwrap();
    let result =
        Checkpoint::open(dir, &registry, None).and_then(|c| c.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu));
    match result {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.report(),
    }
}

fn assert_contains(message: &str, needle: &str) {
    assert!(message.contains(needle), "expected {needle:?} in:\n{message}");
}

#[test]
fn a_folder_without_config_or_weights_is_named() {
    let empty = std::env::temp_dir().join(format!("fusellm-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_contains(&load_error(&empty), "has no readable config.json");

    let dir = variant("no-weights", "tiny-llama2", |_| {});
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_contains(&load_error(&dir), "has no weights: expected model.safetensors or model.safetensors.index.json");
    assert_contains(&load_error(Path::new("/nonexistent/model")), "is not a checkpoint folder");
}

#[test]
fn an_unknown_architecture_or_a_missing_field_is_named() {
    let dir = variant("bert", "tiny-llama2", |c| c["model_type"] = "bert".into());
    assert_contains(
        &load_error(&dir),
        "no adapter understands model_type `bert`; known: gemma, gemma2, gemma3_text, gpt_neox, llama, mistral, mpt, phi3, qwen2, qwen3; load an adapter plugin for it",
    );
    let dir = variant("typo", "tiny-mpt", |c| c["model_type"] = "mtp".into());
    assert_contains(&load_error(&dir), "did you mean `mpt`?");
    let dir = variant("missing", "tiny-llama2", |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert_contains(&load_error(&dir), "config.json: missing `hidden_size` (a positive integer)");
    let dir = variant("wrong-type", "tiny-mpt", |c| c["n_heads"] = "four".into());
    assert_contains(&load_error(&dir), "config.json: `n_heads` must be a non-negative integer, found \"four\"");
}

#[test]
fn weights_that_disagree_with_the_config_name_the_tensor_and_both_shapes() {
    let dir = variant("shapes", "tiny-llama2", |c| c["intermediate_size"] = 170.into());
    assert_contains(
        &load_error(&dir),
        "tensor `model.layers.0.mlp.gate_proj.weight` has shape [172, 64] but config.json implies [170, 64]",
    );
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    let dir = variant("vocab", "tiny-llama2", |c| c["vocab_size"] = 1000.into());
    assert_contains(
        &load_error(&dir),
        "the tokenizer's vocabulary has 32000 tokens but the model's embedding only 1000 rows",
    );
}

#[test]
fn a_sequence_longer_than_the_maximum_is_refused() {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-mpt"), &registry, None).unwrap();
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::zeros((1, 513), DType::U32, &Device::Cpu).unwrap();
    let e = fusellm_core::error::report(&model.forward(&ids, None).unwrap_err());
    assert_contains(&e, "a sequence of 513 tokens is longer than the model's maximum of 512 positions");
    let too_big = Tensor::new(&[[5u32, 60_000]], &Device::Cpu).unwrap();
    assert_contains(
        &fusellm_core::error::report(&model.forward(&too_big, None).unwrap_err()),
        "token id 60000 is outside the model's embedding of 50432 rows",
    );
}

#[test]
fn bf16_on_the_cpu_is_refused_before_loading() {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    let e = Transformer::load(&checkpoint.dir, &checkpoint.spec, LoadMode::Frozen, DType::BF16, &Device::Cpu)
        .err()
        .unwrap();
    assert_contains(&fusellm_core::error::report(&e), "bf16 is not supported on the CPU");
}
