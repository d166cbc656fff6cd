//! Projection of a source's top-k onto the target's positions (DESIGN.md step 4), after a
//! sequence alignment: under `Rule::Compat` exactly the paper's `transform_step_logits`
//! (soft mode), defects included; under `Rule::Corrected` the fixed rule.

use std::collections::HashMap;

use fusellm_sdk::{Alignment, SparseRows, SparseRowsBuf, VocabMap};

/// One side of a document: its token ids and their strings.
pub struct Side<'a> {
    pub ids: &'a [u32],
    /// Per position, the string the rule compares: the raw vocabulary string under
    /// `Compat`, the canonical one under `Corrected`.
    pub strings: &'a [&'a str],
}

pub enum Rule<'a> {
    /// The paper: a target position aligned to exactly one source position whose token
    /// matches (equal strings after swapping the source's space marker for the target's,
    /// or mapped onto the target token) takes that source's top-k, logits unchanged,
    /// duplicates merged to the first; every other position gets a one-hot on its CURRENT
    /// token (the known defect). `byte_level_source` enables the paper's "special case for
    /// mpt" at position 0.
    Compat {
        source_marker: &'a str,
        target_marker: &'a str,
        byte_level_source: bool,
        /// The paper's mapping is keyed by the source string with its marker swapped; the
        /// position-0 special case looks up a string that is not the token's own.
        by_string: &'a HashMap<String, u32>,
    },
    /// Ours: one-to-one matches as above on canonical strings; a one-to-many or many-to-one
    /// span whose strings join up takes the distribution of its last token (FuseChat);
    /// every other position gets a one-hot on the NEXT token (none at the last position);
    /// values are log-probabilities, merged duplicates summing their probability.
    Corrected,
}

/// The source's top-k rows projected onto every target position.
pub fn project(
    rule: &Rule<'_>,
    alignment: &Alignment,
    source: &Side<'_>,
    target: &Side<'_>,
    topk: SparseRows<'_>,
    map: &VocabMap,
) -> SparseRowsBuf {
    let spans = Spans::new(alignment, source.ids.len(), target.ids.len());
    let mut out = SparseRowsBuf::with_capacity(target.ids.len(), target.ids.len() * 10);
    let mut scratch = Scratch::default();
    for i in 0..target.ids.len() {
        match rule {
            Rule::Compat { .. } => match spans.to_source[i].as_slice() {
                &[j] if compat_match(rule, i, j as usize, source, target) => {
                    push_logits(&mut out, topk.row(j as usize), map)
                }
                _ => out.push_row(&[target.ids[i]], &[1.0]),
            },
            Rule::Corrected => match corrected_source(i, &spans, source, target, map) {
                Some(j) => push_probabilities(&mut out, topk.row(j), map, &mut scratch),
                None => match target.ids.get(i + 1) {
                    Some(&next) => out.push_row(&[next], &[0.0]),
                    None => out.end_row(),
                },
            },
        }
    }
    out
}

/// The alignment as lists: the source positions of each target position and back.
struct Spans {
    to_source: Vec<Vec<u32>>,
    to_target: Vec<Vec<u32>>,
}

impl Spans {
    fn new(alignment: &Alignment, n_source: usize, n_target: usize) -> Self {
        let (mut to_source, mut to_target) = (vec![Vec::new(); n_target], vec![Vec::new(); n_source]);
        for (&a, &b) in alignment.a.iter().zip(&alignment.b) {
            to_source[b as usize].push(a);
            to_target[a as usize].push(b);
        }
        Self { to_source, to_target }
    }
}

/// Whether target position `i` and source position `j` hold the same token, as the
/// paper's code decides it.
fn compat_match(rule: &Rule<'_>, i: usize, j: usize, source: &Side<'_>, target: &Side<'_>) -> bool {
    let Rule::Compat { source_marker, target_marker, byte_level_source, by_string } = rule else {
        unreachable!("only the compat rule asks")
    };
    let base = target.strings[i];
    let mut blending = source.strings[j].replace(source_marker, target_marker);
    if *byte_level_source && i == 0 && base.starts_with(target_marker) && !blending.starts_with(target_marker) {
        // The paper's "special case for mpt": Llama's normaliser prepends the marker.
        blending.insert_str(0, target_marker);
    }
    base == blending || by_string.get(&blending) == Some(&target.ids[i])
}

