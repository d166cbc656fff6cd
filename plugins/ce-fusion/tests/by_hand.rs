//! MinCE and AvgCE on documents small enough to compute by hand.

use std::collections::BTreeMap;

use fusellm_ce_fusion::{AvgCe, MinCe};
use fusellm_sdk::{CandidateBuf, FusionFn, FusionInputBuf, ParamValue, Params, SparseRowsBuf};

/// A candidate from rows of (id, probability) pairs (stored as log-probabilities).
fn candidate(rows: &[&[(u32, f64)]], ce_doc: f32, ce_token: &[f32], is_target: bool) -> CandidateBuf {
    let mut dist = SparseRowsBuf::with_capacity(rows.len(), 0);
    for row in rows {
        let ids: Vec<u32> = row.iter().map(|e| e.0).collect();
        let logp: Vec<f32> = row.iter().map(|e| e.1.ln() as f32).collect();
        dist.push_row(&ids, &logp);
    }
    CandidateBuf { dist, ce_doc, ce_token: ce_token.to_vec(), tokens: rows.len() as u32, is_target }
}

fn params(plugin: &dyn FusionFn, given: &[(&str, ParamValue)]) -> Params {
    let given: BTreeMap<String, ParamValue> = given.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    Params::resolve(&plugin.info().params, &given).unwrap()
}

fn fuse(plugin: &dyn FusionFn, given: &[(&str, ParamValue)], input: &FusionInputBuf) -> Vec<Vec<(u32, f64)>> {
    let out = plugin.fuse(&params(plugin, given), &input.view()).unwrap();
    let rows = out.rows();
    (0..rows.len())
        .map(|p| {
            let (ids, probs) = rows.row(p);
            ids.iter().zip(probs).map(|(&i, &q)| (i, q as f64)).collect()
        })
        .collect()
}

fn assert_rows(actual: &[Vec<(u32, f64)>], expected: &[&[(u32, f64)]]) {
    assert_eq!(actual.len(), expected.len());
    for (p, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), e.len(), "position {p}: {a:?} vs {e:?}");
        for (x, y) in a.iter().zip(e.iter()) {
            assert_eq!(x.0, y.0, "position {p}: {a:?} vs {e:?}");
            assert!((x.1 - y.1).abs() < 1e-6, "position {p}: {a:?} vs {e:?}");
        }
    }
}

/// Target (CE 2.0) and two sources (CE 1.5 each); the first source has no aligned
/// distribution at position 1.
fn three_candidates() -> FusionInputBuf {
    FusionInputBuf {
        gold: vec![5, 9],
        text_bytes: 8,
        candidates: vec![
            candidate(&[&[(5, 0.5), (6, 0.5)], &[(9, 0.9)]], 2.0, &[0.1, 3.0], true),
            candidate(&[&[(5, 0.6), (7, 0.2)], &[]], 1.5, &[2.0, 1.0], false),
            candidate(&[&[(8, 0.4)], &[(9, 0.3), (4, 0.1)]], 1.5, &[3.0, 0.5], false),
        ],
    }
}

#[test]
fn min_ce_per_document_takes_the_lowest_ce_and_its_kept_entries_renormalised() {
    // Sources tie at 1.5: the first wins. Its row 0 renormalises 0.6 : 0.2 to 0.75 : 0.25;
    // it has no row 1, so the target's row stands in there (the paper's collator).
    let out = fuse(&MinCe, &[], &three_candidates());
    assert_rows(&out, &[&[(5, 0.75), (7, 0.25)], &[(9, 1.0)]]);
}

#[test]
fn min_ce_ties_go_to_the_target() {
    let mut input = three_candidates();
    input.candidates[0].ce_doc = 1.5;
    let out = fuse(&MinCe, &[], &input);
    assert_rows(&out, &[&[(5, 0.5), (6, 0.5)], &[(9, 1.0)]]);
}

#[test]
fn min_ce_per_token_ranks_each_position_by_its_own_ce() {
    // Position 0: the target has the lowest token CE (0.1); position 1: the second source (0.5).
    let out = fuse(&MinCe, &[("granularity", ParamValue::Str("token".into()))], &three_candidates());
    assert_rows(&out, &[&[(5, 0.5), (6, 0.5)], &[(9, 0.75), (4, 0.25)]]);
}

