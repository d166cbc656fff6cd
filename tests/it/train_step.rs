//! One training step of the fixture models, through the training path (the objective and
//! our AdamW), reproduces PyTorch's: the CLM, fusion and combined losses, every gradient
//! norm, the stored gradients, the parameters after one AdamW update and the loss after it.

use crate::common::fixtures;
use candle_core::{DType, Device, Tensor, Var};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::loss::{LossBatch, Objective};
use fusellm_core::model::Kernels;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;
use fusellm_core::train::optim::{AdamW, AdamWConfig};

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_rel(what: &str, ours: f64, reference: f64, rtol: f64) {
    assert!((ours - reference).abs() <= rtol * reference.abs(), "{what}: {ours} vs {reference}");
}

fn max_abs(t: &Tensor) -> f64 {
    scalar(&t.abs().unwrap().max_all().unwrap())
}

/// The reference batch with its top-5 target (`[2, 31, 5]`, stored for the predicting
/// positions) laid out per position (`[2, 32, 5]`, the last position of a row empty).
fn batch(reference: &std::collections::HashMap<String, Tensor>) -> LossBatch {
    let ids = reference["batch.input_ids"].to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let pad = |x: &Tensor| Tensor::cat(&[x, &x.narrow(1, 0, 1).unwrap().zeros_like().unwrap()], 1).unwrap();
    let target_ids = pad(&reference["fusion.target_ids"].to_dtype(DType::U32).unwrap());
    let target_probs = pad(&reference["fusion.target_probs"]);
    let flat_u32 = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let batch = LossBatch::sequences(flat_u32(&ids), b)
        .unwrap()
        .with_target(flat_u32(&target_ids), target_probs.flatten_all().unwrap().to_vec1().unwrap(), 5)
        .unwrap();
    assert_eq!(batch.len, t);
    batch
}

#[test]
fn one_step_matches_the_pytorch_reference() {
    for name in ["tiny-llama2", "tiny-mpt"] {
        let registry = Registry::with_builtins().unwrap();
        let checkpoint = Checkpoint::open(&fixtures::model_dir(name), &registry, None).unwrap();
        let reference = fixtures::tensors(&format!("{name}.train_step.safetensors"));
        let summary = fixtures::json(&format!("{name}.train_step.json"));
        let batch = batch(&reference);
        let ids = batch.ids_tensor(&Device::Cpu).unwrap();
        for (part, lambda) in [("ce", 1.0), ("combined", 0.9)] {
            // Each part starts from the checkpoint's weights, as the reference does.
            let model = checkpoint.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap();
            let objective = Objective { lambda, ..Default::default() };
            let losses = objective.losses(&model.forward(&ids, None).unwrap(), &batch, Kernels::Fused).unwrap();
            let expected = &summary[part];
            let label = |what: &str| format!("{name} {part} {what}");
            assert_rel(&label("CLM loss"), scalar(&losses.clm), expected["ce_before"].as_f64().unwrap(), 1e-5);
            assert_rel(
                &label("fusion loss"),
                scalar(&losses.fusion),
                expected["fusion_before"].as_f64().unwrap(),
                1e-5,
            );
            assert_rel(&label("loss"), scalar(&losses.total), expected["loss_before"].as_f64().unwrap(), 1e-5);

            let grads = losses.total.backward().unwrap();
            let grad =
                |var: &Var| grads.get(var).unwrap_or_else(|| panic!("{name}: a parameter has no gradient")).clone();
            let mut total = 0.0;
            for (param, var) in model.vars() {
                let g = grad(var);
                // Summed in f64: an f32 sum over millions of squares drifts by 1e-4.
                let norm = scalar(&g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap());
                total += norm;
                let per_param = expected["grad_norm_per_param"][param].as_f64().unwrap();
                assert_rel(&label(&format!("grad norm of {param}")), norm.sqrt(), per_param, 1e-5);
                if let Some(stored) = reference.get(&format!("{part}.grad.{param}")) {
                    let diff = max_abs(&(g - stored).unwrap());
                    assert!(
                        diff <= 1e-4 * max_abs(stored) + 1e-7,
                        "{}: off by {diff}",
                        label(&format!("gradient of {param}"))
                    );
                }
            }
            assert_rel(&label("global grad norm"), total.sqrt(), expected["grad_norm"].as_f64().unwrap(), 1e-5);

            let config = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
            let mut optimizer = AdamW::new(model.vars(), config).unwrap();
            optimizer.step(model.vars(), &grads, 1.0, 1e-3).unwrap();
            for (param, var) in model.vars() {
                let after = var.as_tensor();
                let l2 = scalar(&after.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap()).sqrt();
                assert_rel(
                    &label(&format!("L2 of {param} after AdamW")),
                    l2,
                    expected["param_after_l2"][param].as_f64().unwrap(),
                    1e-4,
                );
                if let Some(stored) = reference.get(&format!("{part}.param_after.{param}")) {
                    let diff = max_abs(&(after - stored).unwrap());
                    assert!(
                        diff <= 1e-4 * max_abs(stored),
                        "{}: off by {diff}",
                        label(&format!("{param} after AdamW"))
                    );
                }
            }
            let after = objective.losses(&model.forward(&ids, None).unwrap(), &batch, Kernels::Fused).unwrap();
            assert_rel(
                &label("loss after the step"),
                scalar(&after.total),
                expected["loss_after"].as_f64().unwrap(),
                1e-4,
            );
            assert_rel(
                &label("fusion after the step"),
                scalar(&after.fusion),
                expected["fusion_after"].as_f64().unwrap(),
                1e-4,
            );
        }
    }
}
