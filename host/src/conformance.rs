//! `fusellm plugins test`: the conformance check a plugin of any kind must pass before a
//! run trusts it, on the edge cases real corpora produce, with every parameter setting:
//! - fusion: valid shapes and probabilities on empty and single-token documents,
//!   unaligned positions, ties; the same bits on a second call;
//! - sequence aligners: a tokenization aligned with itself one to one, paths that span
//!   both documents whatever their granularity, empty and one-token documents;
//! - vocabulary mappers: a vocabulary mapped onto itself exactly, maps in range whatever
//!   the other vocabulary holds;
//! - adapters: a bare config.json of each declared model type gives a spec that passes
//!   its checks or an error, and broken JSON an error, never a panic;
//!
//! and every kind answers the same twice.

use std::collections::BTreeMap;

use fusellm_sdk::{
    CandidateBuf, CheckpointFiles, FusionInputBuf, ParamKind, ParamValue, Params, PluginKind, SparseRowsBuf,
    TokenStrings, Tokenization,
};

use super::Entry;
use fusellm_sdk::rng::Rng;

/// The outcome of one check.
pub struct CheckResult {
    pub name: String,
    pub outcome: Result<(), String>,
}

/// The shape of a synthetic document.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub positions: usize,
    pub candidates: usize,
    pub top_k: usize,
    pub vocab: u32,
    /// Share of positions where a source has no aligned distribution (an empty row).
    pub unaligned: f64,
}

