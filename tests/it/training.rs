//! The training core: the sparse losses against dense compositions (values, gradients,
//! memory), exact resume, and the stop at a NaN.

use std::path::{Path, PathBuf};

use crate::common::{alloc::peak_during, fixtures};
use candle_core::{DType, Device, Tensor, Var};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::entry_nll::{composed_entry_nll, entry_nll};
use fusellm_core::model::loss::{LossBatch, Objective};
use fusellm_core::model::ops::log_softmax;
use fusellm_core::model::Kernels;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;
use fusellm_core::train::optim::AdamWConfig;
use fusellm_core::train::schedule::{Decay, LambdaSchedule, LrSchedule};
use fusellm_core::train::{latest_checkpoint, Batching, Dataset, Document, Precision, TrainConfig, Trainer};
use fusellm_sdk::rng::Rng;
use fusellm_sdk::SparseRowsBuf;

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-training-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn random_logits(rng: &mut Rng, shape: (usize, usize, usize)) -> Var {
    let n = shape.0 * shape.1 * shape.2;
    Var::from_vec((0..n).map(|_| (rng.normal() * 3.0) as f32).collect(), shape, &Device::Cpu).unwrap()
}

/// `k` distinct ids and probabilities per position; the last position of a row has none.
fn random_batch(rng: &mut Rng, (b, t, v): (usize, usize, usize), k: usize) -> LossBatch {
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(v as u32)).collect();
    let (mut target_ids, mut target_probs) = (vec![0; b * t * k], vec![0.0; b * t * k]);
    for p in (0..b * t).filter(|p| p % t != t - 1) {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k {
            let id = rng.below(v as u32);
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        let weights: Vec<f64> = (0..k).map(|_| rng.normal().exp()).collect();
        let sum: f64 = weights.iter().sum();
        target_ids[p * k..(p + 1) * k].copy_from_slice(&chosen);
        for (j, w) in weights.iter().enumerate() {
            target_probs[p * k + j] = (w / sum) as f32;
        }
    }
    LossBatch::sequences(ids, b).unwrap().with_target(target_ids, target_probs, k).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn value(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

#[test]
fn the_sparse_fusion_loss_equals_the_dense_one_with_identical_gradients() {
    let mut rng = Rng::new(11);
    let shape = (2, 6, 50);
    let logits = random_logits(&mut rng, shape);
    let batch = random_batch(&mut rng, shape, 4);
    let sparse = Objective { lambda: 0.0, ..Default::default() }
        .losses(logits.as_tensor(), &batch, Kernels::Fused)
        .unwrap()
        .fusion;
    let sparse_grad = sparse.backward().unwrap().get(&logits).unwrap().clone();

    // The paper's way: the target densified over the vocabulary.
    let mut dense = vec![0f32; shape.0 * shape.1 * shape.2];
    for p in 0..shape.0 * shape.1 {
        for j in 0..4 {
            dense[p * shape.2 + batch.target_ids[p * 4 + j] as usize] += batch.target_probs[p * 4 + j];
        }
    }
    let dense = Tensor::from_vec(dense, shape, &Device::Cpu).unwrap();
    let positions = (shape.0 * (shape.1 - 1)) as f64;
    let reference = ((dense * log_softmax(logits.as_tensor()).unwrap()).unwrap().sum_all().unwrap().neg().unwrap()
        / positions)
        .unwrap();
    let reference_grad = reference.backward().unwrap().get(&logits).unwrap().clone();
    assert!((value(&sparse) - value(&reference)).abs() <= 1e-6 * value(&reference).abs(), "{sparse} vs {reference}");
    assert!(
        max_diff(&sparse_grad, &reference_grad) <= 1e-6,
        "gradients differ by {}",
        max_diff(&sparse_grad, &reference_grad)
    );
}

#[test]
fn the_entry_nll_op_matches_the_composition_in_value_and_gradient() {
    let mut rng = Rng::new(3);
    for (shape, k) in [((3, 7, 11), 1), ((2, 5, 1000), 6), ((1, 4, 32000), 10)] {
        let logits = random_logits(&mut rng, shape);
        let ids: Vec<u32> = (0..shape.0 * shape.1 * k).map(|_| rng.below(shape.2 as u32)).collect();
        let ids = Tensor::from_vec(ids, (shape.0, shape.1, k), &Device::Cpu).unwrap();
        let upstream: Vec<f32> = (0..shape.0 * shape.1 * k).map(|_| rng.normal() as f32).collect();
        let upstream = Tensor::from_vec(upstream, (shape.0, shape.1, k), &Device::Cpu).unwrap();
        let run = |f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let out = f(logits.as_tensor(), &ids).unwrap();
            let grad = (&out * &upstream).unwrap().sum_all().unwrap().backward().unwrap().get(&logits).unwrap().clone();
            (out, grad)
        };
        let ((ours, our_grad), (composed, composed_grad)) =
            (run(|l, i| entry_nll(Kernels::Fused, l, i)), run(composed_entry_nll));
        let scale = value(&composed.abs().unwrap().max_all().unwrap());
        assert!(
            max_diff(&ours, &composed) <= 1e-5 * scale,
            "{shape:?}: values differ by {}",
            max_diff(&ours, &composed)
        );
        assert!(max_diff(&our_grad, &composed_grad) <= 1e-4, "{shape:?}: gradients differ");
    }
}

/// At vocabulary 32000 the paper's dense target of a batch of 8 x 2048 would be 2.1 GB in
/// f32; here 4 x 128 positions, where it would be 65.5 MB: the sparse loss's forward
/// allocates what its O(B * L * k) inputs take, and its backward one gradient of the
/// logits (plus candle's accumulation of it).
#[test]
fn the_sparse_loss_allocates_no_dense_target_at_vocab_32000() {
    let mut rng = Rng::new(5);
    let shape = (4, 128, 32000);
    let logits = random_logits(&mut rng, shape);
    let batch = random_batch(&mut rng, shape, 10);
    let dense_bytes = shape.0 * shape.1 * shape.2 * 4;
    let objective = Objective::default();
    let (losses, forward) = peak_during(|| objective.losses(logits.as_tensor(), &batch, Kernels::Fused).unwrap());
    assert!(forward < dense_bytes / 20, "the forward allocated {forward} bytes; a dense target is {dense_bytes}");
    let (grads, backward) = peak_during(|| losses.total.backward().unwrap());
    assert!(grads.get(&logits).is_some());
    assert!(
        backward <= 3 * dense_bytes + (1 << 20),
        "the backward allocated {backward} bytes ({dense_bytes} per [B, L, V])"
    );
}

/// Short documents of the prose corpus in tiny-llama2's tokenization, with a synthetic
/// sparse target of three entries per position.
pub fn documents(checkpoint: &Checkpoint, n: usize) -> Vec<Document> {
    let text = std::fs::read_to_string(fixtures::root().join("corpora/prose/tinyshakespeare.valid.txt")).unwrap();
    let mut rng = Rng::new(9);
    text.split("\n\n")
        .take(n)
        .map(|piece| {
            let ids = checkpoint.tokenizer.encode(piece).unwrap();
            let mut rows = SparseRowsBuf::with_capacity(ids.len(), ids.len() * 3);
            for p in 0..ids.len() {
                if p + 1 < ids.len() {
                    rows.push_row(&[ids[p + 1], 13, 29889 + rng.below(50)], &[0.6, 0.3, 0.1]);
                } else {
                    rows.end_row();
                }
            }
            Document { ids, rows: Some(rows) }
        })
        .collect()
}

pub fn config(steps: u64, precision: Precision) -> TrainConfig {
    TrainConfig {
        steps,
        batching: Batching { seq_len: 32, batch_size: 2, packing: true, seed: 4 },
        accumulation: 2,
        lr: LrSchedule { peak: 1e-3, warmup_steps: 2, decay: Decay::Cosine, min_ratio: 0.1 },
        lambda: LambdaSchedule { start: 0.9, end: 0.5 },
        divergence: Default::default(),
        tail: Default::default(),
        temperature: 1.0,
        adamw: AdamWConfig::default(),
        precision,
        clip: Some(1.0),
        checkpoint_every: 2,
        keep_checkpoints: 2,
        zero: 0,
        checkpoint_activations: false,
        lora: None,
    }
}

/// Trains the tiny Llama-2 as `config` says (its LoRA adapters alone when it has them).
pub fn train(
    run_dir: &Path,
    docs: Vec<Document>,
    config: &TrainConfig,
    resume: bool,
    stop_at: Option<u64>,
) -> fusellm_core::error::Result<PathBuf> {
    let registry = Registry::with_builtins().unwrap();
    let base = fixtures::model_dir("tiny-llama2");
    let target = Checkpoint::open(&base, &registry, None).unwrap();
    let dtype = config.precision.dtype();
    let model = match &config.lora {
        Some(lora) => target.load_adapted(&lora.adapter, config.batching.seed, dtype, &Device::Cpu).unwrap(),
        None => target.load_model(LoadMode::Trainable, dtype, &Device::Cpu).unwrap(),
    };
    let mut data = Dataset::new(docs, config.batching).unwrap();
    let comm = &fusellm_dist::Single;
    let trainer = Trainer { run_dir: run_dir.to_owned(), base, model: &model, config: config.clone(), comm };
    trainer.run(&mut data, resume, stop_at, |_| {}).map(|s| s.checkpoint)
}

/// In f32, and in f16 with f32 master weights (the mixed precision that bf16 uses on CUDA;
/// the CPU has no bf16 matmul).
#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    for precision in [Precision::F32, Precision::F16] {
        resume_is_exact(precision);
    }
}

