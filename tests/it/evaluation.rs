//! Evaluation and weight merging against cases computed by hand from full forward passes:
//! bits per byte, multiple-choice accuracy, an ensemble's mixture, a merge's average.

use std::path::{Path, PathBuf};

use crate::common::{fixtures, fusellm_in};
use candle_core::{DType, Device, Tensor};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::eval::{accuracy, loglik, mixture, score, Question, Scorer};
use fusellm_core::model::ops::log_softmax;
use fusellm_core::model::{LoadMode, Transformer};
use fusellm_core::plugins::Registry;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn open(dir: &Path) -> (Checkpoint, Transformer) {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(dir, &registry, None).unwrap();
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    (checkpoint, model)
}

/// `-log p(ids[t + 1])` for every t, from one forward pass over the whole sequence.
fn by_hand(model: &Transformer, ids: &[u32]) -> Vec<f64> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let lp = log_softmax(&model.forward(&input, None).unwrap()).unwrap().squeeze(0).unwrap();
    let lp = lp.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    (0..ids.len() - 1).map(|t| -lp[t][ids[t + 1] as usize]).collect()
}

const TEXT: &str = "Natalia sold clips to 48 of her friends in April.";

#[test]
fn bits_per_byte_is_the_summed_nll_over_the_bytes_with_every_token_predicted_once() {
    let (checkpoint, model) = open(&fixtures::model_dir("tiny-llama2"));
    let ids = checkpoint.tokenizer.encode(TEXT).unwrap();
    let expected: f64 = by_hand(&model, &ids).iter().sum::<f64>() / std::f64::consts::LN_2 / TEXT.len() as f64;
    let texts = vec![TEXT.to_string()];
    let whole = Scorer { model: &model, tokenizer: &checkpoint.tokenizer, window: 512, batch_tokens: 4096 };
    let s = score(&whole.text_nlls(&texts).unwrap(), TEXT.len() as u64).unwrap();
    assert_eq!(s.tokens as usize, ids.len() - 1);
    assert!((s.bits_per_byte() - expected).abs() < 1e-5 * expected, "{} vs {expected}", s.bits_per_byte());
    // Windows of 5 overlap by one token: still every token once, each with a shorter context.
    let windowed = Scorer { window: 5, ..whole };
    let nlls = windowed.text_nlls(&texts).unwrap();
    assert_eq!(nlls[0].len(), ids.len() - 1);
    let second_window = by_hand(&model, &ids[4..9]);
    assert!((nlls[0][4] as f64 - second_window[0]).abs() < 1e-4, "{} vs {}", nlls[0][4], second_window[0]);
}

#[test]
fn multiple_choice_scores_the_continuation_tokens_and_normalises_by_bytes() {
    let (checkpoint, model) = open(&fixtures::model_dir("tiny-llama2"));
    let scorer = Scorer { model: &model, tokenizer: &checkpoint.tokenizer, window: 512, batch_tokens: 4096 };
    let question = Question {
        context: "Question: how many clips did Natalia sell? Answer:".into(),
        choices: vec![" 72".into(), " seventy-two clips in all".into(), " 48".into()],
        answer: 0,
    };
    let context = checkpoint.tokenizer.encode(&question.context).unwrap();
    let hand: Vec<f64> = question
        .choices
        .iter()
        .map(|c| {
            let ids = checkpoint.tokenizer.encode(&format!("{}{c}", question.context)).unwrap();
            -by_hand(&model, &ids)[context.len() - 1..].iter().sum::<f64>()
        })
        .collect();
    let ours: Vec<f64> = scorer.choice_nlls(&question).unwrap().iter().map(|n| loglik(n)).collect();
    for (a, b) in ours.iter().zip(&hand) {
        assert!((a - b).abs() < 1e-4, "{ours:?} vs {hand:?}");
    }
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
    let per_byte: Vec<f64> = hand.iter().zip(&question.choices).map(|(l, c)| l / c.len() as f64).collect();
    let result = accuracy(std::slice::from_ref(&question), &[ours]).unwrap();
    assert_eq!(result.acc, f64::from(u8::from(argmax(&hand) == 0)));
    assert_eq!(result.acc_norm, f64::from(u8::from(argmax(&per_byte) == 0)));
}

#[test]
fn an_ensemble_averages_the_members_probabilities() {
    let mixed = mixture(&[vec![vec![1.0, 2.0]], vec![vec![3.0, 2.0]]]).unwrap();
    let expected = -((-1f64).exp() / 2.0 + (-3f64).exp() / 2.0).ln();
    assert!((mixed[0][0] as f64 - expected).abs() < 1e-6 && (mixed[0][1] - 2.0).abs() < 1e-6);
    assert!(mixture(&[vec![vec![1.0]], vec![vec![1.0, 2.0]]]).unwrap_err().report().contains("share a tokenizer"));

    // Two different models with one tokenizer: tiny-llama2 and its weights scaled by 0.8.
    let dir = scratch("ensemble");
    let base = fixtures::model_dir("tiny-llama2");
    let scaled = dir.join("scaled");
    let out = fusellm_in(
        &dir,
        &["merge", "--model", base.to_str().unwrap(), "--weights", "0.8", "--out", scaled.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("set.txt"), TEXT).unwrap();
    let out = fusellm_in(
        &dir,
        &[
            "eval",
            "--model",
            base.to_str().unwrap(),
            "--model",
            "scaled",
            "--ensemble",
            "--set",
            "s=set.txt",
            "--out",
            "report",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report/eval.json")).unwrap()).unwrap();
    let ensemble =
        rows.as_array().unwrap().iter().find(|r| r["model"] == "ensemble").unwrap()["bits_per_byte"].as_f64().unwrap();
    let ((c1, m1), (_, m2)) = (open(&base), open(&scaled));
    let ids = c1.tokenizer.encode(TEXT).unwrap();
    let (a, b) = (by_hand(&m1, &ids), by_hand(&m2, &ids));
    let nll: f64 = a.iter().zip(&b).map(|(x, y)| -((-x).exp() / 2.0 + (-y).exp() / 2.0).ln()).sum();
    let expected = nll / std::f64::consts::LN_2 / TEXT.len() as f64;
    assert!((ensemble - expected).abs() < 1e-5 * expected, "{ensemble} vs {expected}");
    assert!(std::fs::read(dir.join("report/eval.png")).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn merge_averages_parameters_and_refuses_other_architectures() {
    let dir = scratch("merge");
    let (llama, openllama) = (fixtures::model_dir("tiny-llama2"), fixtures::model_dir("tiny-openllama"));
    let out = fusellm_in(
        &dir,
        &[
            "merge",
            "--model",
            llama.to_str().unwrap(),
            "--model",
            openllama.to_str().unwrap(),
            "--weights",
            "0.25,0.75",
            "--out",
            "merged",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let load = |d: &Path| candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let (a, b, merged) = (load(&llama), load(&openllama), load(&dir.join("merged")));
    assert_eq!(merged.len(), a.len());
    for (name, m) in &merged {
        let expected = ((&a[name] * 0.25).unwrap() + (&b[name] * 0.75).unwrap()).unwrap();
        let diff = (m - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{name}: off by {diff}");
    }
    assert!(dir.join("merged/config.json").exists() && dir.join("merged/tokenizer.json").exists());

    let mpt = fixtures::model_dir("tiny-mpt");
    let out = fusellm_in(
        &dir,
        &["merge", "--model", llama.to_str().unwrap(), "--model", mpt.to_str().unwrap(), "--out", "bad"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("differ: `lm_head.weight` is in only one of them"), "{stderr}");
}
