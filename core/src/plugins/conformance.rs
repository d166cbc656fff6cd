//! `fusellm plugins test`: a conformance check that any fusion plugin must pass before a
//! run trusts it: valid shapes and probabilities, determinism, and no failure on the edge
//! cases real corpora produce (empty and single-token documents, unaligned positions).

use std::collections::BTreeMap;

use fusellm_sdk::{CandidateBuf, FusionInputBuf, ParamKind, ParamValue, SparseRowsBuf};

use super::Entry;
use crate::rng::Rng;

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
/// `top_k` distinct ids with descending log-probabilities, as a precompute store does.
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

/// Runs the conformance check of a fusion plugin.
pub fn check_fusion(entry: &Entry) -> Vec<CheckResult> {
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
        for (case, input) in cases() {
            let name = if label.is_empty() { case.to_string() } else { format!("{case} [{label}]") };
            let outcome = run_twice(entry, &params, &input);
            results.push(CheckResult { name, outcome });
        }
    }
    results
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
