//! Training data: documents (token ids, and per position the fused sparse target when
//! fusing) cut into sequences of the training length, in an order fixed by the seed and
//! the epoch, so that micro-batch `g` is a pure function of `g` and a resumed run needs
//! only the step to continue where it stopped.

use std::path::Path;

use fusellm_sdk::SparseRowsBuf;

use crate::error::{Context, Error, Result};
use crate::fuse::{fused_file, FusedManifest};
use crate::model::loss::LossBatch;
use crate::store::FusedShard;
use fusellm_sdk::rng::Rng;

/// One training document.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub ids: Vec<u32>,
    /// One row per position (the target for predicting the next token), when fusing.
    pub rows: Option<SparseRowsBuf>,
}

/// Reads every document of a fused store.
pub fn fused_documents(dir: &Path) -> Result<(FusedManifest, Vec<Document>)> {
    let file = dir.join("fused.json");
    let bytes = std::fs::read(&file).context(|| format!("{} is not a finished fused store", dir.display()))?;
    let manifest: FusedManifest = serde_json::from_slice(&bytes).context(|| file.display().to_string())?;
    let mut docs = Vec::new();
    for (s, (_, sha256)) in manifest.shards.iter().enumerate() {
        let file = fused_file(dir, s);
        let bytes = std::fs::read(&file).context(|| format!("reading {}", file.display()))?;
        if crate::files::sha256_hex(&bytes) != *sha256 {
            return Err(Error::msg(format!(
                "{} does not match the hash fused.json records (changed since it was written); run the same `fusellm fuse` into {} again, or `fusellm run`",
                file.display(),
                dir.display()
            )));
        }
        let shard = FusedShard::decode(&bytes).context(|| file.display().to_string())?;
        for d in 0..shard.docs.len() {
            let (ids, rows) = shard.document(d);
            docs.push(Document { ids: ids.to_vec(), rows: Some(rows) });
        }
    }
    Ok((manifest, docs))
}

/// How documents become sequences.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Batching {
    pub seq_len: usize,
    pub batch_size: usize,
    /// Documents end to end, cut at `seq_len` (no padding but in the last sequence); or
    /// one document per sequence, truncated, padded to the longest of its batch.
    pub packing: bool,
    pub seed: u64,
}

/// A piece of a document in a sequence: `(document, start, length)`.
type Piece = (usize, usize, usize);

/// The documents and the order they are served in. Under data parallelism a global
/// micro-batch is `world` micro-batches of `batch_size` sequences, one per rank, taken in
/// rank order from the epoch's sequences: each rank serves its own slice (no sequence
/// twice in an epoch), and `world` ranks of `b` see what one rank of `world * b` sees.
pub struct Dataset {
    docs: Vec<Document>,
    batching: Batching,
    /// This rank and the number of ranks.
    rank: usize,
    world: usize,
    /// The sequences of the epoch last asked for, cached.
    epoch: Option<(u64, Vec<Vec<Piece>>)>,
}

impl Dataset {
    pub fn new(docs: Vec<Document>, batching: Batching) -> Result<Self> {
        if batching.seq_len < 2 || batching.batch_size == 0 {
            return Err(Error::msg(format!(
                "sequence length {} and batch size {}: training needs sequences of at least 2 tokens and a batch of at least 1",
                batching.seq_len, batching.batch_size
            )));
        }
        let docs: Vec<Document> = docs.into_iter().filter(|d| d.ids.len() >= 2).collect();
        if docs.is_empty() {
            return Err(Error::msg("no document of at least 2 tokens to train on"));
        }
        Ok(Self { docs, batching, rank: 0, world: 1, epoch: None })
    }

    /// Serves the slices of rank `rank` of `world` from now on.
    pub fn set_rank(&mut self, rank: usize, world: usize) {
        (self.rank, self.world) = (rank, world.max(1));
    }

    /// The documents' token ids, for checking that every rank holds the same data.
    pub fn ids(&self) -> impl Iterator<Item = &[u32]> {
        self.docs.iter().map(|d| d.ids.as_slice())
    }

