//! Vocabulary mapping (DESIGN.md step 3): every source token to a target token. `em` takes
//! the exact match only; `mined` falls back to the target token of minimum edit distance,
//! ties to the lowest target id, as the paper's `find_best_mapping`, but without comparing
//! every pair. The targets within two edits are found by lookups in a [`DeletionIndex`].
//! The rest, at three edits or more, are searched by length difference (a lower bound of
//! the distance) until that bound exceeds the best distance found; within a length, a
//! symbol-set signature and the bag distance over hashed symbol counts rule out nearly
//! every candidate before an edit distance is computed, and once no target can be nearer
//! than the best, only lower ids are visited.

use std::collections::HashMap;

use fusellm_sdk::{Cooccurrence, Params, PluginInfo, PluginKind, TokenStrings, VocabMap, VocabMapper};

use crate::deletion_index::{keys, DeletionIndex};
use crate::edit_distance::{symbols, Pattern};

/// Targets up to this many symbols are in the deletion index: those within two edits of a
/// query of up to [`LONGEST_LOOKUP`] symbols. (Key counts grow with the square of the
/// length; the few longer queries are searched.)
const LONGEST_INDEXED: usize = LONGEST_LOOKUP + 2;
const LONGEST_LOOKUP: usize = 24;

/// Exact match after normalisation.
pub struct Em;

/// Exact match, else minimum edit distance.
pub struct Mined;

fusellm_sdk::params! {
    /// What `mined` takes.
    pub struct MinedParams {
        /// worker threads; 0: one per core
        threads: i64 = 0, min(0.0);
    }
}

impl VocabMapper for Em {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::VocabMapper, "em", env!("CARGO_PKG_VERSION"), "exact match of token strings")
    }

    fn map_vocab(
        &self,
        _params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        _cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        let target = Vocab::new(target)?;
        let source = decode(source)?;
        Ok(VocabMap { target: source.iter().map(|s| target.exact(s)).collect(), distance: vec![0; source.len()] })
    }
}

impl VocabMapper for Mined {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::VocabMapper,
            "mined",
            env!("CARGO_PKG_VERSION"),
            "exact match, else the target token of minimum edit distance (ties to the lowest id)",
        )
        .params::<MinedParams>()
    }

    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        _cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        let target = Vocab::new(target)?;
        let source = decode(source)?;
        let best: Vec<(u32, u32)> =
            parallel_map(&source, threads(MinedParams::read(params)?.threads as usize), |s| target.nearest(s));
        Ok(VocabMap {
            target: best.iter().map(|&(id, _)| (id != u32::MAX).then_some(id)).collect(),
            distance: best.iter().map(|&(_, d)| d).collect(),
        })
    }
}

/// The target vocabulary, indexed for exact lookups, lookups within two edits, and grouped
/// by length.
pub(crate) struct Vocab {
    exact: HashMap<String, u32>,
    /// Every target's symbols, concatenated in id order; `offsets[id]..offsets[id + 1]`.
    symbols: Vec<u32>,
    offsets: Vec<usize>,
    within_two: DeletionIndex,
    /// `by_len[l]`: the tokens of `l` symbols, in id order.
    by_len: Vec<Group>,
}

/// The tokens of one length, column-wise: the signatures are scanned for every query.
#[derive(Default)]
struct Group {
    ids: Vec<u32>,
    signatures: Vec<u64>,
    bags: Vec<Bag>,
}

/// The set of symbols of a token, hashed into 64 bits. An edit changes the set by at most
/// one symbol removed and one added, so it flips at most two bits: `ceil(popcount(a ^ b)
/// / 2)` is a lower bound of the edit distance (hash collisions only weaken it). One XOR
/// and a popcount: the first test of every candidate.
fn signature(symbols: &[u32]) -> u64 {
    symbols.iter().fold(0, |sig, &s| sig | 1 << (s.wrapping_mul(0x9E37_79B9) >> 26))
}

fn signature_distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones().div_ceil(2)
}

