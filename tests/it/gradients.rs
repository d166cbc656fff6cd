//! Every parameter of every architecture the block library executes receives a non-zero
//! gradient: candle's fused ops would silently cut gradients, the block library must not.

use crate::common::fixtures;
use candle_core::{Device, Tensor};
use fusellm_core::model::loss::clm_loss;
use fusellm_core::model::Transformer;
use fusellm_core::plugins::Registry;
use fusellm_sdk::adapter::Positions;
use fusellm_sdk::{CheckpointFiles, ModelSpec, PluginKind};

/// The spec a built-in adapter makes of a config.json.
fn spec(adapter: &str, config: serde_json::Value) -> ModelSpec {
    let registry = Registry::with_builtins().unwrap();
    let entry = registry.get(PluginKind::Adapter, adapter).unwrap();
    let params = entry.resolve_params(&Default::default()).unwrap();
    entry.adapt(&params, CheckpointFiles { config_json: &config.to_string(), tokenizer_json: None }).unwrap()
}

fn fixture_config(model: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures::model_dir(model).join("config.json")).unwrap()).unwrap()
}

/// Trains nothing: one CLM loss on a fresh model, and the gradient of every parameter.
fn assert_every_parameter_learns(label: &str, spec: &ModelSpec) {
    let model = Transformer::init(spec, 7, 0.2, candle_core::DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 7919) % spec.vocab_size as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    let loss = clm_loss(&model.forward(&ids, None).unwrap(), &ids).unwrap();
    let grads = loss.backward().unwrap();
    assert!(!model.vars().is_empty());
    for (name, var) in model.vars() {
        let g = grads.get(var).unwrap_or_else(|| panic!("{label}: `{name}` receives no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{label}: `{name}` has gradient norm {norm}");
    }
}

#[test]
fn llama_family_with_grouped_query_attention_and_biases() {
    for adapter in ["llama", "openllama"] {
        let mut config = fixture_config("tiny-llama2");
        config["vocab_size"] = 512.into();
        assert_every_parameter_learns(adapter, &spec(adapter, config.clone()));
        config["num_key_value_heads"] = 2.into();
        config["attention_bias"] = true.into();
        config["mlp_bias"] = true.into();
        config["tie_word_embeddings"] = true.into();
        assert_every_parameter_learns(&format!("{adapter} (GQA, biases, tied)"), &spec(adapter, config));
    }
}

#[test]
fn mpt_with_and_without_biases_and_clipping() {
    let mut config = fixture_config("tiny-mpt");
    config["vocab_size"] = 512.into();
    assert_every_parameter_learns("mpt", &spec("mpt", config.clone()));
    config["no_bias"] = false.into();
    config["attn_config"]["clip_qkv"] = 6.0.into();
    config["tie_word_embeddings"] = false.into();
    let untied = spec("mpt", config);
    assert_eq!(untied.tensor_names["lm_head.weight"], "lm_head.weight");
    assert_every_parameter_learns("mpt (biases, clip_qkv, untied)", &untied);
}

#[test]
fn learned_positions_and_parallel_residual_with_partial_rotary() {
    let mut config = fixture_config("tiny-mpt");
    config["vocab_size"] = 512.into();
    let mut learned = spec("mpt", config);
    learned.positions = Positions::Learned;
    learned.max_positions = 64;
    learned.tensor_names.insert("pos_embed.weight".into(), "transformer.wpe.weight".into());
    assert_every_parameter_learns("learned positions", &learned);

    let mut config = fixture_config("tiny-llama2");
    config["vocab_size"] = 512.into();
    let mut neox_like = spec("llama", config);
    neox_like.residual = fusellm_sdk::adapter::Residual::Parallel;
    neox_like.positions = Positions::Rope { theta: 10_000.0, fraction: 0.25, scaling: Default::default() };
    assert_every_parameter_learns("parallel residual, partial rotary", &neox_like);
}

#[test]
fn every_fixture_checkpoint_trains_in_every_parameter() {
    use fusellm_core::checkpoint::Checkpoint;
    use fusellm_core::model::LoadMode;
    for name in ["tiny-llama2", "tiny-openllama", "tiny-mpt"] {
        let registry = Registry::with_builtins().unwrap();
        let checkpoint = Checkpoint::open(&fixtures::model_dir(name), &registry, None).unwrap();
        let model = checkpoint.load_model(LoadMode::Trainable, candle_core::DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[5u32, 17, 300, 2, 8, 9]], &Device::Cpu).unwrap();
        let loss = clm_loss(&model.forward(&ids, None).unwrap(), &ids).unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(model.vars().len(), if name == "tiny-mpt" { 14 } else { 21 });
        for (param, var) in model.vars() {
            let norm = grads.get(var).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name}: `{param}` has no gradient");
        }
    }
}
