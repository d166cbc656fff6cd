//! Alignment exact to the paper's code on its own outputs (../shared/fixtures/alignment):
//! DTW paths and costs, the MinED mapping of sampled tokens, and the projected top-k.

use std::sync::OnceLock;

use crate::common::fixtures;
use fusellm_core::align::vocab::{map_vocab, FlatStrings, Vocabulary};
use fusellm_core::align::{DocumentAligner, Tokens};
use fusellm_core::plugins::{Configured, Registry};
use fusellm_sdk::{Alignment, PluginKind, SparseRowsBuf, Tokenization, VocabMap};

fn vocab(name: &str) -> Vocabulary {
    Vocabulary::from_tokenizer_json(&fixtures::root().join("tokenizers").join(name).join("tokenizer.json")).unwrap()
}

/// Llama-2 (the paper's base, our target) and GPT-NeoX-20B (the blending source).
fn vocabularies() -> &'static (Vocabulary, Vocabulary) {
    static V: OnceLock<(Vocabulary, Vocabulary)> = OnceLock::new();
    V.get_or_init(|| (vocab("llama2"), vocab("gpt-neox-20b")))
}

fn alignment_json(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures::root().join("alignment").join(file)).unwrap()).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn strings(vocab: &Vocabulary, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| vocab.tokens[i as usize].clone()).collect()
}

/// The paper's DTW: source strings without "Ġ", target strings without "▁".
fn paper_dtw(base: &[String], blending: &[String]) -> Alignment {
    let registry = Registry::with_builtins().unwrap();
    let dtw = registry.get(PluginKind::SequenceAligner, "dtw").unwrap();
    let params = dtw.resolve_params(&Default::default()).unwrap();
    let strip = |tokens: &[String], marker: &str| tokens.iter().map(|t| t.replace(marker, "")).collect::<Vec<_>>();
    let (a, b) = (FlatStrings::new(&strip(blending, "\u{0120}")), FlatStrings::new(&strip(base, "\u{2581}")));
    let (a, b) = (Tokenization { strings: a.view(), spans: &[] }, Tokenization { strings: b.view(), spans: &[] });
    dtw.align(&params, a, b).unwrap()
}

