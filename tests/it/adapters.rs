//! Model adapters in every tier: the built-in adapters give the same spec as builtin, dylib
//! and WASM plugins, and a third-party adapter (the GPT-NeoX-shaped template, a dylib)
//! runs a model whose `model_type` fusellm does not build in.

use std::path::PathBuf;

use crate::common::{dylib, fixtures, registry_of, stage_dir, wasm};
use candle_core::{DType, Device, Tensor};
use fusellm_core::align::normalize::{Normalizer, EOS};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::generate::greedy;
use fusellm_core::model::loss::clm_loss;
use fusellm_core::model::{LoadMode, Transformer};
use fusellm_core::plugins::{Registry, Tier, WasmLimits};
use fusellm_sdk::adapter::{Positions, QkvLayout, Residual};
use fusellm_sdk::{CheckpointFiles, ModelSpec, PluginKind, TokenizerConventions};

fn adapt(registry: &Registry, adapter: &str, model_dir: &std::path::Path) -> ModelSpec {
    let config = std::fs::read_to_string(model_dir.join("config.json")).unwrap();
    let tokenizer = std::fs::read_to_string(model_dir.join("tokenizer.json")).ok();
    let entry = registry.get(PluginKind::Adapter, adapter).unwrap();
    let params = entry.resolve_params(&Default::default()).unwrap();
    entry.adapt(&params, CheckpointFiles { config_json: &config, tokenizer_json: tokenizer.as_deref() }).unwrap()
}

#[test]
fn built_in_adapters_give_the_same_spec_in_every_tier() {
    let builtin = Registry::with_builtins().unwrap();
    for (krate, adapter, model) in [
        ("fusellm_llama", "llama", "tiny-llama2"),
        ("fusellm_llama", "openllama", "tiny-openllama"),
        ("fusellm_mpt", "mpt", "tiny-mpt"),
        ("fusellm_llama", "llama", "tiny-llama3"),
        ("fusellm_llama", "qwen2", "tiny-qwen2"),
        ("fusellm_llama", "qwen3", "tiny-qwen3"),
        ("fusellm_llama", "mistral", "tiny-mistral"),
        ("fusellm_gemma", "gemma2", "tiny-gemma2"),
        ("fusellm_phi3", "phi3", "tiny-phi3"),
        ("fusellm_gpt_neox", "gpt_neox", "tiny-pythia"),
    ] {
        let dir = fixtures::model_dir(model);
        let expected = adapt(&builtin, adapter, &dir);
        for (tier, file) in [(Tier::Dylib, dylib(krate)), (Tier::Wasm, wasm(krate))] {
            let registry = registry_of(tier, &file, WasmLimits::default());
            assert_eq!(adapt(&registry, adapter, &dir), expected, "{adapter} as {tier}");
        }
    }
}