/// How many symbols of a token fall in each of 32 hash buckets (saturating). An edit
/// removes at most one symbol and adds at most one, so the bag distance, the larger of the
/// two one-sided count differences, is a lower bound of the edit distance too, and a
/// stronger one where symbols repeat; the second test.
type Bag = [u8; 32];

fn bag(symbols: &[u32]) -> Bag {
    let mut bag = [0u8; 32];
    for &s in symbols {
        let bucket = (s.wrapping_mul(0x9E37_79B9) >> 27) as usize;
        bag[bucket] = bag[bucket].saturating_add(1);
    }
    bag
}

fn bag_distance(a: &Bag, b: &Bag) -> u32 {
    let (mut more, mut fewer) = (0u32, 0u32);
    for (x, y) in a.iter().zip(b) {
        more += u32::from(x.saturating_sub(*y));
        fewer += u32::from(y.saturating_sub(*x));
    }
    more.max(fewer)
}

impl Vocab {
    pub(crate) fn new(tokens: TokenStrings<'_>) -> Result<Self, String> {
        let strings = decode(tokens)?;
        let mut exact = HashMap::new();
        let mut by_len: Vec<Group> = Vec::new();
        let (mut symbols_flat, mut offsets) = (Vec::new(), vec![0]);
        for (id, s) in strings.into_iter().enumerate() {
            let sym = symbols(&s);
            if by_len.len() <= sym.len() {
                by_len.resize_with(sym.len() + 1, Group::default);
            }
            let group = &mut by_len[sym.len()];
            group.ids.push(id as u32);
            group.signatures.push(signature(&sym));
            group.bags.push(bag(&sym));
            symbols_flat.extend_from_slice(&sym);
            offsets.push(symbols_flat.len());
            exact.entry(s).or_insert(id as u32);
        }
        let within_two = DeletionIndex::new(|| {
            let tokens = offsets.windows(2).map(|w| &symbols_flat[w[0]..w[1]]);
            (0..).zip(tokens).filter(|(_, s)| s.len() <= LONGEST_INDEXED)
        });
        Ok(Self { exact, symbols: symbols_flat, offsets, within_two, by_len })
    }

    fn exact(&self, s: &str) -> Option<u32> {
        self.exact.get(s).copied()
    }

    fn token(&self, id: u32) -> &[u32] {
        &self.symbols[self.offsets[id as usize]..self.offsets[id as usize + 1]]
    }

    /// (id, distance) of the nearest target token; (u32::MAX, u32::MAX) for an empty
    /// target vocabulary.
    pub(crate) fn nearest(&self, s: &str) -> (u32, u32) {
        if let Some(id) = self.exact(s) {
            return (id, 0);
        }
        let sym = symbols(s);
        let pattern = Pattern::new(&sym);
        if sym.len() > LONGEST_LOOKUP {
            // No target matches exactly: none is nearer than one.
            return self.search(&sym, &pattern, 1);
        }
        match self.within_two(&sym, &pattern) {
            Some((d, id)) => (id, d),
            // None is within two edits: none is nearer than three.
            None => self.search(&sym, &pattern, 3),
        }
    }

    /// (distance, id) of the nearest target within two edits of `sym` (which matches none
    /// exactly), the lowest id among equals.
    fn within_two(&self, sym: &[u32], pattern: &Pattern) -> Option<(u32, u32)> {
        let mut best = (3, u32::MAX);
        keys(sym, |key| {
            for id in self.within_two.ids(key) {
                // A key's ids ascend: past the best, only a nearer target wins, and none
                // is nearer than one.
                if best.0 == 1 && id > best.1 {
                    break;
                }
                let target = self.token(id);
                if target.len().abs_diff(sym.len()) <= 2 {
                    best = best.min((pattern.distance(target), id));
                }
            }
        });
        (best.0 <= 2).then_some(best)
    }

