//! Finding the strings within two edits of a query without comparing it to every string:
//! two strings at edit distance `d <= 2` become equal after deleting at most `d` symbols
//! from each (an insertion is the other side's deletion, a substitution a deletion on both
//! sides). So each string is indexed under the hashes of itself and of every way of
//! deleting one or two of its symbols (its keys), and the candidates within two edits of a
//! query are the strings that share one of its keys. A candidate is only a candidate:
//! sharing a key allows up to four edits, and hashes may collide; the caller verifies.

/// The hash of `symbols` without the positions in `skip`.
fn hash(symbols: &[u32], skip: [usize; 2]) -> u64 {
    let kept = symbols.iter().enumerate().filter(|(i, _)| !skip.contains(i)).map(|(_, &s)| s);
    let h = kept.fold(0xcbf2_9ce4_8422_2325u64, |h, s| (h ^ u64::from(s)).wrapping_mul(0x0100_0000_01b3));
    h ^ (h >> 29)
}

/// Calls `f` with every key of `symbols`: itself, each one-symbol deletion, each
/// two-symbol deletion (a deletion that gives the same string twice gives its key twice).
pub fn keys(symbols: &[u32], mut f: impl FnMut(u64)) {
    let n = symbols.len();
    f(hash(symbols, [n, n]));
    for i in 0..n {
        f(hash(symbols, [i, n]));
        for j in i + 1..n {
            f(hash(symbols, [i, j]));
        }
    }
}

/// Bits of a key that choose its bucket.
const BUCKET_BITS: u32 = 16;

/// (key, id) pairs sorted by key then id, in buckets by the key's top bits so that a
/// lookup is one bucket's search and the build a counting sort, not a sort of millions.
pub struct DeletionIndex {
    /// `entries[starts[b]..starts[b + 1]]`: bucket `b`.
    starts: Vec<usize>,
    entries: Vec<(u64, u32)>,
}

impl DeletionIndex {
    /// Indexes the keys of `strings` (id, symbols), given twice: once to count, once to fill.
    pub fn new<'a, I: Iterator<Item = (u32, &'a [u32])>>(strings: impl Fn() -> I) -> Self {
        let bucket = |key: u64| (key >> (64 - BUCKET_BITS)) as usize;
        let mut starts = vec![0usize; (1 << BUCKET_BITS) + 1];
        for (_, symbols) in strings() {
            keys(symbols, |key| starts[bucket(key) + 1] += 1);
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut next = starts.clone();
        let mut entries = vec![(0u64, 0u32); starts[starts.len() - 1]];
        for (id, symbols) in strings() {
            keys(symbols, |key| {
                let slot = &mut next[bucket(key)];
                entries[*slot] = (key, id);
                *slot += 1;
            });
        }
        // Sort each bucket and drop repeated pairs, compacting as we go.
        let mut kept = 0;
        for b in 0..starts.len() - 1 {
            let (start, end) = (starts[b], starts[b + 1]);
            entries[start..end].sort_unstable();
            starts[b] = kept;
            for k in start..end {
                if k == start || entries[k] != entries[k - 1] {
                    entries[kept] = entries[k];
                    kept += 1;
                }
            }
        }
        *starts.last_mut().expect("buckets") = kept;
        entries.truncate(kept);
        Self { starts, entries }
    }

    /// The ids indexed under `key`, ascending.
    pub fn ids(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let b = (key >> (64 - BUCKET_BITS)) as usize;
        let bucket = &self.entries[self.starts[b]..self.starts[b + 1]];
        let first = bucket.partition_point(|&(k, _)| k < key);
        bucket[first..].iter().take_while(move |&&(k, _)| k == key).map(|&(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string within two edits of another shares a key with it.
    #[test]
    fn strings_within_two_edits_share_a_key() {
        let words: Vec<Vec<u32>> = ["", "a", "ab", "ba", "abc", "acb", "abcd", "bcda", "xabcx", "aabb", "abab", "ab c"]
            .iter()
            .map(|w| w.chars().map(u32::from).collect())
            .collect();
        let index = DeletionIndex::new(|| words.iter().enumerate().map(|(id, w)| (id as u32, w.as_slice())));
        for q in &words {
            let mut found = Vec::new();
            keys(q, |key| found.extend(index.ids(key)));
            let pattern = crate::edit_distance::Pattern::new(q);
            for (id, w) in words.iter().enumerate() {
                if pattern.distance(w) <= 2 {
                    assert!(found.contains(&(id as u32)), "{q:?} vs {w:?}");
                }
            }
        }
    }
}
