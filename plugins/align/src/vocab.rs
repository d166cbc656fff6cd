//! Vocabulary mapping (DESIGN.md step 3): every source token to a target token. `em` takes
//! the exact match only; `mined` falls back to the target token of minimum edit distance,
//! ties to the lowest target id, as the paper's `find_best_mapping`, but without comparing
//! every pair: candidates are visited by length difference (a lower bound of the distance)
//! and the search stops once that bound exceeds the best distance found; within a length,
//! a second lower bound from the sets of symbols each token holds (one XOR and a popcount)
//! rules out nearly every candidate before an edit distance is computed.

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

/// The target vocabulary, indexed for exact lookups and grouped by length.
struct Vocab {
    exact: HashMap<String, u32>,
    /// `by_len[l]`: the tokens of `l` symbols, in id order.
    by_len: Vec<Group>,
}

/// The tokens of one length, column-wise: the signatures are scanned for every query.
#[derive(Default)]
struct Group {
    ids: Vec<u32>,
    signatures: Vec<u64>,
    symbols: Vec<Vec<u32>>,
}

/// The set of symbols of a token, hashed into 64 bits. An edit changes the set by at most
/// one symbol removed and one added, so it flips at most two bits: `ceil(popcount(a ^ b)
/// / 2)` is a lower bound of the edit distance (hash collisions only weaken it).
fn signature(symbols: &[u32]) -> u64 {
    symbols.iter().fold(0, |sig, &s| sig | 1 << (s.wrapping_mul(0x9E37_79B9) >> 26))
}

fn signature_bound(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones().div_ceil(2)
}

impl Vocab {
    fn new(tokens: TokenStrings<'_>) -> Result<Self, String> {
        let strings = decode(tokens)?;
        let mut exact = HashMap::new();
        let mut by_len: Vec<Group> = Vec::new();
        for (id, s) in strings.into_iter().enumerate() {
            let sym = symbols(&s);
            if by_len.len() <= sym.len() {
                by_len.resize_with(sym.len() + 1, Group::default);
            }
            let group = &mut by_len[sym.len()];
            group.ids.push(id as u32);
            group.signatures.push(signature(&sym));
            group.symbols.push(sym);
            exact.entry(s).or_insert(id as u32);
        }
        Ok(Self { exact, by_len })
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
        let (pattern, sig) = (Pattern::new(&sym), signature(&sym));
        let len = pattern.len();
        let mut best = (u32::MAX, u32::MAX); // (distance, id)
        for gap in 0.. {
            if gap as u32 > best.0 || (gap > len && len + gap >= self.by_len.len()) {
                break;
            }
            let lengths = [len.checked_sub(gap), (gap > 0).then_some(len + gap)];
            for group in lengths.into_iter().flatten().filter_map(|l| self.by_len.get(l)) {
                for (k, (&id, &other)) in group.ids.iter().zip(&group.signatures).enumerate() {
                    // Every candidate here is at least `gap` away; ids grow within a group,
                    // so once the best is at `gap`, the rest can at most tie, and lose.
                    if gap as u32 == best.0 && id > best.1 {
                        break;
                    }
                    let bound = (gap as u32).max(signature_bound(sig, other));
                    if (bound, id) >= best {
                        continue;
                    }
                    let d = pattern.distance(&group.symbols[k]);
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