#[test]
fn tokenizer_conventions_come_with_the_spec() {
    let registry = Registry::with_builtins().unwrap();
    let llama = adapt(&registry, "llama", &fixtures::model_dir("tiny-llama2")).tokenizer;
    assert_eq!((llama.space_marker.as_str(), llama.byte_fallback, llama.byte_level), ("\u{2581}", true, false));
    assert_eq!(
        (llama.add_bos, llama.bos.as_deref(), llama.eos.as_slice()),
        (true, Some("<s>"), ["</s>".to_string()].as_slice())
    );
    let mpt = adapt(&registry, "mpt", &fixtures::model_dir("tiny-mpt")).tokenizer;
    assert_eq!((mpt.space_marker.as_str(), mpt.byte_fallback, mpt.byte_level), ("\u{0120}", false, true));
    assert_eq!((mpt.add_bos, mpt.bos.as_deref()), (false, None));
    assert!(mpt.special_tokens.contains(&"<|endoftext|>".to_string()));
    let openllama = adapt(&registry, "openllama", &fixtures::model_dir("tiny-openllama")).tokenizer;
    assert!(openllama.special_tokens.contains(&"[PAD]".to_string()));
    // config.json's eos_token_id list names Llama 3's three end tokens; tokenizer.json
    // alone knows only the first by its name. The aligners read all three as one EOS.
    let llama3 = adapt(&registry, "llama", &fixtures::model_dir("tiny-llama3")).tokenizer;
    assert_eq!(llama3.eos, ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]);
    let alone = TokenizerConventions::from_tokenizer_json(
        &std::fs::read_to_string(fixtures::model_dir("tiny-llama3").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(alone.eos, ["<|end_of_text|>"]);
    let normalizer = Normalizer::new(&llama3);
    assert!(llama3.eos.iter().all(|e| normalizer.canonical(e) == EOS));
    // An id the stand-in tokenizer lacks (Phi-3's 32000 in a 32000-token tokenizer) leaves
    // the EOS the names give.
    let phi3 = adapt(&registry, "phi3", &fixtures::model_dir("tiny-phi3")).tokenizer;
    assert_eq!(phi3.eos, ["</s>"]);
}

/// A tiny Pythia-shaped checkpoint: config.json, fresh weights written under the names the
/// adapter gives, and the GPT-NeoX tokenizer.
fn neox_checkpoint(registry: &Registry, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-neox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "neox_example", "vocab_size": 50304, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu", "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "max_position_embeddings": 128, "layer_norm_eps": 1e-5,
        "use_parallel_residual": true, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(fixtures::root().join("tokenizers/gpt-neox-20b/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let spec = adapt(registry, "neox_example", &dir);
    Transformer::init(&spec, 3, 0.2, candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .save_weights(&dir.join("model.safetensors"))
        .unwrap();
    dir
}

#[test]
fn a_third_party_dylib_adapter_runs_gpt_neox() {
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_file(Tier::Dylib, &dylib("gpt_neox_adapter")).unwrap();
    let dir = neox_checkpoint(&registry, "run");

    let checkpoint = Checkpoint::open(&dir, &registry, None).unwrap();
    assert_eq!(checkpoint.adapter, "neox_example", "chosen by config.json's model_type");
    let spec = &checkpoint.spec;
    assert_eq!((spec.residual, spec.attention.qkv, spec.rotary_dim()), (Residual::Parallel, QkvLayout::PerHead, 2));
    assert!(matches!(spec.positions, Positions::Rope { fraction, .. } if fraction == 0.25));

    let model = checkpoint.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(checkpoint.tokenizer.encode("Pythia is GPT-NeoX shaped.").unwrap().as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims()[2], 50304);
    let loss = clm_loss(&logits, &ids).unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(model.vars().len(), 2 * 12 + 4, "embed, head, final norm (2) and 12 tensors per layer");
    for (name, var) in model.vars() {
        let norm = grads.get(var).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "`{name}` receives no gradient");
    }
    let frozen = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(greedy(&frozen, &checkpoint.tokenizer.encode("Hello").unwrap(), 4).unwrap().len(), 4);
}

#[test]
fn per_head_and_chunked_qkv_layouts_agree_once_the_rows_are_permuted() {
    // The same attention written both ways: GPT-NeoX groups the fused rows per head
    // ([q_h | k_h | v_h] for each head h), MPT chunks them ([q | k | v]).
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_file(Tier::Dylib, &dylib("gpt_neox_adapter")).unwrap();
    let per_head = Checkpoint::open(&neox_checkpoint(&registry, "layouts"), &registry, None).unwrap();
    let model = per_head.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap();
    let (h, d) = (per_head.spec.attention.heads, per_head.spec.attention.head_dim);
    let mut chunked_spec = per_head.spec.clone();
    chunked_spec.attention.qkv = QkvLayout::Chunked;
    let chunked = Transformer::init(&chunked_spec, 3, 0.2, candle_core::DType::F32, &Device::Cpu).unwrap();
    for ((name, theirs), (_, ours)) in model.vars().iter().zip(chunked.vars()) {
        let value = if name.contains("query_key_value") {
            // Row (head, part, i) of the per-head layout is row (part, head, i) chunked.
            let dims = theirs.dims().to_vec();
            let rest: Vec<usize> = dims[1..].to_vec();
            let shape: Vec<usize> = [h, 3, d].into_iter().chain(rest.iter().copied()).collect();
            theirs.reshape(shape).unwrap().transpose(0, 1).unwrap().contiguous().unwrap().reshape(dims).unwrap()
        } else {
            theirs.as_tensor().clone()
        };
        ours.set(&value).unwrap();
    }
    let ids = Tensor::new(&[[10u32, 200, 3000, 40, 5]], &Device::Cpu).unwrap();
    let a = model.forward(&ids, None).unwrap();
    let b = chunked.forward(&ids, None).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
}

/// A config names a model's adapter: a third-party file for a checkpoint fusellm does not
/// build in, or another registered adapter than the one config.json's `model_type` picks.
/// A plugin of another kind is refused at its key.
#[test]
fn a_config_names_the_adapter_of_a_model() {
    use fusellm_core::config::Config;
    let mut with_neox = Registry::with_builtins().unwrap();
    with_neox.load_file(Tier::Dylib, &dylib("gpt_neox_adapter")).unwrap();
    let neox = neox_checkpoint(&with_neox, "config");
    let llama = fixtures::model_dir("tiny-openllama");
    let by_model_type = Checkpoint::open(&llama, &Registry::with_builtins().unwrap(), None).unwrap().adapter;
    let other = if by_model_type == "llama" { "openllama" } else { "llama" };
    let config = |source_adapter: &str| {
        let path = neox.join(format!("{source_adapter}.toml"));
        let text = format!(
            "[target]\nmodel = \"{}\"\nadapter = {{ dylib = \"{}\" }}\n\n[[sources]]\nmodel = \"{}\"\nadapter = \"{source_adapter}\"\n",
            neox.display(),
            dylib("gpt_neox_adapter").display(),
            llama.display()
        );
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    };

    let mut registry = Registry::with_builtins().unwrap();
    let chosen = config(other);
    chosen.load_plugins(&mut registry).unwrap();
    let open = |model| fusellm_core::pipeline::open_model(model, &registry).unwrap().adapter;
    assert_eq!(open(chosen.target.as_ref().unwrap()), "neox_example");
    assert_eq!(open(&chosen.sources[0]), other, "the config's choice wins");
    // The registry is a plain map: the config's choice does not follow the folder around.
    assert_eq!(Checkpoint::open(&llama, &registry, None).unwrap().adapter, by_model_type);

    let e = config("min_ce").load_plugins(&mut Registry::with_builtins().unwrap()).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (7, "sources.0.adapter"), "{e}");
    assert!(
        e.message.contains("`min_ce` (builtin, fusellm-ce-fusion) is a fusion plugin, not an adapter plugin"),
        "{e}"
    );
}

/// `--plugin FILE` loads a third-party adapter on the command line: without it the
/// checkpoint's `model_type` is unknown, with it the model generates.
#[test]
fn the_command_line_loads_an_adapter_file() {
    use crate::common::fusellm_in;
    let mut with_neox = Registry::with_builtins().unwrap();
    with_neox.load_file(Tier::Dylib, &dylib("gpt_neox_adapter")).unwrap();
    let neox = neox_checkpoint(&with_neox, "cli");
    let (model, plugin) = (neox.display().to_string(), dylib("gpt_neox_adapter").display().to_string());
    let args = ["generate", "--model", &model, "--prompt", "Pythia", "--max-new-tokens", "3", "--ids"];
    let without = fusellm_in(&neox, &args);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        !without.status.success() && stderr.contains("no adapter understands model_type `neox_example`"),
        "{stderr}"
    );
    let with = fusellm_in(&neox, &[&args[..], &["--plugin", &plugin]].concat());
    let stdout = String::from_utf8_lossy(&with.stdout);
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    assert_eq!(stdout.split_whitespace().filter(|id| id.parse::<u32>().is_ok()).count(), 3, "{stdout}");
}

/// A target that only a third-party adapter reads goes through every stage with it: the
/// run precomputes, fuses, trains and evaluates the trained checkpoint with the adapter
/// the config names, and `fusellm train --config` trains it the same way.
#[test]
fn a_target_of_a_third_party_adapter_trains_and_is_evaluated_with_it() {
    use crate::common::fusellm_in;
    let mut with_neox = Registry::with_builtins().unwrap();
    with_neox.load_file(Tier::Dylib, &dylib("gpt_neox_adapter")).unwrap();
    let neox = neox_checkpoint(&with_neox, "stages");
    let models = format!(
        "[target]\nmodel = \"{}\"\nadapter = {{ dylib = \"{}\" }}\n[[sources]]\nmodel = \"{}\"\n",
        neox.display(),
        dylib("gpt_neox_adapter").display(),
        fixtures::model_dir("tiny-pythia").display()
    );
    crate::common::write_experiment(&neox, &models, 2);
    let out = fusellm_in(&neox, &["run", "run.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(neox.join("out/run.json")).unwrap()).unwrap();
    let rows = record["eval"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["model"] == "trained" && r["bits_per_byte"].as_f64().is_some_and(f64::is_finite)));

    let fused = stage_dir(&neox, "fuse");
    let out = fusellm_in(
        &neox,
        &[
            "train",
            "--config",
            "run.toml",
            "--fused",
            fused.to_str().unwrap(),
            "--out",
            "again",
            "--set",
            "train.steps=1",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let step = neox.join("again/checkpoints/step-0000001");
    assert!(step.join("model.safetensors").exists(), "no checkpoint in {}", step.display());
}
