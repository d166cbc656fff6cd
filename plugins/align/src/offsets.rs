//! Alignment by the character offsets that the tokenizers report: two tokens align when
//! their byte spans in the text overlap. Linear time, and exact wherever both tokenizers
//! cover the same characters; no string comparison at all.

use fusellm_sdk::{Alignment, Params, PluginInfo, PluginKind, SequenceAligner, Tokenization};

pub struct Offsets;

impl SequenceAligner for Offsets {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::SequenceAligner,
            "offsets",
            env!("CARGO_PKG_VERSION"),
            "aligns tokens whose character spans overlap (linear time; needs the tokenizers' offsets)",
        )
    }

    fn align(&self, _params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String> {
        for (side, t) in [("first", a), ("second", b)] {
            if t.spans.len() != 2 * t.len() {
                return Err(format!(
                    "the {side} tokenization has {} span bounds for {} tokens: the offsets aligner needs every token's span",
                    t.spans.len(),
                    t.len()
                ));
            }
        }
        Ok(by_offsets(a, b))
    }
}

/// Walks both tokenizations once, pairing overlapping spans; zero-width tokens (such as an
/// appended EOS) pair with each other when they sit at the same offset.
fn by_offsets(a: Tokenization<'_>, b: Tokenization<'_>) -> Alignment {
    let (mut i, mut j) = (0, 0);
    let mut path = Alignment::default();
    while i < a.len() && j < b.len() {
        let ((sa, ea), (sb, eb)) = (a.span(i).expect("checked"), b.span(j).expect("checked"));
        let overlap = sa.max(sb) < ea.min(eb);
        let same_point = sa == ea && sb == eb && sa == sb;
        if overlap || same_point {
            path.a.push(i as u32);
            path.b.push(j as u32);
        }
        // Advance whichever token ends first (both when they end together).
        match ea.cmp(&eb) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => (i, j) = (i + 1, j + 1),
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusellm_sdk::TokenStrings;

    fn tokenization<'a>(spans: &'a [u32], offsets: &'a [u32]) -> Tokenization<'a> {
        Tokenization { strings: TokenStrings { offsets, bytes: &[] }, spans }
    }

    #[test]
    fn overlapping_spans_pair_up() {
        // "the cats" as [the][ cats] and [the][ cat][s], then an EOS of zero width.
        let (a_spans, a_offsets) = ([0, 3, 3, 8, 8, 8], [0u32; 4]);
        let (b_spans, b_offsets) = ([0, 3, 3, 7, 7, 8, 8, 8], [0u32; 5]);
        let path = by_offsets(tokenization(&a_spans, &a_offsets), tokenization(&b_spans, &b_offsets));
        let pairs: Vec<(u32, u32)> = path.a.iter().copied().zip(path.b.iter().copied()).collect();
        assert_eq!(pairs, vec![(0, 0), (1, 1), (1, 2), (2, 3)]);
    }
}
