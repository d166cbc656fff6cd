//! The memory estimate of `fusellm validate` against the published figures: Llama-2-7B's
//! parameter count, and DeepSpeed's per-GPU model states (ZeRO paper, mixed-precision Adam:
//! (2 + 2 + 12) x params alone, 2 + 2 + 12 / N with ZeRO-1 on N GPUs).

use fusellm_core::model::lora::LoraSpec;
use fusellm_core::plugins::Registry;
use fusellm_core::train::memory::{estimate, lora_parameters, parameters, Layout};
use fusellm_core::train::{LoraTraining, Precision};
use fusellm_sdk::{CheckpointFiles, ModelSpec, PluginKind};

/// Llama-2-7B's config.json, read by the llama adapter.
fn llama2_7b() -> ModelSpec {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "hidden_act": "silu"
    })
    .to_string();
    let registry = Registry::with_builtins().unwrap();
    let entry = registry.get(PluginKind::Adapter, "llama").unwrap();
    let params = entry.resolve_params(&Default::default()).unwrap();
    entry.adapt(&params, CheckpointFiles { config_json: &config, tokenizer_json: None }).unwrap()
}

#[test]
fn the_estimate_counts_model_states_as_deepspeed_does() {
    let spec = llama2_7b();
    let psi = parameters(&spec);
    assert_eq!(psi, 6_738_415_616, "Llama-2-7B's published count");
    let mut train = crate::training::config(1, Precision::Bf16);
    train.batching.batch_size = 1;
    train.batching.seq_len = 2048;
    let states = |e: fusellm_core::train::memory::Estimate| e.weights + e.gradients + e.optimizer;
    let alone = estimate(&spec, &train, Layout { ranks: 1, zero: 0, checkpointing: false });
    assert_eq!(states(alone), 16 * psi);
    let zero = estimate(&spec, &train, Layout { ranks: 8, zero: 1, checkpointing: false });
    assert_eq!(states(zero), 4 * psi + (12 * psi).div_ceil(8));
    let plain = estimate(&spec, &train, Layout { ranks: 8, zero: 0, checkpointing: false });
    assert_eq!(states(plain), states(alone), "without ZeRO every rank holds everything");
    // Checkpointing keeps each block's input: a fraction of the activations.
    let checkpointed = estimate(&spec, &train, Layout { ranks: 1, zero: 0, checkpointing: true });
    assert!(checkpointed.activations * 10 < alone.activations, "{checkpointed:?} {alone:?}");
    // f32 training has no master copy: 4 + 4 + 8 bytes per parameter.
    let f32_train = crate::training::config(1, Precision::F32);
    assert_eq!(states(estimate(&spec, &f32_train, Layout { ranks: 1, zero: 0, checkpointing: false })), 16 * psi);
}

/// PEFT prints "trainable params: 4,194,304 || all params: 6,742,609,920" for LoRA r = 8 on
/// Llama-2-7B's q_proj and v_proj; only those have gradients and optimizer state.
#[test]
fn the_estimate_of_a_lora_run_counts_the_adapters_as_peft_does() {
    let spec = llama2_7b();
    let adapter = LoraSpec { rank: 8, alpha: 16.0, dropout: 0.05, targets: vec!["q_proj".into(), "v_proj".into()] };
    let lora = lora_parameters(&spec, &adapter);
    assert_eq!(lora, 4_194_304);
    assert_eq!(parameters(&spec) + lora, 6_742_609_920);
    let mut train = crate::training::config(1, Precision::Bf16);
    train.lora = Some(LoraTraining { adapter, merge: false });
    let e = estimate(&spec, &train, Layout { ranks: 1, zero: 0, checkpointing: false });
    assert_eq!((e.weights, e.gradients, e.optimizer), (2 * 6_742_609_920, 2 * lora, 12 * lora));
}