    /// The nearest target by length difference, given that none is nearer than `floor`.
    fn search(&self, sym: &[u32], pattern: &Pattern, floor: u32) -> (u32, u32) {
        let (len, sig, bag) = (sym.len(), signature(sym), bag(sym));
        let mut best = (u32::MAX, u32::MAX); // (distance, id)
        for gap in 0.. {
            let bound = floor.max(gap as u32);
            if bound > best.0 || (gap > len && len + gap >= self.by_len.len()) {
                break;
            }
            let lengths = [len.checked_sub(gap), (gap > 0).then_some(len + gap)];
            for group in lengths.into_iter().flatten().filter_map(|l| self.by_len.get(l)) {
                for (k, &id) in group.ids.iter().enumerate() {
                    // Every candidate here is at least `bound` away; ids grow within a
                    // group, so once the best is at `bound`, the rest can at most tie, and lose.
                    if bound == best.0 && id > best.1 {
                        break;
                    }
                    let beats = |lower: u32| (lower.max(bound), id) < best;
                    if !beats(signature_distance(sig, group.signatures[k]))
                        || !beats(bag_distance(&bag, &group.bags[k]))
                    {
                        continue;
                    }
                    let d = pattern.distance(self.token(id));
                    if (d, id) < best {
                        best = (d, id);
                    }
                }
            }
        }
        (best.1, best.0)
    }
}

pub(crate) fn decode(tokens: TokenStrings<'_>) -> Result<Vec<String>, String> {
    (0..tokens.len())
        .map(|i| String::from_utf8(tokens.get(i).to_vec()).map_err(|e| format!("token {i} is not UTF-8: {e}")))
        .collect()
}

fn threads(requested: usize) -> usize {
    match requested {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// `f` over `items` on `threads` threads (one on targets without threads), in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || cfg!(target_arch = "wasm32") || items.len() < 2 {
        return items.iter().map(&f).collect();
    }
    // Interleaved chunks balance the work: neighbouring ids have similar lengths.
    let chunk = items.len().div_ceil(threads * 16).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut parts: Vec<(usize, Vec<R>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let start = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
                        if start >= items.len() {
                            return done;
                        }
                        let end = (start + chunk).min(items.len());
                        done.push((start, items[start..end].iter().map(&f).collect()));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a mapping thread panicked")).collect()
    });
    parts.sort_by_key(|(start, _)| *start);
    parts.into_iter().flat_map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[String]) -> (Vec<u32>, Vec<u8>) {
        let mut offsets = vec![0u32];
        let mut bytes = Vec::new();
        for w in words {
            bytes.extend_from_slice(w.as_bytes());
            offsets.push(bytes.len() as u32);
        }
        (offsets, bytes)
    }

    /// The search with its bounds finds what comparing every pair finds: the minimum
    /// distance and, among the targets at it, the lowest id; over words of a few symbols
    /// and some of 20-31, multi-byte ones among them, with duplicates in the target.
    #[test]
    fn the_bounded_search_equals_the_exhaustive_one() {
        let alphabet: Vec<char> = "abcdeé▁Ġ日\u{F700}".chars().collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let word = |next: &mut dyn FnMut(usize) -> usize| -> String {
            // Mostly short, as tokens are; some longer than the deletion index covers.
            let len = if next(8) == 0 { 20 + next(12) } else { next(9) };
            (0..len).map(|_| alphabet[next(alphabet.len())]).collect()
        };
        let targets: Vec<String> = (0..400).map(|_| word(&mut next)).collect();
        let sources: Vec<String> = (0..1000).map(|_| word(&mut next)).collect();
        let (offsets, bytes) = strings(&targets);
        let vocab = Vocab::new(TokenStrings { offsets: &offsets, bytes: &bytes }).unwrap();
        for s in &sources {
            let pattern = Pattern::new(&symbols(s));
            let exhaustive =
                targets.iter().enumerate().map(|(id, t)| (pattern.distance(&symbols(t)), id as u32)).min().unwrap();
            assert_eq!(vocab.nearest(s), (exhaustive.1, exhaustive.0), "{s:?}");
        }
    }
}
