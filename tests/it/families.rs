//! The model families of 2024-2026 (Llama 3, Qwen 2 and 3, Mistral, Gemma 2, Phi-3,
//! GPT-NeoX) as training targets and from the command line: every parameter of each
//! receives a gradient, the fused CPU kernels give the composed path's losses and
//! gradients, `fusellm generate` reproduces transformers' greedy ids, and configs that do
//! not describe a model the block library can run are refused at their key.

use crate::common::{fixtures, fusellm_in};
use candle_core::{DType, Device, Tensor};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::loss::{LossBatch, Objective};
use fusellm_core::model::{Kernels, LoadMode, Transformer};
use fusellm_core::plugins::Registry;
use fusellm_sdk::{CheckpointFiles, PluginKind};

use crate::common::fixtures::MODERN as FAMILIES;

fn checkpoint(name: &str) -> Checkpoint {
    Checkpoint::open(&fixtures::model_dir(name), &Registry::with_builtins().unwrap(), None).unwrap()
}

/// The number of tensors in a checkpoint's safetensors file.
fn tensor_count(name: &str) -> usize {
    candle_core::safetensors::load(fixtures::model_dir(name).join("model.safetensors"), &Device::Cpu).unwrap().len()
}

/// A batch of two rows, longer than Gemma 2's and Mistral's windows (16 and 24 keys), with
/// a fused top-3 target: the CLM and the fusion parts both reach the head.
fn batch(vocab: usize) -> LossBatch {
    let (b, t, k) = (2, 40, 3);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let target_ids: Vec<u32> = (0..b * t * k).map(|i| ((i * 104_729 + 7) % vocab) as u32).collect();
    let target_probs: Vec<f32> = (0..b * t * k).map(|i| [0.6, 0.3, 0.1][i % k]).collect();
    LossBatch::sequences(ids, b).unwrap().with_target(target_ids, target_probs, k).unwrap()
}

