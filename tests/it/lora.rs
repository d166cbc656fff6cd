//! LoRA (`[train.lora]`): only the adapters train; a checkpoint holds them as PEFT writes
//! them (adapter_config.json, adapter_model.safetensors with PEFT's names and shapes); the
//! merged checkpoint is `W + (alpha / r) B A`; an unmerged one loads as its base plus the
//! adapter; a resumed run is bit-identical; checkpointed activations give the same
//! gradients, dropout included.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::lora::LoraSpec;
use fusellm_core::model::loss::{LossBatch, Objective};
use fusellm_core::plugins::Registry;
use fusellm_core::train::{LoraTraining, Precision, TrainConfig};

use crate::common::fixtures;
use crate::training::{config, documents, scratch, train};

const TARGETS: [&str; 3] = ["q_proj", "v_proj", "down_proj"];

fn adapter(dropout: f64) -> LoraSpec {
    LoraSpec { rank: 4, alpha: 8.0, dropout, targets: TARGETS.iter().map(|t| t.to_string()).collect() }
}

fn lora_config(steps: u64, merge: bool) -> TrainConfig {
    TrainConfig { lora: Some(LoraTraining { adapter: adapter(0.1), merge }), ..config(steps, Precision::F32) }
}

fn load(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn tiny_llama() -> (Registry, Checkpoint) {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    (registry, checkpoint)
}

#[test]
fn lora_trains_only_the_adapters_writes_peft_files_and_merges_to_w_plus_scaled_ba() {
    let (registry, target) = tiny_llama();
    let run = scratch("lora");
    let end = train(&run, documents(&target, 16), &lora_config(4, true), false, None).unwrap();
    let base = load(&target.dir.join("model.safetensors"));
    let adapter = load(&end.join("adapter_model.safetensors"));

    // PEFT's names and shapes: A [r, in] and B [out, r] on each targeted projection.
    let mut expected = Vec::new();
    for (name, w) in &base {
        let Some(module) = name.strip_suffix(".weight").filter(|m| TARGETS.iter().any(|t| m.ends_with(t))) else {
            continue;
        };
        let (out, inp) = w.dims2().unwrap();
        expected.push((format!("base_model.model.{module}.lora_A.weight"), vec![4, inp]));
        expected.push((format!("base_model.model.{module}.lora_B.weight"), vec![out, 4]));
    }
    expected.sort();
    let mut written: Vec<(String, Vec<usize>)> = adapter.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    written.sort();
    assert_eq!(written, expected);
    assert_eq!(expected.len(), 2 * 3 * target.spec.layers);
    for (name, t) in &adapter {
        assert!(max_abs(t) > 0.0, "`{name}` is zero after training: no gradient reached it");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(end.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    assert_eq!(config["target_modules"], serde_json::json!(TARGETS));
    assert_eq!(config["base_model_name_or_path"], target.dir.display().to_string());

    // The checkpoints hold the adapter only; the last one the merged model too, in a
    // folder of its own (transformers would apply the adapter beside it again).
    let earlier = end.parent().unwrap().join("step-0000002");
    assert!(earlier.join("adapter_model.safetensors").exists() && !earlier.join("merged").exists());
    assert!(!end.join("model.safetensors").exists());
    let merged_dir = end.join("merged");
    assert!(merged_dir.join("config.json").exists() && !merged_dir.join("adapter_config.json").exists());
    let merged = load(&merged_dir.join("model.safetensors"));
    assert_eq!(merged.len(), base.len());
    for (name, w) in &base {
        let m = &merged[name];
        let module = name.strip_suffix(".weight").unwrap_or(name);
        match adapter.get(&format!("base_model.model.{module}.lora_A.weight")) {
            None => assert_eq!(max_abs(&(m - w).unwrap()), 0.0, "`{name}` is not adapted and changed"),
            Some(a) => {
                let b = &adapter[&format!("base_model.model.{module}.lora_B.weight")];
                let want = (w + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
                let diff = max_abs(&(m - &want).unwrap());
                assert!(diff <= 1e-6 * max_abs(&want), "`{name}`: merged differs from W + (alpha/r) B A by {diff}");
                assert!(max_abs(&(m - w).unwrap()) > 0.0, "`{name}` is adapted and did not change");
            }
        }
    }

    // The checkpoint, without weights of its own, is the base plus the adapter: the same
    // logits as the merged weights.
    let logits = |dir: &Path| {
        let model = Checkpoint::open(dir, &registry, None)
            .unwrap()
            .load_model(fusellm_core::model::LoadMode::Frozen, DType::F32, &Device::Cpu)
            .unwrap();
        let ids: Vec<u32> = documents(&target, 4).iter().flat_map(|d| d.ids.clone()).take(32).collect();
        let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&ids, None).unwrap()
    };
    let (a, b) = (logits(&end), logits(&merged_dir));
    let diff = max_abs(&(&a - &b).unwrap());
    assert!(diff <= 1e-4 * max_abs(&b), "the adapter on its base and the merged model differ by {diff}");
    let training = Checkpoint::open(&end, &registry, None).unwrap().load_model(
        fusellm_core::model::LoadMode::Trainable,
        DType::F32,
        &Device::Cpu,
    );
    assert!(training.err().unwrap().to_string().contains("merge the adapter first"));
}

#[test]
fn a_resumed_lora_run_with_dropout_is_bit_identical() {
    let (_, target) = tiny_llama();
    let docs = documents(&target, 16);
    let config = lora_config(4, false);
    let (whole, split) = (scratch("lora-whole"), scratch("lora-split"));
    let end = train(&whole, docs.clone(), &config, false, None).unwrap();
    train(&split, docs.clone(), &config, false, Some(2)).unwrap();
    let resumed = train(&split, docs, &config, true, None).unwrap();
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let same = std::fs::read(end.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap();
        assert!(same, "{file} differs between the resumed and the uninterrupted run");
    }
    // The resume check covers the adapter: another rank is refused.
    let other = TrainConfig {
        lora: Some(LoraTraining { adapter: LoraSpec { rank: 2, ..adapter(0.1) }, merge: false }),
        ..config.clone()
    };
    let refused = train(&split, documents(&target, 16), &TrainConfig { steps: 6, ..other }, true, None).unwrap_err();
    assert!(refused.report().contains("lora"), "{}", refused.report());
}

/// Gradients of a step with dropout, the blocks kept and recomputed: equal to 1e-6 of
/// each parameter's largest, every adapter matrix reached. B is set to random values
/// first (it starts at zero, where A's gradient is zero too).
#[test]
fn checkpointed_activations_give_lora_the_same_gradients_and_dropout_masks() {
    let (_, target) = tiny_llama();
    let model = target.load_adapted(&adapter(0.2), 3, DType::F32, &Device::Cpu).unwrap();
    let mut rng = fusellm_sdk::rng::Rng::new(11);
    for (name, var) in model.vars() {
        if name.contains("lora_B") {
            let values: Vec<f32> = (0..var.elem_count()).map(|_| (rng.normal() * 0.02) as f32).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let ids: Vec<u32> = documents(&target, 16).iter().flat_map(|d| d.ids.clone()).take(4 * 24).collect();
    let mut batch = LossBatch::sequences(ids, 4).unwrap();
    let objective = Objective { lambda: 1.0, ..Default::default() };
    let mut run = |seed: Option<u64>, checkpointed: bool| {
        batch.dropout_seed = seed;
        let (losses, grads) = model.gradients(&batch, &objective, 1.0, checkpointed).unwrap();
        (losses.total.to_scalar::<f32>().unwrap(), grads)
    };
    let (kept_loss, kept) = run(Some(5), false);
    let (recomputed_loss, recomputed) = run(Some(5), true);
    assert_eq!(kept_loss, recomputed_loss);
    let (other_mask, _) = run(Some(6), false);
    let (no_dropout, _) = run(None, false);
    assert!(other_mask != kept_loss && no_dropout != kept_loss, "dropout changes nothing");
    for (name, var) in model.vars() {
        let a = kept.get(var).unwrap_or_else(|| panic!("`{name}` gets no gradient"));
        let b = recomputed.get(var).unwrap_or_else(|| panic!("`{name}` gets no gradient when recomputed"));
        let scale = max_abs(a);
        assert!(scale > 0.0, "`{name}`'s gradient is zero");
        let diff = max_abs(&(a - b).unwrap());
        assert!(diff <= 1e-6 * scale, "`{name}`: gradients differ by {diff} (largest {scale})");
    }
}

#[test]
fn a_lora_target_that_matches_no_projection_is_an_error_naming_them() {
    let (_, target) = tiny_llama();
    let wrong = LoraSpec { targets: vec!["q_proj".into(), "query_key_value".into()], ..adapter(0.0) };
    let err = target.load_adapted(&wrong, 0, DType::F32, &Device::Cpu).err().expect("a target matching nothing");
    let message = err.to_string();
    assert!(message.contains("[\"query_key_value\"]") && message.contains("\"o_proj\""), "{message}");
}