/// A synthetic fusion input: candidate 0 is the target, the others sources; each row holds
/// `top_k` distinct ids with descending log-probabilities summing (as probabilities) to
/// less than one, as a precompute store holds them.
pub fn synthetic_input(seed: u64, shape: Shape) -> FusionInputBuf {
    let mut rng = Rng::new(seed);
    let gold: Vec<u32> = (0..shape.positions).map(|_| rng.below(shape.vocab)).collect();
    let candidates = (0..shape.candidates)
        .map(|c| {
            let mut dist = SparseRowsBuf::with_capacity(shape.positions, shape.positions * shape.top_k);
            for &g in &gold {
                if c > 0 && rng.unit() < shape.unaligned {
                    dist.end_row();
                    continue;
                }
                let mut ids: Vec<u32> = Vec::with_capacity(shape.top_k);
                if rng.unit() < 0.5 {
                    ids.push(g);
                }
                while ids.len() < shape.top_k {
                    let id = rng.below(shape.vocab);
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                let mut logp: Vec<f32> = (0..shape.top_k).map(|_| (-12.0 * rng.unit()) as f32).collect();
                logp.sort_by(|a, b| b.total_cmp(a));
                // Log-probabilities under a full softmax: the kept ones leave some mass to the rest.
                let kept: f64 = logp.iter().map(|&l| f64::from(l).exp()).sum();
                let shift = (kept * (1.0 + rng.unit())).ln() as f32;
                logp.iter_mut().for_each(|l| *l -= shift);
                dist.push_row(&ids, &logp);
            }
            CandidateBuf {
                dist,
                ce_doc: (1.0 + 3.0 * rng.unit()) as f32,
                ce_token: (0..shape.positions).map(|_| (8.0 * rng.unit()) as f32).collect(),
                tokens: shape.positions as u32 + rng.below(8),
                is_target: c == 0,
            }
        })
        .collect();
    FusionInputBuf { gold, text_bytes: 4 * shape.positions as u32, candidates }
}

/// The documents every fusion plugin is tried on.
fn cases() -> Vec<(&'static str, FusionInputBuf)> {
    let shape = Shape { positions: 64, candidates: 3, top_k: 10, vocab: 32000, unaligned: 0.0 };
    let mut tied = synthetic_input(4, shape);
    tied.candidates.iter_mut().for_each(|c| {
        c.ce_doc = 2.0;
        c.ce_token.iter_mut().for_each(|x| *x = 1.5);
    });
    let mut lone_source = synthetic_input(6, Shape { candidates: 1, ..shape });
    lone_source.candidates[0].is_target = false;
    vec![
        ("a 64-token document, 3 candidates, top-10", synthetic_input(1, shape)),
        ("an empty document", synthetic_input(2, Shape { positions: 0, ..shape })),
        ("a single-token document", synthetic_input(3, Shape { positions: 1, ..shape })),
        ("sources unaligned at a third of the positions", synthetic_input(5, Shape { unaligned: 0.33, ..shape })),
        ("equal cross-entropies (ties)", tied),
        ("a single source and no target", lone_source),
        ("top-1 rows", synthetic_input(7, Shape { top_k: 1, ..shape })),
    ]
}

/// Every parameter setting worth trying: the defaults, then each choice option and the
/// flipped value of each boolean, one parameter at a time.
fn settings(entry: &Entry) -> Vec<BTreeMap<String, ParamValue>> {
    let mut out = vec![BTreeMap::new()];
    for spec in &entry.info.params {
        let values: Vec<ParamValue> = match &spec.kind {
            ParamKind::Choice { options } => options.iter().map(|o| ParamValue::Str(o.clone())).collect(),
            ParamKind::Bool => vec![ParamValue::Bool(true), ParamValue::Bool(false)],
            _ => vec![],
        };
        for v in values.into_iter().filter(|v| *v != spec.default) {
            out.push(BTreeMap::from([(spec.name.clone(), v)]));
        }
    }
    out
}

/// Runs the conformance check of a plugin of any kind: every case with every setting.
pub fn check(entry: &Entry) -> Vec<CheckResult> {
    let mut results = Vec::new();
    for given in settings(entry) {
        let label = given.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
        let params = match entry.resolve_params(&given) {
            Ok(p) => p,
            Err(e) => {
                results.push(CheckResult { name: format!("parameters {label}"), outcome: Err(e.message) });
                continue;
            }
        };
        let named = |case: &str| if label.is_empty() { case.to_string() } else { format!("{case} [{label}]") };
        let mut push = |case: &str, outcome| results.push(CheckResult { name: named(case), outcome });
        match entry.info.kind {
            PluginKind::Fusion => {
                for (case, input) in cases() {
                    push(case, run_twice(entry, &params, &input));
                }
            }
            PluginKind::SequenceAligner => {
                for (case, a, b, check) in alignment_cases() {
                    push(case, align_twice(entry, &params, (&a, &b), check));
                }
            }
            PluginKind::VocabMapper => {
                for (case, source, target, check) in vocabulary_cases() {
                    push(case, map_twice(entry, &params, (&source, &target), check));
                }
            }
            PluginKind::Adapter => {
                for (case, config) in adapter_cases(entry) {
                    push(&case, adapt_twice(entry, &params, &config));
                }
            }
        }
    }
    results
}

/// Token strings with their spans in the text they concatenate to.
struct Tokens {
    offsets: Vec<u32>,
    bytes: Vec<u8>,
    spans: Vec<u32>,
}

impl Tokens {
    fn of(tokens: &[&str]) -> Self {
        let mut out = Tokens { offsets: vec![0], bytes: Vec::new(), spans: Vec::new() };
        for t in tokens {
            out.spans.extend([out.bytes.len() as u32, (out.bytes.len() + t.len()) as u32]);
            out.bytes.extend(t.as_bytes());
            out.offsets.push(out.bytes.len() as u32);
        }
        out
    }

    fn strings(&self) -> TokenStrings<'_> {
        TokenStrings { offsets: &self.offsets, bytes: &self.bytes }
    }

    fn view(&self) -> Tokenization<'_> {
        Tokenization { strings: self.strings(), spans: &self.spans }
    }

    fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    fn token(&self, i: usize) -> &[u8] {
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// What an alignment must be besides monotone and in range (the registry checks those).
#[derive(Clone, Copy)]
enum PathCheck {
    /// Token i with token i, each once.
    Diagonal,
    /// From the first tokens to the last ones.
    Spans,
    /// Anything valid (a side is empty).
    Valid,
}

fn alignment_cases() -> Vec<(&'static str, Tokens, Tokens, PathCheck)> {
    let words = ["The", " cat", " sat", " on", " the", " mat", "."];
    vec![
        ("a tokenization with itself", Tokens::of(&words), Tokens::of(&words), PathCheck::Diagonal),
        (
            "a coarse and a fine tokenization",
            Tokens::of(&words),
            Tokens::of(&["Th", "e", " c", "at", " s", "at", " on", " t", "he", " m", "a", "t", "."]),
            PathCheck::Spans,
        ),
        ("one token each", Tokens::of(&["Hello"]), Tokens::of(&["Hel", "lo"]), PathCheck::Spans),
        ("an empty document", Tokens::of(&[]), Tokens::of(&words), PathCheck::Valid),
    ]
}

fn align_twice(entry: &Entry, params: &Params, (a, b): (&Tokens, &Tokens), check: PathCheck) -> Result<(), String> {
    let first = entry.align(params, a.view(), b.view()).map_err(|e| e.message)?;
    let second = entry.align(params, a.view(), b.view()).map_err(|e| e.message)?;
    if (&first.a, &first.b, first.cost.to_bits()) != (&second.a, &second.b, second.cost.to_bits()) {
        return Err("not deterministic: two calls on the same input differ".into());
    }
    let ends = |path: &[u32]| (path.first().copied(), path.last().copied());
    let spans = |path: &[u32], side: &Tokens| ends(path) == (Some(0), side.len().checked_sub(1).map(|n| n as u32));
    match check {
        PathCheck::Diagonal if first.a != first.b || first.a != (0..a.len() as u32).collect::<Vec<_>>() => {
            Err(format!("aligned a tokenization with itself as {:?} / {:?}, not one to one", first.a, first.b))
        }
        PathCheck::Spans if !spans(&first.a, a) || !spans(&first.b, b) => {
            Err(format!("the path {:?} / {:?} does not run from the first tokens to the last", first.a, first.b))
        }
        _ => Ok(()),
    }
}

/// What a vocabulary map must be besides one entry per source token.
#[derive(Clone, Copy)]
enum MapCheck {
    /// Each token to itself, at distance 0.
    Identity,
    /// Target ids in range, distance 0 exactly where the strings are equal.
    InRange,
}

fn vocabulary_cases() -> Vec<(&'static str, Tokens, Tokens, MapCheck)> {
    let vocab = ["<s>", "a", "b", "ab", "\u{2581}the", "the", "\u{0120}cat", "\u{00e9}t\u{00e9}"];
    vec![
        ("a vocabulary onto itself", Tokens::of(&vocab), Tokens::of(&vocab), MapCheck::Identity),
        (
            "onto a vocabulary lacking some tokens",
            Tokens::of(&vocab),
            Tokens::of(&["a", "the", "c", "at", "\u{00e9}"]),
            MapCheck::InRange,
        ),
        ("onto a one-token vocabulary", Tokens::of(&vocab), Tokens::of(&["x"]), MapCheck::InRange),
    ]
}

fn map_twice(entry: &Entry, params: &Params, (s, t): (&Tokens, &Tokens), check: MapCheck) -> Result<(), String> {
    // No corpus here: a mapper that reads co-occurrence counts gets none.
    let none = Default::default();
    let first = entry.map_vocab(params, s.strings(), t.strings(), none).map_err(|e| e.message)?;
    let second = entry.map_vocab(params, s.strings(), t.strings(), none).map_err(|e| e.message)?;
    if (&first.target, &first.distance) != (&second.target, &second.distance) {
        return Err("not deterministic: two calls on the same input differ".into());
    }
    if first.target.len() != s.len() || first.distance.len() != s.len() {
        return Err(format!(
            "{} and {} entries for {} source tokens",
            first.target.len(),
            first.distance.len(),
            s.len()
        ));
    }
    for (i, (&to, &d)) in first.target.iter().zip(&first.distance).enumerate() {
        let wrong = match (check, to) {
            (MapCheck::Identity, to) => to != Some(i as u32) || d != 0,
            (MapCheck::InRange, Some(j)) => j as usize >= t.len() || (d == 0) != (s.token(i) == t.token(j as usize)),
            (MapCheck::InRange, None) => false,
        };
        if wrong {
            return Err(format!("source token {i} mapped to {to:?} at distance {d}"));
        }
    }
    Ok(())
}

/// A bare config.json of each model type the adapter declares, and broken JSON.
fn adapter_cases(entry: &Entry) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = entry
        .info
        .handles
        .iter()
        .map(|t| (format!("a bare config.json of `{t}`"), serde_json::json!({ "model_type": t }).to_string()))
        .collect();
    out.push(("a config.json that is not JSON".into(), "{ not json".into()));
    out
}

/// A spec that passes its checks (the registry checks it) or an error, the same twice.
fn adapt_twice(entry: &Entry, params: &Params, config: &str) -> Result<(), String> {
    let files = CheckpointFiles { config_json: config, tokenizer_json: None };
    let first = entry.adapt(params, files).map_err(|e| e.message);
    let second = entry.adapt(params, files).map_err(|e| e.message);
    match (first, second) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(a), Err(b)) if a == b => match a.contains("plugin panicked") {
            true => Err(a),
            false => Ok(()),
        },
        _ => Err("not deterministic: two calls on the same input differ".into()),
    }
}

/// Valid output (checked by the registry), and the same bits on a second call.
fn run_twice(entry: &Entry, params: &fusellm_sdk::Params, input: &FusionInputBuf) -> Result<(), String> {
    let first = entry.fuse(params, &input.view()).map_err(|e| e.message)?;
    let second = entry.fuse(params, &input.view()).map_err(|e| e.message)?;
    if !first.bit_identical(&second) {
        return Err("not deterministic: two calls on the same input differ".into());
    }
    Ok(())
}