/// The source position whose distribution predicts what follows target position `i`: the
/// last source token of a span that ends with `i` on both sides and spells the same text
/// (or, one-to-one, maps onto the target token).
fn corrected_source(i: usize, spans: &Spans, source: &Side<'_>, target: &Side<'_>, map: &VocabMap) -> Option<usize> {
    let sources = &spans.to_source[i];
    let last = *sources.last()? as usize;
    let targets = &spans.to_target[last];
    let closes_here = *targets.last()? as usize == i;
    // One source over several targets (one-to-many), or several sources each on i alone
    // (many-to-one); a many-to-many knot has no clean boundary.
    let clean = sources.len() == 1 || sources.iter().all(|&j| spans.to_target[j as usize] == [i as u32]);
    if !closes_here || !clean {
        return None;
    }
    let source_text: String = sources.iter().map(|&j| source.strings[j as usize]).collect();
    let target_text: String = targets.iter().map(|&t| target.strings[t as usize]).collect();
    let mapped = sources.len() == 1 && targets.len() == 1 && map.get(source.ids[last]) == Some(target.ids[i]);
    (source_text == target_text || mapped).then_some(last)
}

/// The paper's projection of one row: mapped ids, logits unchanged, the first of
/// duplicates kept, unmapped entries dropped.
fn push_logits(out: &mut SparseRowsBuf, (ids, values): (&[u32], &[f32]), map: &VocabMap) {
    let start = out.ids.len();
    for (&id, &v) in ids.iter().zip(values) {
        if let Some(t) = map.get(id) {
            if !out.ids[start..].contains(&t) {
                out.ids.push(t);
                out.values.push(v);
            }
        }
    }
    out.end_row();
}

/// Buffers reused across the positions of a document.
#[derive(Default)]
struct Scratch {
    probs: Vec<f64>,
    mapped: Vec<u32>,
    kept: Vec<f64>,
    mix: fusellm_sdk::Mixture,
}

