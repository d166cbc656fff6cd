//! The aligner extension point (DESIGN.md, steps 3 and 4): sequence alignment of two
//! tokenizations of one text, and vocabulary mapping between two vocabularies.

use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::plugin::PluginInfo;

/// A ragged list of token strings, already normalised to canonical form (one space
/// marker, bytes for byte tokens): token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
#[derive(Clone, Copy, Debug)]
pub struct TokenStrings<'a> {
    pub offsets: &'a [u32],
    pub bytes: &'a [u8],
}

impl<'a> TokenStrings<'a> {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> &'a [u8] {
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// One tokenization of a document as a sequence aligner sees it: its token strings and,
/// where the tokenizer reports them, each token's byte span `[start, end)` in the text.
#[derive(Clone, Copy, Debug)]
pub struct Tokenization<'a> {
    pub strings: TokenStrings<'a>,
    /// Flat `[start_0, end_0, start_1, end_1, ...]`; empty when unknown.
    pub spans: &'a [u32],
}

impl Tokenization<'_> {
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// The span of token `i`, if spans are known.
    pub fn span(&self, i: usize) -> Option<(u32, u32)> {
        self.spans.get(2 * i..2 * i + 2).map(|s| (s[0], s[1]))
    }
}

/// A monotone alignment path: step `s` pairs position `a[s]` of the first sequence with
/// position `b[s]` of the second (one-to-many and many-to-one appear as repeated indices).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    pub a: Vec<u32>,
    pub b: Vec<u32>,
    /// The path's total cost (DTW: the sum of edit distances along it).
    pub cost: f64,
}

/// For each source-vocabulary id, the mapped target id (`None`: unmapped) and the edit
/// distance of the match (0 for an exact match).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabMap {
    pub target: Vec<Option<u32>>,
    pub distance: Vec<u32>,
}

impl VocabMap {
    /// The target id of a source id; none for an unmapped id, or an id beyond the source
    /// vocabulary (a model's embedding may be padded past its tokenizer's, as MPT's is).
    pub fn get(&self, source_id: u32) -> Option<u32> {
        self.target.get(source_id as usize).copied().flatten()
    }
}

/// Aligns two tokenizations of the same text (`dtw`, `offsets`, ...).
pub trait SequenceAligner: Send + Sync {
    fn info(&self) -> PluginInfo;
    fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String>;
}

/// A built-in is a `&'static` plugin; hosts hold every plugin alike behind one pointer type.
impl<T: SequenceAligner + ?Sized> SequenceAligner for &T {
    fn info(&self) -> PluginInfo {
        (**self).info()
    }
    fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String> {
        (**self).align(params, a, b)
    }
}

/// How often the sequence aligner paired each source id with each target id over a
/// corpus (every pair on the alignment paths, once per target position), sorted by source
/// id and then target id: what a statistics-based mapper (FuseChat's `ms`) reads. Empty
/// unless the mapper asks for it ([`PluginInfo::reads_cooccurrence`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cooccurrence<'a> {
    pub source: &'a [u32],
    pub target: &'a [u32],
    pub count: &'a [u32],
}

impl<'a> Cooccurrence<'a> {
    /// The `(target id, count)` pairs of source id `s`.
    pub fn of(&self, s: u32) -> impl Iterator<Item = (u32, u32)> + 'a {
        let start = self.source.partition_point(|&x| x < s);
        let end = self.source.partition_point(|&x| x <= s);
        self.target[start..end].iter().copied().zip(self.count[start..end].iter().copied())
    }
}

/// [`Cooccurrence`] owned: counted pair by pair, then sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CooccurrenceBuf {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
    pub count: Vec<u32>,
}

impl CooccurrenceBuf {
    /// From counts of `(source id, target id)` pairs.
    pub fn from_counts(counts: impl IntoIterator<Item = ((u32, u32), u32)>) -> Self {
        let mut pairs: Vec<((u32, u32), u32)> = counts.into_iter().collect();
        pairs.sort_unstable();
        let mut out = Self::default();
        for ((s, t), c) in pairs {
            out.source.push(s);
            out.target.push(t);
            out.count.push(c);
        }
        out
    }

    pub fn view(&self) -> Cooccurrence<'_> {
        Cooccurrence { source: &self.source, target: &self.target, count: &self.count }
    }
}

/// Maps every source-vocabulary token to a target-vocabulary token (`em`, `mined`, ...).
pub trait VocabMapper: Send + Sync {
    fn info(&self) -> PluginInfo;
    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String>;
}

impl<T: VocabMapper + ?Sized> VocabMapper for &T {
    fn info(&self) -> PluginInfo {
        (**self).info()
    }
    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        (**self).map_vocab(params, source, target, cooccurrence)
    }
}