#[test]
fn min_ce_without_the_target_never_takes_its_distribution() {
    let mut input = three_candidates();
    input.candidates[0].ce_doc = 0.0;
    let out = fuse(&MinCe, &[("include_target", ParamValue::Bool(false))], &input);
    // Source 1 wins but has no row 1, and the target does not take part: source 2 fills in.
    assert_rows(&out, &[&[(5, 0.75), (7, 0.25)], &[(9, 0.75), (4, 0.25)]]);
}

#[test]
fn temperature_flattens_the_kept_entries() {
    // At temperature 2 the kept probabilities 0.6 : 0.2 become sqrt(0.6) : sqrt(0.2).
    let out = fuse(&MinCe, &[("temperature", ParamValue::Float(2.0))], &three_candidates());
    let (a, b) = (0.6f64.sqrt(), 0.2f64.sqrt());
    assert_rows(&out, &[&[(5, a / (a + b)), (7, b / (a + b))], &[(9, 1.0)]]);
}

/// Target (CE 2) predicting token 5 surely; one source (CE 1) splitting 0.75 : 0.25.
fn two_candidates() -> FusionInputBuf {
    FusionInputBuf {
        gold: vec![5],
        text_bytes: 4,
        candidates: vec![
            candidate(&[&[(5, 1.0)]], 2.0, &[2.0], true),
            candidate(&[&[(5, 0.6), (9, 0.2)]], 1.0, &[1.0], false),
        ],
    }
}

#[test]
fn avg_ce_softmax_weights_are_softmax_of_minus_ce_over_tau() {
    // w = softmax(-[2, 1]) = [1 / (1 + e), e / (1 + e)] = [0.268941, 0.731059].
    let w_target = 1.0 / (1.0 + std::f64::consts::E);
    let w_source = 1.0 - w_target;
    let out = fuse(&AvgCe, &[("weights", ParamValue::Str("softmax".into()))], &two_candidates());
    assert_rows(&out, &[&[(5, w_target + 0.75 * w_source), (9, 0.25 * w_source)]]);
}

#[test]
fn avg_ce_paper_weights_are_softmax_of_exp_minus_ce() {
    // w = softmax([e^-2, e^-1]): nearly uniform, as DESIGN.md notes of the paper's code.
    let (a, b) = ((-2f64).exp().exp(), (-1f64).exp().exp());
    let (w_target, w_source) = (a / (a + b), b / (a + b));
    assert!((w_target - 0.442_13).abs() < 1e-5);
    let out = fuse(&AvgCe, &[], &two_candidates());
    assert_rows(&out, &[&[(5, w_target + 0.75 * w_source), (9, 0.25 * w_source)]]);
}

#[test]
fn avg_ce_renormalises_the_weights_where_a_candidate_has_no_row() {
    let mut input = two_candidates();
    input.candidates[0].dist = SparseRowsBuf { offsets: vec![0, 0], ids: vec![], values: vec![] };
    let out = fuse(&AvgCe, &[("weights", ParamValue::Str("softmax".into()))], &input);
    assert_rows(&out, &[&[(5, 0.75), (9, 0.25)]]);
}

#[test]
fn min_ce_without_the_target_falls_back_by_rank_not_by_order() {
    // Three sources; the best (CE 1.0) has no row at position 0. The next by CE is the
    // last listed (CE 1.5), not the first (CE 3.0).
    let input = FusionInputBuf {
        gold: vec![5],
        text_bytes: 4,
        candidates: vec![
            candidate(&[&[(7, 1.0)]], 3.0, &[3.0], false),
            candidate(&[&[]], 1.0, &[1.0], false),
            candidate(&[&[(9, 1.0)]], 1.5, &[1.5], false),
        ],
    };
    let out = fuse(&MinCe, &[("include_target", ParamValue::Bool(false))], &input);
    assert_rows(&out, &[&[(9, 1.0)]]);
}

#[test]
fn avg_ce_with_every_ce_infinite_weighs_the_candidates_equally() {
    let mut input = two_candidates();
    input.candidates.iter_mut().for_each(|c| c.ce_doc = f32::NAN);
    let out = fuse(&AvgCe, &[("weights", ParamValue::Str("softmax".into()))], &input);
    assert_rows(&out, &[&[(5, 0.5 + 0.5 * 0.75), (9, 0.5 * 0.25)]]);
}

