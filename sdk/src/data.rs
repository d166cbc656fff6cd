//! Ragged data crossing the plugin boundary.
//!
//! Distributions are sparse: per position a handful of `(token id, value)` entries
//! (the top-k of DESIGN.md, step 2). They are stored flat, with `offsets[p]..offsets[p + 1]`
//! delimiting position `p`, so that nothing is ever densified over the vocabulary and the
//! same three arrays cross a dylib boundary by reference and a WASM boundary by one copy.

use serde::{Deserialize, Serialize};

/// A borrowed ragged table of sparse rows: row `p` is
/// `ids[offsets[p]..offsets[p + 1]]` with the matching `values`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseRows<'a> {
    pub offsets: &'a [u32],
    pub ids: &'a [u32],
    pub values: &'a [f32],
}

/// The owned form of [`SparseRows`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SparseRowsBuf {
    pub offsets: Vec<u32>,
    pub ids: Vec<u32>,
    pub values: Vec<f32>,
}

impl<'a> SparseRows<'a> {
    /// Number of rows (positions); a table with no offsets at all has none.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids and values of row `p`.
    pub fn row(&self, p: usize) -> (&'a [u32], &'a [f32]) {
        let range = self.offsets[p] as usize..self.offsets[p + 1] as usize;
        (&self.ids[range.clone()], &self.values[range])
    }

    /// Checks that the arrays form `rows` well-shaped rows; `what` names the table in errors.
    pub fn check_shape(&self, rows: usize, what: &str) -> Result<(), String> {
        if self.offsets.len() != rows + 1 {
            return Err(format!("{what}: {} offsets for {rows} positions (expected {})", self.offsets.len(), rows + 1));
        }
        if self.offsets[0] != 0 {
            return Err(format!("{what}: offsets start at {}, not 0", self.offsets[0]));
        }
        if let Some(p) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!("{what}: offsets decrease at position {p}"));
        }
        let end = self.offsets[rows] as usize;
        if self.ids.len() != end || self.values.len() != end {
            return Err(format!(
                "{what}: offsets end at {end} but there are {} ids and {} values",
                self.ids.len(),
                self.values.len()
            ));
        }
        Ok(())
    }
}

impl SparseRowsBuf {
    /// An empty table ready for [`SparseRowsBuf::push_row`].
    pub fn with_capacity(rows: usize, entries: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self { offsets, ids: Vec::with_capacity(entries), values: Vec::with_capacity(entries) }
    }

    /// Appends one row.
    pub fn push_row(&mut self, ids: &[u32], values: &[f32]) {
        self.ids.extend_from_slice(ids);
        self.values.extend_from_slice(values);
        self.offsets.push(self.ids.len() as u32);
    }

    /// Closes the row that `ids` and `values` were pushed into since the last one.
    pub fn end_row(&mut self) {
        self.offsets.push(self.ids.len() as u32);
    }

    pub fn rows(&self) -> SparseRows<'_> {
        SparseRows { offsets: &self.offsets, ids: &self.ids, values: &self.values }
    }

    /// Bit-level equality: NaN equals NaN and 0.0 differs from -0.0, as needed to check that
    /// two plugin tiers computed the very same floats.
    pub fn bit_identical(&self, other: &Self) -> bool {
        self.offsets == other.offsets
            && self.ids == other.ids
            && self.values.len() == other.values.len()
            && self.values.iter().zip(&other.values).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// One candidate distribution (a source aligned to the target's positions, or the target
/// itself) with the cross-entropies that fusion functions rank candidates by.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Top-k per target position; values are logits or log-probabilities (fusion functions
    /// only use them through a softmax over the kept entries, which treats both alike).
    pub dist: SparseRows<'a>,
    /// Mean cross-entropy of this model on the document, over its own tokenization (nats).
    pub ce_doc: f32,
    /// Cross-entropy on the gold next token, aligned to the target positions (nats).
    pub ce_token: &'a [f32],
    /// Length of this model's own tokenization of the document.
    pub tokens: u32,
    /// True for the target model's own distribution.
    pub is_target: bool,
}

/// Everything a fusion function sees of one document.
#[derive(Clone, Debug)]
pub struct FusionInput<'a> {
    /// Gold next token per target position; its length is the number of positions.
    pub gold: &'a [u32],
    /// Length of the document's text in UTF-8 bytes, for per-byte normalisations.
    pub text_bytes: u32,
    pub candidates: Vec<Candidate<'a>>,
}

/// The fused target: per position the kept target-vocabulary ids and their probabilities,
/// each non-empty row summing to one (DESIGN.md, step 6: the p of the fusion loss).
pub type FusedTarget = SparseRowsBuf;

/// Owned form of [`Candidate`], for building inputs (tests, conformance checks, stores).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CandidateBuf {
    pub dist: SparseRowsBuf,
    pub ce_doc: f32,
    pub ce_token: Vec<f32>,
    pub tokens: u32,
    pub is_target: bool,
}

/// Owned form of [`FusionInput`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FusionInputBuf {
    pub gold: Vec<u32>,
    pub text_bytes: u32,
    pub candidates: Vec<CandidateBuf>,
}

impl CandidateBuf {
    pub fn view(&self) -> Candidate<'_> {
        Candidate {
            dist: self.dist.rows(),
            ce_doc: self.ce_doc,
            ce_token: &self.ce_token,
            tokens: self.tokens,
            is_target: self.is_target,
        }
    }
}

impl FusionInputBuf {
    pub fn view(&self) -> FusionInput<'_> {
        FusionInput {
            gold: &self.gold,
            text_bytes: self.text_bytes,
            candidates: self.candidates.iter().map(CandidateBuf::view).collect(),
        }
    }
}

impl FusionInput<'_> {
    pub fn positions(&self) -> usize {
        self.gold.len()
    }

    /// Checks every candidate against the number of positions, so that a plugin can index
    /// without bounds surprises; hosts run it before every call.
    pub fn check(&self) -> Result<(), String> {
        let n = self.positions();
        for (c, cand) in self.candidates.iter().enumerate() {
            cand.dist.check_shape(n, &format!("candidate {c}"))?;
            if cand.ce_token.len() != n {
                return Err(format!("candidate {c}: {} per-token CE values for {n} positions", cand.ce_token.len()));
            }
        }
        Ok(())
    }
}

/// Checks a fused target returned by a plugin: its shape matches the input, every
/// probability is finite and non-negative, and every non-empty row sums to more than 0 and
/// at most one (less where the plugin leaves the rest of the mass to the loss's tail bucket).
pub fn check_fused(fused: &FusedTarget, positions: usize) -> Result<(), String> {
    let rows = fused.rows();
    rows.check_shape(positions, "fused target")?;
    for p in 0..positions {
        let (ids, probs) = rows.row(p);
        if let Some((k, id)) = ids.iter().enumerate().find(|(k, id)| ids[..*k].contains(id)) {
            return Err(format!("fused target: token id {id} appears twice at position {p} (entry {k})"));
        }
        if let Some(bad) = probs.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(format!("fused target: probability {bad} at position {p}"));
        }
        let sum: f64 = probs.iter().map(|&v| v as f64).sum();
        let in_range = sum > 0.0 && sum <= 1.0 + 1e-3;
        if !probs.is_empty() && !in_range {
            return Err(format!(
                "fused target: probabilities at position {p} sum to {sum}, not more than 0 and at most 1"
            ));
        }
    }
    Ok(())
}
