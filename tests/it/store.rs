//! The distribution store: what precompute keeps comes back from disk; an interrupted run
//! resumes to the very same bytes; workers slice the corpus exactly once; a store made
//! differently is refused; a corrupt shard is found.

use std::path::{Path, PathBuf};

use crate::common::fixtures;
use candle_core::{DType, Device};
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::{LoadMode, Transformer};
use fusellm_core::plugins::Registry;
use fusellm_core::precompute::{precompute, topk, Settings};
use fusellm_core::store::{verify, Identity, Layout, Manifest, Shard, FORMAT};

fn texts() -> Vec<String> {
    let prose = std::fs::read_to_string(fixtures::root().join("corpora/prose/tinyshakespeare.test.txt")).unwrap();
    prose.split("\n\n").take(11).map(str::to_string).collect()
}

fn setup() -> (Checkpoint, Transformer) {
    let registry = Registry::with_builtins().unwrap();
    let checkpoint = Checkpoint::open(&fixtures::model_dir("tiny-llama2"), &registry, None).unwrap();
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).unwrap();
    (checkpoint, model)
}

fn identity(documents: usize, k: usize) -> Identity {
    Identity {
        format: FORMAT.into(),
        model: "tiny-llama2".into(),
        model_sha256: "m".into(),
        tokenizer_sha256: "t".into(),
        corpus: "test".into(),
        corpus_sha256: "c".into(),
        documents,
        docs_per_shard: 3,
        layout: Layout { k, wide_ids: false, half: true, residual: false },
    }
}

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run(
    dir: &Path,
    id: &Identity,
    worker: (usize, usize),
    (checkpoint, model): &(Checkpoint, Transformer),
) -> fusellm_core::error::Result<()> {
    let settings = Settings { k: id.layout.k, batch_tokens: 2048, residual: false, tokens: None };
    precompute(dir, id, &texts()[..id.documents], (model, &checkpoint.tokenizer), settings, worker, |_| {}).map(|_| ())
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn shards_give_back_what_precompute_kept() {
    let setup = setup();
    let docs: Vec<Vec<u32>> = texts()[..4].iter().map(|t| setup.0.tokenizer.encode(t).unwrap()).collect();
    let tops = topk(&setup.1, &docs, Settings { residual: true, ..Settings::default() }).unwrap();
    for half in [false, true] {
        let layout = Layout { k: 10, wide_ids: false, half, residual: true };
        let shard = Shard::decode(&Shard::new(&[0, 1, 2, 3], &tops, layout).encode(layout).unwrap()).unwrap();
        let tol = if half { 1e-2 } else { 0.0 };
        for (d, top) in tops.iter().enumerate() {
            let span = shard.offsets[d] as usize * 10..shard.offsets[d + 1] as usize * 10;
            assert_eq!(shard.topk_ids[span.clone()], top.topk_ids[..]);
            assert!(shard.topk_logprobs[span]
                .iter()
                .zip(&top.topk_logprobs)
                .all(|(a, b)| (a - b).abs() <= tol * b.abs().max(1.0)));
            let ce = shard.ce(d, &top.ids, 10).unwrap();
            assert!(ce.iter().zip(&top.ce).all(|(a, b)| (a - b).abs() <= tol * b.abs().max(1.0)), "document {d} CE");
            assert!((shard.mean_ce[d] - top.mean_ce).abs() < 1e-6);
        }
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_bytes_and_workers_cover_the_corpus_once() {
    let setup = setup();
    let id = identity(8, 10);
    let whole = fresh("whole");
    run(&whole, &id, (0, 1), &setup).unwrap();
    let reference = manifest(&whole);
    assert_eq!(reference.shards.len(), 3);
    assert_eq!(reference.shards.iter().map(|s| s.documents).sum::<usize>(), 8);

    // Two workers fill one store; the second's run completes it and writes the manifest.
    let split = fresh("workers");
    run(&split, &id, (0, 2), &setup).unwrap();
    assert!(!split.join("manifest.json").exists(), "worker 0 alone leaves shard 1 missing");
    run(&split, &id, (1, 2), &setup).unwrap();
    assert_eq!(manifest(&split).shards, reference.shards);

    // Workers on nodes without a shared folder: two stores, merged into one.
    let (node_a, node_b, merged) = (fresh("node-a"), fresh("node-b"), fresh("merged"));
    run(&node_a, &id, (0, 2), &setup).unwrap();
    let e = fusellm_core::store::merge(&merged, std::slice::from_ref(&node_a)).unwrap_err().report();
    assert!(e.contains("shard(s) 1 are in none of the inputs"), "{e}");
    run(&node_b, &id, (1, 2), &setup).unwrap();
    fusellm_core::store::merge(&merged, &[node_a, node_b]).unwrap();
    assert_eq!(manifest(&merged).shards, reference.shards);

    // An interruption: one shard never renamed into place, a temporary file left behind.
    std::fs::remove_file(split.join("shard-00001.safetensors")).unwrap();
    std::fs::remove_file(split.join("manifest.json")).unwrap();
    std::fs::write(split.join("shard-00001.tmp999"), b"half a shard").unwrap();
    run(&split, &id, (0, 1), &setup).unwrap();
    assert_eq!(manifest(&split).shards, reference.shards, "byte-identical shards after resuming");
}

#[test]
fn a_store_made_otherwise_is_refused_and_a_corrupt_shard_is_found() {
    let setup = setup();
    let dir = fresh("mismatch");
    run(&dir, &identity(3, 10), (0, 1), &setup).unwrap();
    let e = run(&dir, &identity(3, 5), (0, 1), &setup).unwrap_err().report();
    assert!(e.contains("was written with another k: 10, not 5"), "{e}");
    let e = run(&dir, &identity(3, 10), (2, 2), &setup).unwrap_err().report();
    assert!(e.contains("worker index must be below"), "{e}");

    assert!(verify(&dir).unwrap().corrupt.is_empty());
    let shard = dir.join("shard-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    assert_eq!(verify(&dir).unwrap().corrupt, vec!["shard-00000.safetensors".to_string()]);
    // Running precompute again computes that shard, and only it, again.
    let settings = Settings { k: 10, batch_tokens: 2048, residual: false, tokens: None };
    let summary =
        precompute(&dir, &identity(3, 10), &texts()[..3], (&setup.1, &setup.0.tokenizer), settings, (0, 1), |_| {})
            .unwrap();
    assert_eq!((summary.written, summary.skipped), (1, 0));
    assert!(verify(&dir).unwrap().corrupt.is_empty());
    let e = verify(&fresh("none")).unwrap_err().report();
    assert!(e.contains("has no manifest"), "{e}");
}

#[test]
fn a_precompute_killed_mid_run_resumes_to_the_uninterrupted_store() {
    use std::process::{Command, Stdio};
    let corpus = fresh("kill-corpus").with_extension("jsonl");
    let lines: String =
        texts().iter().cycle().take(24).map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
    std::fs::write(&corpus, lines).unwrap();
    let model = fixtures::model_dir("tiny-llama2");
    let precompute = |out: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusellm"));
        cmd.args(["precompute", "--docs-per-shard", "2", "--model"])
            .arg(&model)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--out")
            .arg(out);
        cmd.stderr(Stdio::null());
        cmd
    };
    let whole = fresh("kill-whole");
    assert!(precompute(&whole).status().unwrap().success());

    let killed = fresh("kill-resumed");
    let mut child = precompute(&killed).spawn().unwrap();
    while !killed.join("shard-00001.safetensors").exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(precompute(&killed).status().unwrap().success());
    assert_eq!(manifest(&killed).shards, manifest(&whole).shards, "byte-identical shards after kill -9 and a restart");
}

#[test]
fn a_failed_write_keeps_the_finished_shards_and_the_run_completes_later() {
    // A write that fails half-way (as on a full disk): a directory sits where the second
    // shard's temporary file goes.
    let setup = setup();
    let id = identity(8, 10);
    let dir = fresh("write-failure");
    std::fs::create_dir_all(&dir).unwrap();
    let blocker = dir.join(format!("shard-00001.tmp{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("inside")).unwrap();
    let e = run(&dir, &id, (0, 1), &setup).unwrap_err().report();
    assert!(e.contains("writing") && e.contains("shard-00001"), "{e}");
    assert!(dir.join("shard-00000.safetensors").exists(), "the finished shard stays");
    assert!(!dir.join("shard-00001.safetensors").exists() && !dir.join("manifest.json").exists());

    std::fs::remove_dir_all(&blocker).unwrap();
    run(&dir, &id, (0, 1), &setup).unwrap();
    let whole = fresh("write-failure-reference");
    run(&whole, &id, (0, 1), &setup).unwrap();
    assert_eq!(manifest(&dir).shards, manifest(&whole).shards);
}