/// Losses of `batch` and the gradients of every parameter, by checkpoint name.
fn step(model: &Transformer, batch: &LossBatch) -> (f64, Vec<(String, Tensor)>) {
    let losses = model.losses(batch, &Objective { lambda: 0.9, ..Default::default() }).unwrap();
    let grads = losses.total.backward().unwrap();
    let total = losses.total.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let per_param = model
        .vars()
        .iter()
        .map(|(name, var)| {
            let g = grads.get(var).unwrap_or_else(|| panic!("`{name}` receives no gradient"));
            (name.clone(), g.to_dtype(DType::F64).unwrap())
        })
        .collect();
    (total, per_param)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// One training step of each family in f32, where the fused CPU kernels run (attention,
/// norms, RoPE, SwiGLU, the head with the loss), against the same step in f64, which takes
/// the compositions of candle ops: the losses within 1e-5, every gradient within 1e-3 of
/// its largest entry; and every parameter (biases, q/k norms and sandwich norms included)
/// gets a non-zero gradient.
#[test]
fn every_family_trains_in_every_parameter_and_the_fused_step_equals_the_composed_one() {
    for name in FAMILIES {
        let checkpoint = checkpoint(name);
        let batch = batch(checkpoint.spec.vocab_size);
        let fused = checkpoint.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap();
        let expected = tensor_count(name);
        assert_eq!(fused.vars().len(), expected, "{name}: every tensor of the checkpoint is a parameter");
        let (loss, grads) = step(&fused, &batch);
        let composed = checkpoint.load_model(LoadMode::Trainable, DType::F64, &Device::Cpu).unwrap();
        let (reference_loss, reference_grads) = step(&composed, &batch);
        assert!(
            (loss - reference_loss).abs() <= 1e-5 * reference_loss.abs(),
            "{name}: loss {loss} vs {reference_loss}"
        );
        for ((param, g), (_, r)) in grads.iter().zip(&reference_grads) {
            let scale = max_abs(r);
            assert!(scale > 0.0 && scale.is_finite(), "{name}: `{param}` has gradient {scale}");
            let diff = max_abs(&(g - r).unwrap());
            assert!(diff <= 1e-3 * scale, "{name}: `{param}` gradient differs by {diff} (largest {scale})");
        }
    }
}

/// Activation checkpointing (each block recomputed in the backward) gives every family the
/// gradients of the whole graph: every parameter's within 1e-6 of its largest entry, at
/// the same loss; padding, windows and the fused target included; with the fused kernels
/// and with candle's compositions (whose gradients carry graphs of their own, as on CUDA).
#[test]
fn checkpointed_activations_give_every_family_the_same_gradients() {
    let objective = Objective { lambda: 0.9, ..Default::default() };
    for (name, kernels) in FAMILIES.iter().flat_map(|&n| [(n, Kernels::Fused), (n, Kernels::Composed)]) {
        let checkpoint = checkpoint(name);
        let mut batch = batch(checkpoint.spec.vocab_size);
        // The last four positions of the second row are padding.
        for t in batch.len * 2 - 4..batch.len * 2 {
            (batch.keep[t], batch.clm_weight[t], batch.clm_weight[t - 1]) = (0, 0.0, 0.0);
        }
        let model = checkpoint.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap().with_kernels(kernels);
        let (whole, whole_grads) = model.gradients(&batch, &objective, 2.0, false).unwrap();
        let (again, grads) = model.gradients(&batch, &objective, 2.0, true).unwrap();
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        assert_eq!(scalar(&whole.total), scalar(&again.total), "{name} ({kernels:?}): the loss");
        for (param, var) in model.vars() {
            let (a, b) = (whole_grads.get(var).unwrap(), grads.get(var));
            let b = b.unwrap_or_else(|| panic!("{name} ({kernels:?}): `{param}` gets no gradient when checkpointed"));
            let scale = max_abs(&a.to_dtype(DType::F64).unwrap());
            let diff = max_abs(&(a - b).unwrap().to_dtype(DType::F64).unwrap());
            assert!(
                scale > 0.0 && diff <= 1e-6 * scale,
                "{name} ({kernels:?}): `{param}` differs by {diff} (largest {scale})"
            );
        }
    }
}

/// `fusellm generate --ids` from the bf16 files: transformers' 20 greedy ids after the
/// `english` text, for every family.
#[test]
fn the_command_line_generates_transformers_greedy_ids() {
    let text = "The quick brown fox jumps over the lazy dog near the riverbank.";
    for name in FAMILIES {
        let dir = fixtures::model_dir(name);
        let args = ["generate", "--model", dir.to_str().unwrap(), "--prompt", text, "--max-new-tokens", "20", "--ids"];
        let out = fusellm_in(&std::env::temp_dir(), &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let ids: Vec<u32> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(|i| i.parse().unwrap()).collect();
        let reference = fixtures::tensors(&format!("{name}.forward.safetensors"));
        assert_eq!(ids, fixtures::ids(&reference["greedy.new_ids"]), "{name}");
    }
}

/// What each family's adapter makes of its fixture: the features that set it apart.
#[test]
fn each_adapter_describes_its_family() {
    use fusellm_sdk::adapter::{MlpKind, NormKind, Positions, QkvLayout, RopeScaling};
    let llama3 = checkpoint("tiny-llama3").spec;
    assert!(llama3.tied_embeddings);
    assert!(matches!(
        llama3.positions,
        Positions::Rope { theta: 500_000.0, scaling: RopeScaling::Llama3 { factor: 32.0, original: 8192, .. }, .. }
    ));
    let qwen2 = checkpoint("tiny-qwen2").spec;
    assert_eq!((qwen2.attention.bias.qkv, qwen2.attention.bias.out, qwen2.vocab_size), (true, false, 151_936));
    let qwen3 = checkpoint("tiny-qwen3").spec;
    assert_eq!((qwen3.attention.qk_norm, qwen3.attention.head_dim, qwen3.hidden), (true, 32, 64));
    let mistral = checkpoint("tiny-mistral").spec;
    assert!(mistral.layer_attention.iter().all(|l| l.window == Some(24)) && mistral.layer_attention.len() == 2);
    let gemma2 = checkpoint("tiny-gemma2").spec;
    assert_eq!(gemma2.norm, NormKind::RmsNorm { eps: 1e-6, offset: 1.0 });
    assert_eq!(
        (gemma2.embed_scale, gemma2.final_softcap, gemma2.attention.softcap),
        (Some(8.0), Some(30.0), Some(50.0))
    );
    assert_eq!(
        (gemma2.mlp.kind, gemma2.post_norms, gemma2.attention.softmax_scale),
        (MlpKind::GeGlu, true, Some(24f64.powf(-0.5)))
    );
    let windows: Vec<Option<usize>> = gemma2.layer_attention.iter().map(|l| l.window).collect();
    assert_eq!(windows, [Some(16), None, Some(16)]);
    let phi3 = checkpoint("tiny-phi3").spec;
    assert_eq!((phi3.attention.qkv, phi3.mlp.fused_gate_up, phi3.rotary_dim()), (QkvLayout::Chunked, true, 12));
    let Positions::Rope { scaling: RopeScaling::LongRope { attention_factor, original: 256, .. }, .. } = phi3.positions
    else {
        panic!("phi3: {:?}", phi3.positions)
    };
    assert!((attention_factor - 1.5f64.sqrt()).abs() < 1e-12, "{attention_factor}");
    let gemma3 = checkpoint("tiny-gemma3").spec;
    assert_eq!((gemma3.attention.qk_norm, gemma3.attention.softcap, gemma3.final_softcap), (true, None, None));
    let local = Positions::Rope { theta: 10_000.0, fraction: 1.0, scaling: RopeScaling::None };
    let global = Positions::Rope { theta: 1e6, fraction: 1.0, scaling: RopeScaling::Linear { factor: 8.0 } };
    assert_eq!(gemma3.positions, global);
    for i in 0..6 {
        let expected = if i % 3 == 2 { (None, &global) } else { (Some(12), &local) };
        assert_eq!(gemma3.layer(i), expected, "gemma3 layer {i}");
    }
    let pythia = checkpoint("tiny-pythia").spec;
    assert_eq!((pythia.attention.qkv, pythia.rotary_dim(), pythia.tied_embeddings), (QkvLayout::PerHead, 4, false));
}

/// Gemma 3's config in transformers 4's layout (a window pattern instead of layer types, a
/// separate RoPE base for the local layers, the global layers' scaling in `rope_scaling`)
/// describes the same model as transformers 5's.
#[test]
fn gemma3_configs_of_both_layouts_give_one_spec() {
    let v5 = adapt("gemma3_text", "tiny-gemma3", |_| ()).unwrap();
    let v4 = adapt("gemma3_text", "tiny-gemma3", |c| {
        let c = c.as_object_mut().unwrap();
        c.remove("layer_types");
        c.remove("rope_parameters");
        c.insert("sliding_window_pattern".into(), 3.into());
        c.insert("rope_theta".into(), 1e6.into());
        c.insert("rope_local_base_freq".into(), 1e4.into());
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 8.0}));
    })
    .unwrap();
    assert_eq!(v4, v5);
}

