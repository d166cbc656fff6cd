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

/// Aligns two tokenizations of the same text (`dtw`, `offsets`, ...).
pub trait SequenceAligner: Send + Sync {
    fn info(&self) -> PluginInfo;
    fn align(&self, params: &Params, a: TokenStrings<'_>, b: TokenStrings<'_>) -> Result<Alignment, String>;
}

/// Maps every source-vocabulary token to a target-vocabulary token (`em`, `mined`, ...).
pub trait VocabMapper: Send + Sync {
    fn info(&self) -> PluginInfo;
    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
    ) -> Result<VocabMap, String>;
}
