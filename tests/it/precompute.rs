//! Precompute keeps exactly what the model computes: batched and padded, the top-10 and the
//! per-token CE agree with the reference forward passes of transformers.

use crate::common::fixtures;
use candle_core::{DType, Device};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;
use fusellm_core::precompute::{topk, Settings};

#[test]
fn batched_top10_and_ce_agree_with_the_reference() {
    let texts = fixtures::json("texts.json");
    for name in ["tiny-llama2", "tiny-mpt"] {
        let registry = Registry::with_builtins().unwrap();
        let checkpoint = Checkpoint::open(&fixtures::model_dir(name), &registry, None).unwrap();
        let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
        let reference = fixtures::tensors(&format!("{name}.forward.safetensors"));
        let names: Vec<&str> = texts.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        let docs: Vec<Vec<u32>> = names.iter().map(|t| fixtures::ids(&reference[&format!("{t}.input_ids")])).collect();
        // A small budget forces several batches of padded documents.
        let settings = Settings { k: 10, batch_tokens: 300, residual: true, tokens: None };
        let kept = topk(&model, &docs, settings).unwrap();
        for (t, doc) in names.iter().zip(&kept) {
            let ref_lp: Vec<Vec<f32>> = reference[&format!("{t}.top10_logprobs")].to_vec2().unwrap();
            let ref_ids: Vec<Vec<i64>> = reference[&format!("{t}.top10_ids")].to_vec2().unwrap();
            let rank11: Vec<f32> = reference[&format!("{t}.rank11_logprob")].to_vec1().unwrap();
            for p in 0..doc.ids.len() {
                for r in 0..10 {
                    let ours = doc.topk_logprobs[p * 10 + r];
                    assert!((ours - ref_lp[p][r]).abs() < 1e-4, "{name} {t} position {p} rank {r}");
                    let tie = |a: f32, b: f32| (a - b).abs() < 1e-4;
                    let next = if r < 9 { ref_lp[p][r + 1] } else { rank11[p] };
                    let near_tie = (r > 0 && tie(ref_lp[p][r - 1], ref_lp[p][r])) || tie(ref_lp[p][r], next);
                    assert!(
                        doc.topk_ids[p * 10 + r] as i64 == ref_ids[p][r] || near_tie,
                        "{name} {t} position {p} rank {r}"
                    );
                }
                let residual = doc.residual.as_ref().unwrap()[p];
                let kept: f32 = doc.topk_logprobs[p * 10..p * 10 + 10].iter().map(|v| v.exp()).sum();
                assert!((residual + kept - 1.0).abs() < 1e-5);
            }
            let ref_ce: Vec<f32> = reference[&format!("{t}.ce")].to_vec1().unwrap();
            assert_eq!(doc.ce.len(), ref_ce.len());
            assert!(doc.ce.iter().zip(&ref_ce).all(|(a, b)| (a - b).abs() < 1e-4), "{name} {t} CE");
        }
    }
}

#[test]
fn bad_settings_and_empty_documents_are_refused() {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-mpt"), &registry, None).unwrap();
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let e = topk(&model, &[vec![1, 2, 3], vec![]], Settings::default()).unwrap_err().report();
    assert!(e.contains("document 1 has no tokens"), "{e}");
    let e = topk(&model, &[vec![1, 2]], Settings { k: 0, ..Settings::default() }).unwrap_err().report();
    assert!(e.contains("k = 0"), "{e}");
    let one = topk(&model, &[vec![7]], Settings::default()).unwrap();
    assert!(one[0].ce.is_empty() && one[0].mean_ce.is_nan() && one[0].topk_ids.len() == 10);
}
