//! One training step of the fixture models reproduces the reference: the CLM, fusion and
//! combined losses, the global gradient norm, and the stored gradients.

use crate::common::fixtures;
use candle_core::{DType, Device, Tensor, Var};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::loss::{clm_loss, fusion_loss, next_token_logprobs};
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_rel(what: &str, ours: f64, reference: f64, rtol: f64) {
    assert!((ours - reference).abs() <= rtol * reference.abs(), "{what}: {ours} vs {reference}");
}

#[test]
fn losses_gradient_norms_and_gradients_match_the_reference_step() {
    for name in ["tiny-llama2", "tiny-mpt"] {
        let registry = Registry::with_builtins().unwrap();
        let checkpoint = Checkpoint::open(&fixtures::model_dir(name), &registry, None).unwrap();
        let reference = fixtures::tensors(&format!("{name}.train_step.safetensors"));
        let summary = fixtures::json(&format!("{name}.train_step.json"));
        let ids = reference["batch.input_ids"].to_dtype(DType::U32).unwrap();
        let target_ids = reference["fusion.target_ids"].to_dtype(DType::U32).unwrap();
        let target_probs = &reference["fusion.target_probs"];

        for part in ["ce", "combined"] {
            // Each part starts from the checkpoint's weights, as the reference does.
            let model = checkpoint.load_model(LoadMode::Trainable, DType::F32, &Device::Cpu).unwrap();
            let lp = next_token_logprobs(&model.forward(&ids, None).unwrap()).unwrap();
            let ce = clm_loss(&lp, &ids).unwrap();
            let fusion = fusion_loss(&lp, &target_ids, target_probs).unwrap();
            let expected = &summary[part];
            assert_rel(&format!("{name} {part} CLM loss"), scalar(&ce), expected["ce_before"].as_f64().unwrap(), 1e-5);
            assert_rel(
                &format!("{name} {part} fusion loss"),
                scalar(&fusion),
                expected["fusion_before"].as_f64().unwrap(),
                1e-5,
            );
            let loss = if part == "ce" { ce } else { ((ce * 0.9).unwrap() + (fusion * 0.1).unwrap()).unwrap() };
            assert_rel(&format!("{name} {part} loss"), scalar(&loss), expected["loss_before"].as_f64().unwrap(), 1e-5);

            let grads = loss.backward().unwrap();
            let grad =
                |var: &Var| grads.get(var).unwrap_or_else(|| panic!("{name}: a parameter has no gradient")).clone();
            let mut total = 0.0;
            for (param, var) in model.vars() {
                let g = grad(var);
                // Summed in f64: an f32 sum over millions of squares drifts by 1e-4.
                let norm = scalar(&g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap());
                total += norm;
                let per_param = expected["grad_norm_per_param"][param].as_f64().unwrap();
                assert_rel(&format!("{name} {part} grad norm of {param}"), norm.sqrt(), per_param, 1e-5);
                if let Some(stored) = reference.get(&format!("{part}.grad.{param}")) {
                    let diff = scalar(&(g - stored).unwrap().abs().unwrap().max_all().unwrap());
                    let scale = scalar(&stored.abs().unwrap().max_all().unwrap());
                    assert!(
                        diff <= 1e-4 * scale + 1e-7,
                        "{name} {part} gradient of {param}: off by {diff} (scale {scale})"
                    );
                }
            }
            assert_rel(
                &format!("{name} {part} global grad norm"),
                total.sqrt(),
                expected["grad_norm"].as_f64().unwrap(),
                1e-5,
            );
        }
    }
}