    pub fn tokens(&self) -> usize {
        self.docs.iter().map(|d| d.ids.len()).sum()
    }

    /// Global micro-batches in one pass over the data.
    pub fn batches_per_epoch(&self) -> u64 {
        let sequences = match self.batching.packing {
            true => self.tokens().div_ceil(self.batching.seq_len),
            false => self.docs.len(),
        };
        sequences.div_ceil(self.batching.batch_size * self.world) as u64
    }

    /// This rank's part of global micro-batch `g` (0-based, counting across epochs); empty
    /// where the epoch's last global micro-batch has no sequence left for this rank.
    pub fn batch(&mut self, g: u64) -> Result<LossBatch> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, index) = (g / per_epoch, (g % per_epoch) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch = Some((epoch, self.sequences(epoch)));
        }
        let sequences = &self.epoch.as_ref().expect("just set").1;
        let size = self.batching.batch_size;
        let start = ((index * self.world + self.rank) * size).min(sequences.len());
        let chosen = &sequences[start..(start + size).min(sequences.len())];
        let mut batch = self.assemble(chosen);
        // One seed per rank's part of each micro-batch, from the run's seed: a resumed run
        // draws the same LoRA dropout masks.
        let part = g.wrapping_mul(self.world as u64).wrapping_add(self.rank as u64);
        batch.dropout_seed = Some(Rng::new(self.batching.seed ^ part.wrapping_mul(0xd6e8_feb8_6659_fd93)).next_u64());
        Ok(batch)
    }

    fn sequences(&self, epoch: u64) -> Vec<Vec<Piece>> {
        let mut order: Vec<usize> = (0..self.docs.len()).collect();
        Rng::new(self.batching.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)).shuffle(&mut order);
        let len = self.batching.seq_len;
        if !self.batching.packing {
            return order.into_iter().map(|d| vec![(d, 0, self.docs[d].ids.len().min(len))]).collect();
        }
        let (mut out, mut current, mut room) = (Vec::new(), Vec::new(), len);
        for d in order {
            let mut start = 0;
            let n = self.docs[d].ids.len();
            while start < n {
                let take = (n - start).min(room);
                current.push((d, start, take));
                (start, room) = (start + take, room - take);
                if room == 0 {
                    out.push(std::mem::take(&mut current));
                    room = len;
                }
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }

    /// The batch of `sequences`, padded to the longest; a position predicts only within
    /// its own piece of a document.
    fn assemble(&self, sequences: &[Vec<Piece>]) -> LossBatch {
        let len = sequences.iter().map(|s| s.iter().map(|p| p.2).sum::<usize>()).max().unwrap_or(0);
        let k = sequences
            .iter()
            .flatten()
            .filter_map(|&(d, s, n)| {
                let rows = self.docs[d].rows.as_ref()?;
                (s..s + n).map(|p| rows.rows().row(p).0.len()).max()
            })
            .max()
            .unwrap_or(0);
        let cells = sequences.len() * len;
        let mut b = LossBatch {
            batch: sequences.len(),
            len,
            ids: vec![0; cells],
            keep: vec![0; cells],
            clm_weight: vec![0.0; cells],
            k,
            target_ids: vec![0; cells * k],
            target_probs: vec![0.0; cells * k],
            over: None,
            dropout_seed: None,
        };
        for (row, pieces) in sequences.iter().enumerate() {
            let mut t = row * len;
            for &(d, start, n) in pieces {
                let doc = &self.docs[d];
                for j in 0..n {
                    b.ids[t] = doc.ids[start + j];
                    b.keep[t] = 1;
                    if j + 1 < n {
                        b.clm_weight[t] = 1.0;
                        if let Some(rows) = &doc.rows {
                            let (ids, probs) = rows.rows().row(start + j);
                            b.target_ids[t * k..t * k + ids.len()].copy_from_slice(ids);
                            b.target_probs[t * k..t * k + probs.len()].copy_from_slice(probs);
                        }
                    }
                    t += 1;
                }
            }
        }
        b
    }
}
