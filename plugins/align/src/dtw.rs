//! Dynamic time warping over two token sequences with edit-distance costs (FuseLLM's token
//! alignment, DESIGN.md step 4), exact to the paper's `dtw` in `others.py`: the same
//! recurrence, and a backtrace whose ties go diagonal, then up, then left.
//!
//! The paper computes one edit distance per cell in Python; here each distinct pair of
//! token strings is measured once (a document repeats its tokens) and the cells only add
//! integers.

use std::collections::HashMap;

use fusellm_sdk::{Alignment, Params, PluginInfo, PluginKind, SequenceAligner, TokenStrings, Tokenization};

use crate::edit_distance::{symbols, Pattern};

pub struct Dtw;

fusellm_sdk::params! {
    /// What `dtw` takes.
    pub struct DtwParams {
        /// 0: the full matrix (the paper); otherwise only cells within this many positions of
        /// the diagonal
        band: i64 = 0, min(0.0);
    }
}

impl SequenceAligner for Dtw {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::SequenceAligner,
            "dtw",
            env!("CARGO_PKG_VERSION"),
            "dynamic time warping with edit-distance costs, the paper's path and tie rule",
        )
        .params::<DtwParams>()
    }

    fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String> {
        let strings = |t: TokenStrings<'_>| -> Result<Vec<Vec<u32>>, String> {
            (0..t.len())
                .map(|i| std::str::from_utf8(t.get(i)).map(symbols).map_err(|e| format!("token {i} is not UTF-8: {e}")))
                .collect()
        };
        let DtwParams { band } = DtwParams::read(params)?;
        Ok(dtw(&strings(a.strings)?, &strings(b.strings)?, band as usize))
    }
}

const INF: u32 = u32::MAX;

/// The DTW path from (0, 0) to (n - 1, m - 1) of sequences `a` (n tokens) and `b`, and its
/// cost; an empty sequence gives an empty path.
pub fn dtw(a: &[Vec<u32>], b: &[Vec<u32>], band: usize) -> Alignment {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 {
        return Alignment::default();
    }
    let cost = CostTable::new(a, b);
    let in_band = |i: usize, j: usize| {
        band == 0 || {
            let centre = if n == 1 { 0 } else { i * (m - 1) / (n - 1) };
            j.abs_diff(centre) <= band
        }
    };
    // t[i * m + j]: the paper's matrix without its first row and column.
    let mut t = vec![INF; n * m];
    for i in 0..n {
        for j in 0..m {
            if !in_band(i, j) {
                continue;
            }
            let at = |ii: usize, jj: usize| t[ii * m + jj];
            let prev = match (i, j) {
                (0, 0) => 0,
                (0, _) => at(0, j - 1),
                (_, 0) => at(i - 1, 0),
                _ => at(i - 1, j).min(at(i, j - 1)).min(at(i - 1, j - 1)),
            };
            if prev != INF {
                t[i * m + j] = prev + cost.get(i, j);
            }
        }
    }
    backtrace(&t, n, m)
}

/// Follows the cheapest predecessors from the last cell; `np.argmin` keeps the first of
/// equal options, so ties go diagonal, then up (previous `a` token), then left.
fn backtrace(t: &[u32], n: usize, m: usize) -> Alignment {
    let (mut i, mut j) = (n - 1, m - 1);
    let total = t[i * m + j];
    let mut path = Vec::with_capacity(n + m);
    while i > 0 || j > 0 {
        path.push((i as u32, j as u32));
        let diag = if i > 0 && j > 0 { t[(i - 1) * m + j - 1] } else { INF };
        let up = if i > 0 { t[(i - 1) * m + j] } else { INF };
        let left = if j > 0 { t[i * m + j - 1] } else { INF };
        if diag <= up && diag <= left {
            (i, j) = (i - 1, j - 1);
        } else if up <= left {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    path.push((0, 0));
    path.reverse();
    Alignment { a: path.iter().map(|p| p.0).collect(), b: path.iter().map(|p| p.1).collect(), cost: total as f64 }
}

/// Edit distances between every distinct token of `a` and of `b`, each computed once.
struct CostTable {
    a_ids: Vec<usize>,
    b_ids: Vec<usize>,
    width: usize,
    table: Vec<u32>,
}

impl CostTable {
    fn new(a: &[Vec<u32>], b: &[Vec<u32>]) -> Self {
        let (a_ids, a_distinct) = intern(a);
        let (b_ids, b_distinct) = intern(b);
        let mut table = Vec::with_capacity(a_distinct.len() * b_distinct.len());
        for x in &a_distinct {
            let pattern = Pattern::new(x);
            table.extend(b_distinct.iter().map(|y| pattern.distance(y)));
        }
        Self { a_ids, b_ids, width: b_distinct.len(), table }
    }

    fn get(&self, i: usize, j: usize) -> u32 {
        self.table[self.a_ids[i] * self.width + self.b_ids[j]]
    }
}

/// Each token's index among the distinct tokens, and the distinct tokens.
fn intern(tokens: &[Vec<u32>]) -> (Vec<usize>, Vec<&[u32]>) {
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    let mut distinct = Vec::new();
    let ids = tokens
        .iter()
        .map(|t| {
            *index.entry(t.as_slice()).or_insert_with(|| {
                distinct.push(t.as_slice());
                distinct.len() - 1
            })
        })
        .collect();
    (ids, distinct)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(words: &[&str]) -> Vec<Vec<u32>> {
        words.iter().map(|w| symbols(w)).collect()
    }

    fn pairs(a: &Alignment) -> Vec<(u32, u32)> {
        a.a.iter().copied().zip(a.b.iter().copied()).collect()
    }

    #[test]
    fn a_split_word_aligns_many_to_one() {
        let al = dtw(&toks(&["the", "cat", "s"]), &toks(&["the", "cats"]), 0);
        assert_eq!(pairs(&al), vec![(0, 0), (1, 1), (2, 1)]);
        assert_eq!(al.cost, 4.0); // 0 + d(cat, cats) = 1 + d(s, cats) = 3
    }

    #[test]
    fn ties_go_diagonal_then_up_then_left() {
        // Every cost is 1: all predecessors tie, so the path is the diagonal, then up moves.
        let al = dtw(&toks(&["a", "b", "c"]), &toks(&["x", "y"]), 0);
        assert_eq!(pairs(&al), vec![(0, 0), (1, 0), (2, 1)]);
    }

    #[test]
    fn single_tokens_and_empty_sequences() {
        assert_eq!(pairs(&dtw(&toks(&["a"]), &toks(&["b"]), 0)), vec![(0, 0)]);
        assert_eq!(dtw(&toks(&[]), &toks(&["b"]), 0), Alignment::default());
    }

    #[test]
    fn a_wide_band_gives_the_full_path() {
        let a = toks(&["It", " was", " the", " best", " of", " times"]);
        let b = toks(&["It", " was", " the", " be", "st", " of", " time", "s"]);
        assert_eq!(dtw(&a, &b, 8), dtw(&a, &b, 0));
    }
}
