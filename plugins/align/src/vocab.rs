//! Vocabulary mapping (DESIGN.md step 3): every source token to a target token. `em` takes
//! the exact match only; `mined` falls back to the target token of minimum edit distance,
//! ties to the lowest target id, as the paper's `find_best_mapping`, but without comparing
//! every pair. The targets one edit away are found by lookups: a target within one edit
//! shares a key with the source token, where the keys of a token are the token and each
//! of its one-symbol deletions. The rest are searched by length difference (a lower bound
//! of the distance) until that bound exceeds the best distance found; within a length, the
//! bag distance over hashed symbol counts rules out nearly every candidate before an edit
//! distance is computed, and once no target can be nearer than the best, only lower ids
//! are visited.

use std::collections::HashMap;

use fusellm_sdk::{ParamSpec, Params, PluginInfo, PluginKind, TokenStrings, VocabMap, VocabMapper};

use crate::edit_distance::{symbols, Pattern};

/// Exact match after normalisation.
pub struct Em;

/// Exact match, else minimum edit distance.
pub struct Mined;

impl VocabMapper for Em {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Aligner, "em", env!("CARGO_PKG_VERSION"), "exact match of token strings")
    }

    fn map_vocab(
        &self,
        _params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
    ) -> Result<VocabMap, String> {
        let target = Vocab::new(target)?;
        let source = decode(source)?;
        Ok(VocabMap { target: source.iter().map(|s| target.exact(s)).collect(), distance: vec![0; source.len()] })
    }
}

impl VocabMapper for Mined {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::Aligner,
            "mined",
            env!("CARGO_PKG_VERSION"),
            "exact match, else the target token of minimum edit distance (ties to the lowest id)",
        )
        .param(ParamSpec::int("threads", 0, "worker threads; 0: one per core").range(Some(0.0), None))
    }

    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
    ) -> Result<VocabMap, String> {
        let target = Vocab::new(target)?;
        let source = decode(source)?;
        let best: Vec<(u32, u32)> =
            parallel_map(&source, threads(params.int("threads") as usize), |s| target.nearest(s));
        Ok(VocabMap {
            target: best.iter().map(|&(id, _)| (id != u32::MAX).then_some(id)).collect(),
            distance: best.iter().map(|&(_, d)| d).collect(),
        })
    }
}

/// The target vocabulary, indexed for exact lookups, one-edit lookups and grouped by
/// length.
struct Vocab {
    exact: HashMap<String, u32>,
    /// Each target's symbols, by id.
    symbols: Vec<Vec<u32>>,
    /// (key, id) for every key of every target ([`keys`]), sorted.
    one_edit: Vec<(u64, u32)>,
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

/// The keys of a token: hashes of its symbols and of each one-symbol deletion. Two tokens
/// one edit apart share one: an insertion is the other's deletion, a substitution at `i`
/// is both deleting `i`. (A hash collision only adds a candidate, which is verified.)
fn keys(symbols: &[u32]) -> impl Iterator<Item = u64> + '_ {
    let hash = |skip: Option<usize>| {
        let kept = symbols.iter().enumerate().filter(move |(i, _)| Some(*i) != skip);
        let h = kept.fold(0xcbf2_9ce4_8422_2325u64, |h, (_, &s)| (h ^ u64::from(s)).wrapping_mul(0x0100_0000_01b3));
        h ^ (h >> 29)
    };
    std::iter::once(None).chain((0..symbols.len()).map(Some)).map(hash)
}

impl Vocab {
    fn new(tokens: TokenStrings<'_>) -> Result<Self, String> {
        let strings = decode(tokens)?;
        let mut exact = HashMap::new();
        let mut by_len: Vec<Group> = Vec::new();
        let mut symbols_by_id = Vec::with_capacity(strings.len());
        let mut one_edit = Vec::new();
        for (id, s) in strings.into_iter().enumerate() {
            let sym = symbols(&s);
            if by_len.len() <= sym.len() {
                by_len.resize_with(sym.len() + 1, Group::default);
            }
            let group = &mut by_len[sym.len()];
            group.ids.push(id as u32);
            group.signatures.push(signature(&sym));
            group.bags.push(bag(&sym));
            one_edit.extend(keys(&sym).map(|k| (k, id as u32)));
            symbols_by_id.push(sym);
            exact.entry(s).or_insert(id as u32);
        }
        one_edit.sort_unstable();
        one_edit.dedup();
        Ok(Self { exact, symbols: symbols_by_id, one_edit, by_len })
    }

    fn exact(&self, s: &str) -> Option<u32> {
        self.exact.get(s).copied()
    }

    /// (id, distance) of the nearest target token; (u32::MAX, u32::MAX) for an empty
    /// target vocabulary.
    fn nearest(&self, s: &str) -> (u32, u32) {
        if let Some(id) = self.exact(s) {
            return (id, 0);
        }
        let sym = symbols(s);
        let pattern = Pattern::new(&sym);
        match self.one_edit_away(&sym, &pattern) {
            Some(id) => (id, 1),
            // No target matches exactly or within one edit: none is nearer than two.
            None => self.search(&sym, &pattern, 2),
        }
    }

    /// The lowest id of the targets one edit from `sym` (which matches none exactly).
    fn one_edit_away(&self, sym: &[u32], pattern: &Pattern) -> Option<u32> {
        let mut best: Option<u32> = None;
        for key in keys(sym) {
            let start = self.one_edit.partition_point(|&(k, _)| k < key);
            // A key's ids ascend: its first at distance one is its lowest.
            for &(_, id) in self.one_edit[start..].iter().take_while(|&&(k, _)| k == key) {
                if best.is_some_and(|b| id >= b) {
                    break;
                }
                if pattern.distance(&self.symbols[id as usize]) == 1 {
                    best = Some(id);
                    break;
                }
            }
        }
        best
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
                    let d = pattern.distance(&self.symbols[id as usize]);
                    if (d, id) < best {
                        best = (d, id);
                    }
                }
            }
        }
        (best.1, best.0)
    }
}

fn decode(tokens: TokenStrings<'_>) -> Result<Vec<String>, String> {
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
    /// distance and, among the targets at it, the lowest id; over words of a few symbols,
    /// multi-byte ones among them, with duplicates in the target.
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
        let mut word = |next: &mut dyn FnMut(usize) -> usize| -> String {
            (0..next(9)).map(|_| alphabet[next(alphabet.len())]).collect()
        };
        let targets: Vec<String> = (0..400).map(|_| word(&mut next)).collect();
        let sources: Vec<String> = (0..300).map(|_| word(&mut next)).collect();
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