/// The corrected projection of one row: probabilities over the kept entries, mapped,
/// duplicates summed, stored as log-probabilities (the mass of unmapped entries is lost).
fn push_probabilities(out: &mut SparseRowsBuf, (ids, values): (&[u32], &[f32]), map: &VocabMap, s: &mut Scratch) {
    fusellm_sdk::math::softmax_into(values, 1.0, &mut s.probs);
    s.mapped.clear();
    s.kept.clear();
    for (&id, &p) in ids.iter().zip(&s.probs) {
        if let Some(t) = map.get(id) {
            s.mapped.push(t);
            s.kept.push(p);
        }
    }
    s.mix.clear();
    s.mix.add(&s.mapped, &s.kept, 1.0);
    let start = out.ids.len();
    s.mix.push_normalised(out);
    out.values[start..].iter_mut().for_each(|v| *v = fusellm_sdk::math::ln(*v as f64) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(pairs: &[(u32, u32)]) -> Alignment {
        Alignment { a: pairs.iter().map(|p| p.0).collect(), b: pairs.iter().map(|p| p.1).collect(), cost: 0.0 }
    }

    /// Source rows: row j has ids [10 + j, 20 + j] with probabilities 0.75 : 0.25.
    fn topk(n: usize) -> SparseRowsBuf {
        let mut rows = SparseRowsBuf::with_capacity(n, 2 * n);
        for j in 0..n as u32 {
            rows.push_row(&[10 + j, 20 + j], &[0.75f32.ln(), 0.25f32.ln()]);
        }
        rows
    }

    /// Source ids map to themselves.
    fn identity() -> VocabMap {
        VocabMap { target: (0..64).map(Some).collect(), distance: vec![0; 64] }
    }

    fn rows(out: &SparseRowsBuf) -> Vec<Vec<(u32, f32)>> {
        let r = out.rows();
        (0..r.len()).map(|p| r.row(p).0.iter().copied().zip(r.row(p).1.iter().map(|v| v.exp())).collect()).collect()
    }

    fn close(a: &[Vec<(u32, f32)>], b: &[Vec<(u32, f32)>]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.0 == q.0 && (p.1 - q.1).abs() < 1e-6)
            })
    }

    #[test]
    fn a_word_split_in_the_source_takes_its_last_piece() {
        // Target " the", " cats"; source " the", " cat", "s".
        let (t_ids, s_ids) = ([1, 2], [1, 5, 6]);
        let target = Side { ids: &t_ids, strings: &[" the", " cats"] };
        let source = Side { ids: &s_ids, strings: &[" the", " cat", "s"] };
        let out =
            project(&Rule::Corrected, &path(&[(0, 0), (1, 1), (2, 1)]), &source, &target, topk(3).rows(), &identity());
        assert!(close(&rows(&out), &[vec![(10, 0.75), (20, 0.25)], vec![(12, 0.75), (22, 0.25)]]), "{:?}", rows(&out));
    }

    #[test]
    fn a_word_split_in_the_target_uses_the_source_at_its_end_only() {
        // Target " cat", "s"; source " cats": the first piece predicts "s", not what follows.
        let (t_ids, s_ids) = ([7, 8], [3]);
        let target = Side { ids: &t_ids, strings: &[" cat", "s"] };
        let source = Side { ids: &s_ids, strings: &[" cats"] };
        let out = project(&Rule::Corrected, &path(&[(0, 0), (0, 1)]), &source, &target, topk(1).rows(), &identity());
        assert!(close(&rows(&out), &[vec![(8, 1.0)], vec![(10, 0.75), (20, 0.25)]]), "{:?}", rows(&out));
    }

    #[test]
    fn a_mismatch_falls_back_to_the_next_token_and_the_last_position_to_nothing() {
        let (t_ids, s_ids) = ([4, 9], [4, 9]);
        let target = Side { ids: &t_ids, strings: &[" dog", " ran"] };
        let source = Side { ids: &s_ids, strings: &[" cat", " sat"] };
        let unmapped = VocabMap { target: vec![None; 64], distance: vec![0; 64] };
        let out = project(&Rule::Corrected, &path(&[(0, 0), (1, 1)]), &source, &target, topk(2).rows(), &unmapped);
        assert!(close(&rows(&out), &[vec![(9, 1.0)], vec![]]), "{:?}", rows(&out));
        // The paper's rule puts the one-hot on the current token instead.
        let by_string = HashMap::new();
        let compat = Rule::Compat {
            source_marker: "\u{0120}",
            target_marker: "\u{2581}",
            byte_level_source: true,
            by_string: &by_string,
        };
        let out = project(&compat, &path(&[(0, 0), (1, 1)]), &source, &target, topk(2).rows(), &unmapped);
        assert_eq!(
            (out.ids.as_slice(), out.values.as_slice()),
            ([4, 9].as_slice(), [1.0, 1.0].as_slice()),
            "a logit of 1"
        );
    }

    #[test]
    fn duplicates_after_mapping_sum_their_probability() {
        // Both ids of the source row map to target id 5.
        let mut map = identity();
        map.target[10] = Some(5);
        map.target[20] = Some(5);
        let (t_ids, s_ids) = ([1, 2], [1, 2]);
        let target = Side { ids: &t_ids, strings: &[" a", " b"] };
        let source = Side { ids: &s_ids, strings: &[" a", " b"] };
        let out = project(&Rule::Corrected, &path(&[(0, 0), (1, 1)]), &source, &target, topk(2).rows(), &map);
        assert!(close(&rows(&out)[..1], &[vec![(5, 1.0)]]), "{:?}", rows(&out));
    }
}