/// "Über dich" is 10 bytes. The target cuts it into 5 tokens (4 predictions) at 2.0 nats
/// each: 8 nats, 0.8 per byte. The source cuts it into 3 tokens (2 predictions) at 3.0
/// nats each: 6 nats, 0.6 per byte. Per token the target is better, per byte the source.
fn coarse_source() -> FusionInputBuf {
    let text = "Über dich";
    assert_eq!(text.len(), 10);
    let mut target = candidate(&[&[(5, 1.0)]], 2.0, &[2.0], true);
    target.tokens = 5;
    let mut source = candidate(&[&[(9, 0.5), (5, 0.5)]], 3.0, &[3.0], false);
    source.tokens = 3;
    FusionInputBuf { gold: vec![5], text_bytes: text.len() as u32, candidates: vec![target, source] }
}

#[test]
fn ce_per_byte_compares_tokenizers_of_different_granularity() {
    let per_token = fuse(&MinCe, &[], &coarse_source());
    assert_rows(&per_token, &[&[(5, 1.0)]]);
    let per_byte = fuse(&MinCe, &[("ce_norm", ParamValue::Str("byte".into()))], &coarse_source());
    assert_rows(&per_byte, &[&[(9, 0.5), (5, 0.5)]]);
    // Per token too: the token CE scales by the candidate's tokens per byte (2.0 * 4 / 10
    // = 0.8 against 3.0 * 2 / 10 = 0.6).
    let byte_token = [("ce_norm", ParamValue::Str("byte".into())), ("granularity", ParamValue::Str("token".into()))];
    assert_rows(&fuse(&MinCe, &byte_token, &coarse_source()), &[&[(9, 0.5), (5, 0.5)]]);
    // AvgCE weights softmax(-[0.8, 0.6] / tau), tau = 0.1: [1 / (1 + e^2), e^2 / (1 + e^2)].
    let w_target = 1.0 / (1.0 + 2f64.exp());
    let softmax = [
        ("ce_norm", ParamValue::Str("byte".into())),
        ("weights", ParamValue::Str("softmax".into())),
        ("tau", ParamValue::Float(0.1)),
    ];
    let out = fuse(&AvgCe, &softmax, &coarse_source());
    assert_rows(&out, &[&[(5, w_target + 0.5 * (1.0 - w_target)), (9, 0.5 * (1.0 - w_target))]]);
}

/// Not renormalised, rows keep their probabilities under the full softmax: MinCE's winner
/// 0.6 and 0.2 (its rest, 0.2, left to the loss's tail bucket); AvgCE's mixture of such
/// rows is their weighted sum, its mass the weighted sum of theirs.
#[test]
fn rows_not_renormalised_keep_the_mass_their_model_gave_them() {
    let raw = [("renormalize", ParamValue::Bool(false))];
    let out = fuse(&MinCe, &raw, &three_candidates());
    assert_rows(&out, &[&[(5, 0.6), (7, 0.2)], &[(9, 0.9)]]);
    let uniform = [
        ("renormalize", ParamValue::Bool(false)),
        ("weights", ParamValue::Str("softmax".into())),
        ("tau", ParamValue::Float(1e6)),
    ];
    let out = fuse(&AvgCe, &uniform, &three_candidates());
    // Position 0, each weight a third: 5 = (0.5 + 0.6) / 3, 6 = 0.5 / 3, 7 = 0.2 / 3, 8 = 0.4 / 3.
    let third = 1.0 / 3.0;
    let mass: f64 = out[0].iter().map(|e| e.1).sum();
    assert!((mass - (1.0 + 0.8 + 0.4) * third).abs() < 1e-5, "{out:?}");
    let at = |id: u32| out[0].iter().find(|e| e.0 == id).unwrap().1;
    assert!((at(5) - 1.1 * third).abs() < 1e-5 && (at(8) - 0.4 * third).abs() < 1e-5, "{out:?}");
    // The full softmax's mass is known at temperature 1 only.
    let hot = [("renormalize", ParamValue::Bool(false)), ("temperature", ParamValue::Float(2.0))];
    let e = MinCe.fuse(&params(&MinCe, &hot), &three_candidates().view()).unwrap_err();
    assert!(e.contains("temperature 1"), "{e}");
}
