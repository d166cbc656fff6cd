//! Levenshtein distance with unit costs over symbols (Unicode code points), as the
//! `editdistance` package the paper's code calls. Short patterns (every token of a real
//! vocabulary) use Myers' bit-parallel algorithm: one pass of word operations per symbol.

/// A pattern prepared for repeated comparisons against many texts.
pub struct Pattern {
    len: usize,
    /// Distinct symbols of the pattern with the bit mask of their positions (Myers' Peq).
    masks: Vec<(u32, u64)>,
    symbols: Vec<u32>,
}

impl Pattern {
    pub fn new(symbols: &[u32]) -> Self {
        let mut masks: Vec<(u32, u64)> = Vec::new();
        if symbols.len() <= 64 {
            for (i, &s) in symbols.iter().enumerate() {
                match masks.iter_mut().find(|(m, _)| *m == s) {
                    Some((_, bits)) => *bits |= 1 << i,
                    None => masks.push((s, 1 << i)),
                }
            }
        }
        Self { len: symbols.len(), masks, symbols: symbols.to_vec() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Edit distance between the pattern and `text`.
    pub fn distance(&self, text: &[u32]) -> u32 {
        if self.len == 0 {
            return text.len() as u32;
        }
        if self.len > 64 {
            return classic(&self.symbols, text);
        }
        let top = 1u64 << (self.len - 1);
        let (mut pv, mut mv, mut score) = (!0u64, 0u64, self.len as u32);
        for &c in text {
            let eq = self.masks.iter().find(|(s, _)| *s == c).map_or(0, |&(_, bits)| bits);
            let xv = eq | mv;
            let xh = (((eq & pv).wrapping_add(pv)) ^ pv) | eq;
            let mut ph = mv | !(xh | pv);
            let mut mh = pv & xh;
            if ph & top != 0 {
                score += 1;
            } else if mh & top != 0 {
                score -= 1;
            }
            ph = (ph << 1) | 1;
            mh <<= 1;
            pv = mh | !(xv | ph);
            mv = ph & xv;
        }
        score
    }
}

/// The textbook dynamic programme, for patterns longer than a machine word.
fn classic(a: &[u32], b: &[u32]) -> u32 {
    let mut row: Vec<u32> = (0..=b.len() as u32).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i as u32 + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = diag + u32::from(ca != cb);
            diag = row[j + 1];
            row[j + 1] = sub.min(row[j] + 1).min(diag + 1);
        }
    }
    row[b.len()]
}

/// The code points of a string, the symbols edit distances count.
pub fn symbols(s: &str) -> Vec<u32> {
    s.chars().map(u32::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(a: &str, b: &str) -> u32 {
        Pattern::new(&symbols(a)).distance(&symbols(b))
    }

    #[test]
    fn distances_by_hand() {
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("abc", ""), 3);
        assert_eq!(d("▁the", "the"), 1);
        assert_eq!(d("Ċ", "<0x0A>"), 6);
        assert_eq!(d("flaw", "lawn"), 2);
    }

    #[test]
    fn bit_parallel_agrees_with_the_dynamic_programme() {
        let words = ["", "a", "ab", "ba", "abc", "▁▁", "hello", "yellow", "ĠĠĠ", "Ñĥ", "à la carte", "carte"];
        let long: String = "abcdefghij".repeat(7); // 70 symbols: the classic path
        for a in words.iter().copied().chain([long.as_str()]) {
            for b in words.iter().copied().chain([long.as_str()]) {
                assert_eq!(d(a, b), classic(&symbols(a), &symbols(b)), "{a:?} vs {b:?}");
            }
        }
    }
}
