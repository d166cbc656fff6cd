//! The import format: a store written by examples/import/fusellm_store.py (any tool's
//! distributions, no adapter) verifies, and holds what fusellm itself would have stored.

use std::process::Command;

use crate::common::fixtures;
use candle_core::{DType, Device};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;
use fusellm_core::precompute::{topk, Settings};
use fusellm_core::store::{verify, Layout, Shard};

#[test]
fn a_store_written_in_python_reads_as_fusellm_writes_it() {
    let registry = Registry::with_builtins().unwrap();
    let dir = fixtures::model_dir("tiny-llama2");
    let checkpoint = Checkpoint::open(&dir, &registry, None).unwrap();
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    let texts = ["First document.", "A second, somewhat longer document of prose.", "Third."];
    let docs: Vec<Vec<u32>> = texts.iter().map(|t| checkpoint.tokenizer.encode(t).unwrap()).collect();
    let tops = topk(&model, &docs, Settings::default()).unwrap();

    let scratch = std::env::temp_dir().join(format!("fusellm-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let corpus = scratch.join("pieces.jsonl");
    std::fs::write(&corpus, texts.iter().map(|t| format!("{{\"text\": {t:?}}}\n")).collect::<String>()).unwrap();
    let documents: Vec<serde_json::Value> = tops
        .iter()
        .map(|d| {
            let rows = |v: &[u32]| v.chunks(10).map(|r| r.to_vec()).collect::<Vec<_>>();
            let lp: Vec<Vec<f32>> = d.topk_logprobs.chunks(10).map(|r| r.to_vec()).collect();
            serde_json::json!({ "ids": d.ids, "topk_ids": rows(&d.topk_ids), "topk_logprobs": lp, "ce": d.ce })
        })
        .collect();
    let spec = scratch.join("distributions.json");
    std::fs::write(&spec, serde_json::json!({ "k": 10, "docs_per_shard": 2, "documents": documents }).to_string())
        .unwrap();

    let writer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/import/fusellm_store.py");
    let store = scratch.join("store");
    let out = Command::new("python3")
        .arg(writer)
        .args([&spec, &store, &dir.join("tokenizer.json"), &corpus])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let check = verify(&store).unwrap();
    assert!(check.missing.is_empty() && check.corrupt.is_empty());
    assert_eq!(check.tokens, docs.iter().map(Vec::len).sum::<usize>());
    let layout = Layout { k: 10, wide_ids: false, half: true, residual: false };
    let ours = Shard::decode(&Shard::new(&[0, 1], &tops[..2], layout).encode(layout).unwrap()).unwrap();
    let theirs = Shard::decode(&std::fs::read(store.join("shard-00000.safetensors")).unwrap()).unwrap();
    assert_eq!((&theirs.docs, &theirs.offsets, &theirs.topk_ids), (&ours.docs, &ours.offsets, &ours.topk_ids));
    assert_eq!(theirs.topk_logprobs, ours.topk_logprobs, "the same f16 values");
    assert_eq!((&theirs.ce_missing_at, &theirs.ce_missing), (&ours.ce_missing_at, &ours.ce_missing));
    assert!(theirs.mean_ce.iter().zip(&ours.mean_ce).all(|(a, b)| (a - b).abs() < 1e-5));
    for (d, doc) in docs.iter().enumerate().take(2) {
        assert_eq!(theirs.ce(d, doc, 10).unwrap(), ours.ce(d, doc, 10).unwrap());
    }
}
