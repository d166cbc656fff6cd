//! `fusellm align` as a stage: two stores over one split corpus in, an aligned store with a
//! row and a CE per target position out, and a report that adds up.

use std::path::{Path, PathBuf};

use crate::common::fixtures;
use fusellm_core::align::stage::align_stores;
use fusellm_core::checkpoint::{Checkpoint, Stored};
use fusellm_core::files::file_sha256;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::{Configured, Registry};
use fusellm_core::precompute::{precompute, Settings};
use fusellm_core::store::{AlignedShard, Identity, Layout, FORMAT};
use fusellm_sdk::{ParamValue, PluginKind};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-align-stage-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A store of `model` over `corpus` (JSONL of pieces).
fn store(registry: &Registry, model: &str, corpus: &Path, texts: &[String]) -> PathBuf {
    let dir = fixtures::model_dir(model);
    let checkpoint = Checkpoint::open(&dir, registry, None).unwrap();
    let transformer =
        checkpoint.load_model(LoadMode::Frozen, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let identity = Identity {
        format: FORMAT.into(),
        model: dir.display().to_string(),
        model_sha256: checkpoint.content_sha256().unwrap(),
        tokenizer_sha256: file_sha256(&dir.join("tokenizer.json")).unwrap(),
        corpus: corpus.display().to_string(),
        corpus_sha256: file_sha256(corpus).unwrap(),
        documents: texts.len(),
        docs_per_shard: 4,
        layout: Layout { k: 10, wide_ids: false, half: true, residual: false },
    };
    let out = scratch(&format!("{model}-{}", corpus.file_stem().unwrap().to_string_lossy()));
    precompute(&out, &identity, texts, (&transformer, &checkpoint.tokenizer), Settings::default(), (0, 1), |_| {})
        .unwrap();
    out
}

#[test]
fn a_source_store_aligns_to_the_target_positions() {
    let registry = Registry::with_builtins().unwrap();
    let prose = std::fs::read_to_string(fixtures::root().join("corpora/prose/tinyshakespeare.test.txt")).unwrap();
    let texts: Vec<String> = prose.split("\n\n").take(6).map(str::to_string).collect();
    let corpus = scratch("corpus.jsonl");
    std::fs::write(
        &corpus,
        texts.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect::<String>(),
    )
    .unwrap();
    let (source, target) =
        (store(&registry, "tiny-mpt", &corpus, &texts), store(&registry, "tiny-llama2", &corpus, &texts));

    let checkpoint = |model: &str| Checkpoint::open(&fixtures::model_dir(model), &registry, None).unwrap();
    let (mpt, llama) = (checkpoint("tiny-mpt"), checkpoint("tiny-llama2"));
    let stored = |dir, checkpoint| Stored { dir, checkpoint };
    let mined = Configured::named(&registry, PluginKind::VocabMapper, "mined").unwrap();
    let cache = scratch("cache");
    for (aligner, compat) in [("dtw", true), ("dtw", false), ("offsets", false)] {
        let out = scratch(&format!("aligned-{aligner}-{compat}"));
        let aligner_of = Configured::named(&registry, PluginKind::SequenceAligner, aligner).unwrap();
        let plugins = (&aligner_of, &mined);
        let report =
            align_stores(stored(&source, &mpt), stored(&target, &llama), &out, plugins, compat, Some(&cache)).unwrap();
        assert_eq!(report.documents, 6);
        let kinds = report.one_to_one + report.one_to_many + report.many_to_one + report.unaligned;
        assert_eq!(kinds, report.target_positions);
        assert!((report.mass_exact + report.mass_mined + report.mass_lost - 1.0).abs() < 1e-9);
        assert!(report.one_to_one > report.target_positions / 2, "{aligner}: mostly one-to-one on prose");

        let mut positions = 0;
        for (file, _) in &report.shards {
            let shard = AlignedShard::decode(&std::fs::read(out.join(file)).unwrap()).unwrap();
            for (d, &doc) in shard.docs.iter().enumerate() {
                let n = (shard.offsets[d + 1] - shard.offsets[d]) as usize;
                assert_eq!(n, llama.tokenizer.encode(&texts[doc as usize]).unwrap().len(), "a row per target token");
                positions += n;
            }
            shard.rows.rows().check_shape(shard.ce_token.len(), "aligned rows").unwrap();
            assert!(shard.rows.ids.iter().all(|&id| id < 32000));
        }
        assert_eq!(positions, report.target_positions);
    }

    // The aligner's parameters reach it: DTW within one position of the diagonal aligns
    // otherwise than over the full matrix.
    let dtw = Configured::named(&registry, PluginKind::SequenceAligner, "dtw").unwrap();
    let band = [("band".to_string(), ParamValue::Int(1))].into_iter().collect();
    let banded = Configured::new(dtw.entry, &band).unwrap();
    let run = |aligner: &Configured, name: &str| {
        align_stores(stored(&source, &mpt), stored(&target, &llama), &scratch(name), (aligner, &mined), false, None)
            .unwrap()
    };
    let (full, narrow) = (run(&dtw, "full"), run(&banded, "banded"));
    assert_ne!(full.shards, narrow.shards, "band = 1 changed nothing: the parameter did not reach the aligner");

    let other = scratch("other.jsonl");
    std::fs::write(&other, "{\"text\": \"something else\"}\n").unwrap();
    let elsewhere = store(&registry, "tiny-llama2", &other, &["something else".to_string()]);
    let e =
        align_stores(stored(&source, &mpt), stored(&elsewhere, &llama), &scratch("never"), (&dtw, &mined), false, None)
            .unwrap_err()
            .report();
    assert!(e.contains("were computed over different corpora"), "{e}");
    // A checkpoint that is not the one a store was computed from is refused.
    let e =
        align_stores(stored(&source, &llama), stored(&target, &llama), &scratch("never"), (&dtw, &mined), false, None)
            .unwrap_err()
            .report();
    assert!(e.contains("was computed with another tokenizer"), "{e}");
}