fn resume_is_exact(precision: Precision) {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    let docs = documents(&checkpoint, 16);
    let config = config(6, precision);
    let (whole, split) = (scratch(&format!("whole-{precision:?}")), scratch(&format!("split-{precision:?}")));
    let end = train(&whole, docs.clone(), &config, false, None).unwrap();
    let stopped = train(&split, docs.clone(), &config, false, Some(3)).unwrap();
    assert!(stopped.ends_with("step-0000003"));
    let refused = train(&split, docs.clone(), &config, false, None).unwrap_err();
    assert!(refused.report().contains("--resume"), "{}", refused.report());
    let resumed = train(&split, docs, &config, true, None).unwrap();
    assert!(resumed.ends_with("step-0000006") && end.ends_with("step-0000006"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let same = std::fs::read(end.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap();
        assert!(same, "{precision:?}: {file} differs between the resumed and the uninterrupted run");
    }
    let losses = |dir: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string()).collect()
    };
    assert_eq!(losses(&whole), losses(&split));
    assert_eq!(losses(&whole).len(), 6);
    // The checkpoint loads as a model (Hugging Face layout), and the plot was written.
    let reloaded = Checkpoint::open(&end, &registry, None).unwrap();
    reloaded.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    assert!(std::fs::read(whole.join("loss.png")).unwrap().starts_with(b"\x89PNG"));
    assert_eq!(latest_checkpoint(&whole).unwrap().0, 6);
    // Below f32 the weights are stored in the compute dtype and the f32 masters with the
    // optimizer state.
    let state = candle_core::safetensors::load(end.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    let weights = candle_core::safetensors::load(end.join("model.safetensors"), &Device::Cpu).unwrap();
    let masters = state.iter().filter(|(k, v)| k.starts_with("master.") && v.dtype() == DType::F32).count();
    assert_eq!(masters, if precision == Precision::F32 { 0 } else { weights.len() });
    assert!(weights.values().all(|w| w.dtype() == precision.dtype()));
}

#[test]
fn a_nan_stops_training_at_its_step_and_keeps_the_last_good_checkpoint() {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    let mut docs = documents(&checkpoint, 6);
    docs[4].rows.as_mut().unwrap().values[1] = f32::NAN;
    let mut config = config(6, Precision::F32);
    (config.accumulation, config.checkpoint_every) = (1, 1);
    config.batching = Batching { seq_len: 64, batch_size: 1, packing: false, seed: 4 };
    // The step that serves the poisoned document.
    let mut data = Dataset::new(docs.clone(), config.batching).unwrap();
    let poisoned = (0..6u64).find(|&g| data.batch(g).unwrap().target_probs.iter().any(|p| p.is_nan())).unwrap() + 1;
    let run_dir = scratch("nan");
    let error = train(&run_dir, docs, &config, false, None).unwrap_err().report();
    assert!(error.starts_with(&format!("step {poisoned}: the loss is NaN")), "{error}");
    match latest_checkpoint(&run_dir) {
        Some((step, dir)) => {
            assert_eq!(step, poisoned - 1);
            assert!(error.contains(&dir.display().to_string()), "{error}");
        }
        None => assert!(poisoned == 1 && error.contains("no checkpoint was written before it"), "{error}"),
    }
}

#[test]
fn sequences_pack_documents_and_predict_only_within_them() {
    let doc = |ids: Vec<u32>| Document { ids, rows: None };
    let docs = vec![doc(vec![1, 2, 3]), doc(vec![4, 5, 6, 7, 8]), doc(vec![9, 10])];
    let mut data = Dataset::new(docs, data_batching()).unwrap();
    assert_eq!(data.batches_per_epoch(), 1);
    let b = data.batch(0).unwrap();
    let mut served: Vec<u32> = b.ids.iter().zip(&b.keep).filter(|(_, &k)| k == 1).map(|(&i, _)| i).collect();
    served.sort();
    assert_eq!(served, (1..=10).collect::<Vec<_>>(), "every token once");
    for (t, &w) in b.clm_weight.iter().enumerate() {
        // A position predicts only the next token of its own document, within its row.
        let next_in_doc =
            t % 4 != 3 && b.keep[t + 1] == 1 && (b.ids[t + 1] == b.ids[t] + 1) && b.ids[t] != 3 && b.ids[t] != 8;
        assert_eq!(w == 1.0, next_in_doc, "position {t} of {:?}", b.ids);
    }
    let fresh = Dataset::new(vec![doc(vec![1, 2, 3]), doc(vec![4, 5, 6, 7, 8]), doc(vec![9, 10])], data_batching())
        .unwrap()
        .batch(0)
        .unwrap();
    assert_eq!(fresh, b, "the order is a function of the seed and the epoch");
}

fn data_batching() -> Batching {
    Batching { seq_len: 4, batch_size: 3, packing: true, seed: 0 }
}

#[test]
fn kl_differs_from_ce_by_the_target_entropy_and_temperature_scales_the_student() {
    let mut rng = Rng::new(21);
    let shape = (2, 5, 40);
    let logits = random_logits(&mut rng, shape);
    let batch = random_batch(&mut rng, shape, 3);
    let fusion = |objective: Objective| {
        let f = objective.losses(logits.as_tensor(), &batch, Kernels::Fused).unwrap().fusion;
        let g = f.backward().unwrap().get(&logits).unwrap().clone();
        (value(&f) as f64, g)
    };
    let ce = Objective { lambda: 0.0, ..Default::default() };
    let kl = Objective { divergence: fusellm_core::model::loss::Divergence::Kl, ..ce };
    let ((ce_value, ce_grad), (kl_value, kl_grad)) = (fusion(ce), fusion(kl));
    let positions = (shape.0 * (shape.1 - 1)) as f64;
    let neg_entropy: f64 =
        batch.target_probs.iter().filter(|&&p| p > 0.0).map(|&p| p as f64 * (p as f64).ln()).sum::<f64>() / positions;
    assert!((kl_value - (ce_value + neg_entropy)).abs() < 1e-5, "{kl_value} vs {ce_value} + {neg_entropy}");
    assert!(kl_value >= 0.0);
    assert_eq!(max_diff(&ce_grad, &kl_grad), 0.0);
    // T = 2: the student's logits are halved, the loss scaled by T^2.
    let (hot, _) = fusion(Objective { temperature: 2.0, ..ce });
    let halved = Var::from_tensor(&(logits.as_tensor() / 2.0).unwrap()).unwrap();
    let reference = ce.losses(halved.as_tensor(), &batch, Kernels::Fused).unwrap().fusion;
    assert!((hot - 4.0 * value(&reference) as f64).abs() < 1e-4, "{hot} vs 4 x {reference}");
}

/// `checkpoint_activations` changes what is kept, not what is computed: six steps give the
/// same losses, and weights within 1e-6 of their largest entry.
#[test]
fn checkpointed_activations_train_as_kept_ones() {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    let docs = documents(&checkpoint, 16);
    let kept = config(6, Precision::F32);
    let recomputed = TrainConfig { checkpoint_activations: true, ..kept.clone() };
    let a = train(&scratch("kept"), docs.clone(), &kept, false, None).unwrap();
    let b = train(&scratch("recomputed"), docs, &recomputed, false, None).unwrap();
    let losses = |dir: &Path| -> Vec<f64> {
        let text = std::fs::read_to_string(dir.parent().unwrap().parent().unwrap().join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    assert_eq!(losses(&a), losses(&b));
    let load = |dir: &Path| candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let (wa, wb) = (load(&a), load(&b));
    for (name, t) in &wa {
        let scale = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (t - &wb[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6 * scale, "`{name}` differs by {diff}");
    }
}
