//! FuseChat's statistics-based vocabulary mapping (MS, `align_token_and_vocab.py` of
//! FuseAI/FuseChat): a source token with an exact match takes it; otherwise, among the target
//! tokens the sequence aligner paired it with somewhere in the corpus, the one of lowest
//! `edit distance x (0.1 where one string contains the other) x sigmoid(count)`, ties to the
//! lowest id. The distance is taken with the space marker stripped (kept where stripping
//! leaves nothing), as FuseChat strips its "▁"/"Ġ" (the host's canonical strings spell both
//! as a space). As in FuseChat's code, the count only scales the distance, by a factor
//! between 0.73 and 1 that grows with it: pairs seen together are the candidates, and
//! among those of equal distance the rarer one wins. A token never paired with any target
//! token stays unmapped by default (FuseChat maps it to the unknown token, which would
//! teach the target an id its tokenizer does not produce), or takes MinED's match.

use fusellm_sdk::{Cooccurrence, Params, PluginInfo, PluginKind, TokenStrings, VocabMap, VocabMapper};

use crate::edit_distance::{symbols, Pattern};
use crate::vocab::{decode, Vocab};

/// Exact match, else the co-occurring target token nearest by FuseChat's score.
pub struct Ms;

fusellm_sdk::params! {
    /// What `ms` takes.
    pub struct MsParams {
        /// a source token the corpus never aligned: unmapped ("none"), or MinED's nearest
        /// target token ("mined")
        unaligned: Unaligned = Unaligned::None;
    }
}

fusellm_sdk::choices! {
    /// Where a token without co-occurrence counts goes.
    pub enum Unaligned {
        None = "none",
        Mined = "mined",
    }
}

impl VocabMapper for Ms {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::VocabMapper,
            "ms",
            env!("CARGO_PKG_VERSION"),
            "FuseChat's statistics-based mapping: exact match, else among the target tokens aligned with it in the corpus the nearest by edit distance (scaled by 0.1 for substrings and by the sigmoid of the count)",
        )
        .params::<MsParams>()
        .reads_cooccurrence()
    }

    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target_strings: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        let fallback = match MsParams::read(params)?.unaligned {
            Unaligned::None => None,
            Unaligned::Mined => Some(Vocab::new(target_strings)?),
        };
        let (source, target) = (decode(source)?, decode(target_strings)?);
        let mut exact = std::collections::HashMap::new();
        for (id, t) in target.iter().enumerate() {
            exact.entry(t.as_str()).or_insert(id as u32);
        }
        let mut out = VocabMap { target: Vec::with_capacity(source.len()), distance: Vec::with_capacity(source.len()) };
        for (s, text) in source.iter().enumerate() {
            let (to, distance) = match exact.get(text.as_str()) {
                Some(&id) => (Some(id), 0),
                None => match (nearest(text, &target, cooccurrence.of(s as u32)), &fallback) {
                    (Some((id, d)), _) => (Some(id), d),
                    (None, Some(vocab)) => match vocab.nearest(text) {
                        (u32::MAX, _) => (None, 0),
                        (id, d) => (Some(id), d),
                    },
                    (None, None) => (None, 0),
                },
            };
            out.target.push(to);
            out.distance.push(distance);
        }
        Ok(out)
    }
}

/// The string FuseChat measures: without the space marker, unless nothing is left.
fn stripped(s: &str) -> &str {
    let trimmed = s.trim_matches(' ');
    if trimmed.is_empty() {
        s
    } else {
        trimmed
    }
}

/// (id, edit distance) of the candidate of lowest score, the first (lowest id) of equals.
/// The distance reported is the strings' own, marker included (0: the same string), as
/// the other mappers report it.
fn nearest(source: &str, target: &[String], candidates: impl Iterator<Item = (u32, u32)>) -> Option<(u32, u32)> {
    let a = stripped(source);
    let pattern = Pattern::new(&symbols(a));
    let mut best: Option<(f64, u32)> = None;
    for (id, count) in candidates {
        let Some(t) = target.get(id as usize) else { continue };
        let b = stripped(t);
        let substring = if a.contains(b) || b.contains(a) { 0.1 } else { 1.0 };
        let score = f64::from(pattern.distance(&symbols(b))) * substring / (1.0 + (-f64::from(count)).exp());
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, id));
        }
    }
    let (_, id) = best?;
    Some((id, Pattern::new(&symbols(source)).distance(&symbols(&target[id as usize]))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusellm_sdk::CooccurrenceBuf;

    fn flat(words: &[&str]) -> (Vec<u32>, Vec<u8>) {
        let mut offsets = vec![0u32];
        let mut bytes = Vec::new();
        for w in words {
            bytes.extend_from_slice(w.as_bytes());
            offsets.push(bytes.len() as u32);
        }
        (offsets, bytes)
    }

    fn map(source: &[&str], target: &[&str], counts: &[((u32, u32), u32)]) -> VocabMap {
        let ((so, sb), (to, tb)) = (flat(source), flat(target));
        let counts = CooccurrenceBuf::from_counts(counts.iter().copied());
        let params = Params::resolve(&Ms.info().params, &Default::default()).unwrap();
        Ms.map_vocab(
            &params,
            TokenStrings { offsets: &so, bytes: &sb },
            TokenStrings { offsets: &to, bytes: &tb },
            counts.view(),
        )
        .unwrap()
    }

    /// Hand-made co-occurrence cases, each score worked out: exact matches win whatever the
    /// counts; among co-occurring candidates the score ranks; a token never aligned stays
    /// unmapped; the space marker is stripped for the distance.
    #[test]
    fn ms_ranks_co_occurring_targets_by_fusechat_s_score() {
        let target = ["the", " the", "ther", "abc", "xyz", "a", " ", "qa", "qb"];
        let source = [
            "the",   // 0: exact, though aligned with "xyz" often
            "thea",  // 1: "the" (ED 1, substring: 0.1 x sig(1) = 0.073) vs "ther" (ED 1, 1 x sig(50) = 1.0)
            "abd",   // 2: "abc" (ED 1 x sig(1) = 0.73) vs "a" (ED 2, substring 0.1 x sig(9) = 0.2): "a"
            "qqq",   // 3: never aligned: unmapped
            " ther", // 4: stripped "ther" equals target 2's stripped: ED 0 with "ther"
            "  ",    // 5: all marker, kept as it is: ED 1 to " " (a substring of it), 0.1 x sig(2)
            "qc",    // 6: "qa" and "qb", equal in distance and count: the lower id
        ];
        let counts = [
            ((0, 4), 40),
            ((1, 0), 1),
            ((1, 2), 50),
            ((2, 3), 1),
            ((2, 5), 9),
            ((4, 0), 3),
            ((4, 2), 1),
            ((5, 6), 2),
            ((6, 8), 2),
            ((6, 7), 2),
        ];
        let m = map(&source, &target, &counts);
        assert_eq!(m.target, vec![Some(0), Some(0), Some(5), None, Some(2), Some(6), Some(7)]);
        // Distances as the strings stand: " ther" is one edit from "ther".
        assert_eq!(m.distance, vec![0, 1, 2, 0, 1, 1, 1]);
    }

    /// Among near-equal distances the count breaks the tie towards the rarer pair, as
    /// FuseChat's sigmoid weighting does.
    #[test]
    fn the_count_scales_the_distance_as_fusechat_s_sigmoid() {
        let m = map(&["ab"], &["ax", "ay"], &[((0, 0), 10), ((0, 1), 1)]);
        assert_eq!(m.target, vec![Some(1)]);
    }
}