/// The spec an adapter makes of an edited fixture config, or its error.
fn adapt(
    adapter: &str,
    model: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<fusellm_sdk::ModelSpec, String> {
    let dir = fixtures::model_dir(model);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    let registry = Registry::with_builtins().unwrap();
    let entry = registry.get(PluginKind::Adapter, adapter).unwrap();
    let params = entry.resolve_params(&Default::default()).unwrap();
    let spec = entry
        .adapt(&params, CheckpointFiles { config_json: &config.to_string(), tokenizer_json: None })
        .map_err(|e| e.message)?;
    spec.check()?;
    Ok(spec)
}

/// A change to a config.json.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

#[test]
fn configs_the_block_library_cannot_run_are_refused_at_their_key() {
    let cases: [(&str, &str, Edit, &str); 6] = [
        (
            "llama",
            "tiny-llama3",
            Box::new(|c| c["rope_scaling"]["rope_type"] = "ntk-by-parts".into()),
            "RoPE type `ntk-by-parts` is not supported; supported: default, linear",
        ),
        (
            "llama",
            "tiny-llama3",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("head_dim");
                c["hidden_size"] = 66.into();
            }),
            "hidden_size 66 is not a multiple of num_attention_heads 4",
        ),
        (
            "gemma2",
            "tiny-gemma2",
            Box::new(|c| c["layer_types"] = serde_json::json!(["full_attention"])),
            "`layer_types` has 1 entries for num_hidden_layers = 3",
        ),
        (
            "gemma2",
            "tiny-gemma2",
            Box::new(|c| c["layer_types"][1] = "chunked_attention".into()),
            "layer type `chunked_attention` is not supported",
        ),
        (
            "phi3",
            "tiny-phi3",
            Box::new(|c| c["rope_parameters"]["short_factor"] = serde_json::json!([1.0, 2.0])),
            "longrope short_factor has 2 entries, but a rotary width of 12 has 6 frequencies",
        ),
        (
            "gemma2",
            "tiny-gemma2",
            Box::new(|c| c["hidden_activation"] = "relu".into()),
            "hidden_activation `relu` is not supported by the gemma2 adapter",
        ),
    ];
    for (adapter, model, edit, expected) in cases {
        let err = adapt(adapter, model, edit).unwrap_err();
        assert!(err.contains(expected), "{adapter}: {err}");
    }
    // The unedited configs are fine.
    for (adapter, model) in [("llama", "tiny-llama3"), ("gemma2", "tiny-gemma2"), ("phi3", "tiny-phi3")] {
        adapt(adapter, model, |_| ()).unwrap();
    }
}

/// A tensor stored in a dtype that is not a float (a quantised or integer tensor) is
/// refused when the weights load, naming the tensor, its dtype and what is supported.
#[test]
fn a_tensor_of_another_dtype_is_refused_by_name() {
    let src = fixtures::model_dir("tiny-llama2");
    let dir = std::env::temp_dir().join(format!("fusellm-int-weights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let norm = tensors["model.norm.weight"].to_dtype(DType::I64).unwrap();
    tensors.insert("model.norm.weight".into(), norm);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let checkpoint = Checkpoint::open(&dir, &Registry::with_builtins().unwrap(), None).unwrap();
    let err = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).err().unwrap().report();
    assert!(
        err.contains("tensor `model.norm.weight` is stored as I64") && err.contains("supported: F32, BF16, F16, F64"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