#[test]
fn dtw_reproduces_the_paper_paths_and_costs() {
    let (llama, neox) = vocabularies();
    let fixture = alignment_json("testvec_dtw_10docs.json");
    for doc in fixture["docs"].as_array().unwrap() {
        let id = doc["doc_id"].as_str().unwrap();
        let base = strings(llama, &u32s(&doc["base_input_ids"]));
        let blending = strings(neox, &u32s(&doc["blending_input_ids"]));
        let expect_strings = |key: &str| {
            doc[key].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(base, expect_strings("base_tokens"), "{id}: Llama-2 token strings");
        assert_eq!(blending, expect_strings("blending_tokens"), "{id}: NeoX token strings");
        let path = paper_dtw(&base, &blending);
        let expected: Vec<(u32, u32)> = doc["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap() as u32))
            .collect();
        let ours: Vec<(u32, u32)> = path.a.iter().copied().zip(path.b.iter().copied()).collect();
        assert_eq!(ours, expected, "{id}: path");
        assert_eq!(path.cost, doc["dtw_cost"].as_f64().unwrap(), "{id}: cost");
    }
}

/// The paper's MinED map of the whole NeoX vocabulary onto Llama-2's.
fn paper_map() -> &'static VocabMap {
    static MAP: OnceLock<VocabMap> = OnceLock::new();
    MAP.get_or_init(|| {
        let (llama, neox) = vocabularies();
        let registry = Registry::with_builtins().unwrap();
        map_vocab(
            &Configured::named(&registry, PluginKind::VocabMapper, "mined").unwrap(),
            neox,
            llama,
            true,
            None,
            None,
        )
        .unwrap()
    })
}

#[test]
fn mined_reproduces_the_paper_mapping_of_sampled_tokens() {
    let (llama, neox) = vocabularies();
    let fixture = alignment_json("vocab_mapping_sample500_seed0.json");
    let map = paper_map();
    let records = fixture["records"].as_array().unwrap();
    assert_eq!(records.len(), 500);
    for r in records {
        let id = r["id"].as_u64().unwrap() as usize;
        assert_eq!(neox.tokens[id], r["source"].as_str().unwrap());
        let target = map.target[id].map(|t| llama.tokens[t as usize].as_str());
        assert_eq!(target, r["target"].as_str(), "NeoX {id} {:?}", r["source"]);
        assert_eq!(map.distance[id] == 0, r["exact"].as_bool().unwrap(), "NeoX {id}: exact match flag");
    }
}

#[test]
fn em_maps_only_exact_matches() {
    let (llama, neox) = vocabularies();
    let registry = Registry::with_builtins().unwrap();
    let em =
        map_vocab(&Configured::named(&registry, PluginKind::VocabMapper, "em").unwrap(), neox, llama, true, None, None)
            .unwrap();
    let exact = em.target.iter().flatten().count();
    assert_eq!(exact, 20362, "the paper's full map has 20362 exact matches");
    for (id, t) in em.target.iter().enumerate() {
        if let Some(t) = t {
            assert_eq!(neox.tokens[id].replace('\u{0120}', "\u{2581}"), llama.tokens[*t as usize]);
        }
    }
}

#[test]
fn compat_projection_reproduces_the_paper_transform() {
    let (llama, neox) = vocabularies();
    let fixture = alignment_json("testvec_transform_10docs.json");
    let registry = Registry::with_builtins().unwrap();
    let dtw = registry.get(PluginKind::SequenceAligner, "dtw").unwrap();
    let aligner =
        DocumentAligner::new(dtw, dtw.resolve_params(&Default::default()).unwrap(), paper_map(), neox, llama, true);
    for doc in fixture["docs"].as_array().unwrap() {
        let id = doc["doc_id"].as_str().unwrap();
        let (base_ids, blending_ids) = (u32s(&doc["base_input_ids"]), u32s(&doc["blending_input_ids"]));
        let mut topk = SparseRowsBuf::with_capacity(blending_ids.len(), blending_ids.len() * 10);
        let rows = doc["blending_per_step_indices"]
            .as_array()
            .unwrap()
            .iter()
            .zip(doc["blending_per_step_logits"].as_array().unwrap());
        for (ids, logits) in rows {
            let logits: Vec<f32> = logits.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            topk.push_row(&u32s(ids), &logits);
        }
        let (source, target) = (Tokens { ids: &blending_ids, spans: &[] }, Tokens { ids: &base_ids, spans: &[] });
        let (out, _) = aligner.align(source, target, topk.rows()).unwrap();
        let expected_ids = doc["aligned_per_step_indices"].as_array().unwrap();
        let expected_logits = doc["aligned_per_step_logits"].as_array().unwrap();
        assert_eq!(out.rows().len(), expected_ids.len(), "{id}");
        for p in 0..expected_ids.len() {
            let (ids, values) = out.rows().row(p);
            assert_eq!(ids, u32s(&expected_ids[p]).as_slice(), "{id} position {p}: ids");
            let logits: Vec<f32> =
                expected_logits[p].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(values, logits.as_slice(), "{id} position {p}: logits");
        }
    }
}

#[test]
fn compat_alignment_of_all_300_documents_is_the_paper_output() {
    // `fusellm bench align` checks the fixture's digest of the paper's whole output.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusellm"))
        .args(["bench", "align", "--fixtures"])
        .arg(fixtures::root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("output identical to the paper's: yes"), "{text}");
}

#[test]
fn aligners_give_the_same_results_as_builtin_dylib_and_wasm() {
    use crate::common::{dylib, registry_of, wasm};
    use fusellm_core::plugins::{Tier, WasmLimits};
    let (llama, neox) = vocabularies();
    let doc = &alignment_json("testvec_dtw_10docs.json")["docs"][2];
    let base = strings(llama, &u32s(&doc["base_input_ids"]));
    let blending = strings(neox, &u32s(&doc["blending_input_ids"]));
    // A slice of the source vocabulary keeps the single-threaded WASM mapping short.
    let source = FlatStrings::new(&neox.with_marker("\u{2581}")[..3000]);
    let target = FlatStrings::new(&llama.tokens);
    let (a, b) = (FlatStrings::new(&blending), FlatStrings::new(&base));
    let run = |registry: &Registry| {
        let dtw = registry.get(PluginKind::SequenceAligner, "dtw").unwrap();
        let mined = registry.get(PluginKind::VocabMapper, "mined").unwrap();
        let path = dtw
            .align(
                &dtw.resolve_params(&Default::default()).unwrap(),
                Tokenization { strings: a.view(), spans: &[] },
                Tokenization { strings: b.view(), spans: &[] },
            )
            .unwrap();
        let map = mined
            .map_vocab(
                &mined.resolve_params(&Default::default()).unwrap(),
                source.view(),
                target.view(),
                Default::default(),
            )
            .unwrap();
        (path, map)
    };
    let builtin = run(&Registry::with_builtins().unwrap());
    assert_eq!(builtin.0.a.len(), doc["matches"].as_array().unwrap().len());
    for (tier, file) in [(Tier::Dylib, dylib("fusellm_align")), (Tier::Wasm, wasm("fusellm_align"))] {
        let other = run(&registry_of(tier, &file, WasmLimits::default()));
        assert_eq!(other.0, builtin.0, "{tier}: DTW path");
        assert_eq!(other.1, builtin.1, "{tier}: MinED map");
    }
}

/// Canonical matching maps a source character to the target token the tokenizer actually
/// produces: Llama-2 has both `0` and `<0x30>`, and never emits the byte token for it.
#[test]
fn canonical_maps_prefer_regular_tokens_to_byte_fallback_twins() {
    let (llama, neox) = vocabularies();
    let registry = Registry::with_builtins().unwrap();
    let em = map_vocab(
        &Configured::named(&registry, PluginKind::VocabMapper, "em").unwrap(),
        neox,
        llama,
        false,
        None,
        None,
    )
    .unwrap();
    let id = |v: &Vocabulary, t: &str| v.tokens.iter().position(|x| x == t).unwrap();
    let target = |t: &str| em.target[id(neox, t)].map(|i| llama.tokens[i as usize].clone());
    assert_eq!(target("0").as_deref(), Some("0"));
    assert_eq!(target("a").as_deref(), Some("a"));
    // A byte with no regular token still maps to its byte token: a newline.
    assert_eq!(target("\u{010a}").as_deref(), Some("<0x0A>"));
}
