//! The distribution store (DESIGN.md step 2): what precompute keeps of one model over a
//! corpus, in shards of a fixed number of documents. Shards are written under a temporary
//! name and renamed when complete, so a run killed at any moment and started again skips
//! the finished shards and writes the same bytes for the others; `--shard i/N` gives worker
//! i the shards `s` with `s % N == i`. The manifest, with every shard's hash, is written
//! once every shard exists.

mod aligned;
mod fused;
mod shard;
mod tensors;

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::files::{sha256_hex, write_atomically};
pub use aligned::AlignedShard;
pub use fused::FusedShard;
pub use shard::{Layout, Shard};

/// The version of the store's file format.
pub const FORMAT: &str = "fusellm-store/1";
/// The version of the aligned store's file format.
pub const ALIGNED_FORMAT: &str = "fusellm-aligned/2";
/// The version of the fused store's file format.
pub const FUSED_FORMAT: &str = "fusellm-fused/1";

/// What a store was made from and how; a run that asks for something else is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub format: String,
    /// Where the model was (for finding it again); the model itself is `model_sha256`.
    pub model: String,
    /// [`crate::checkpoint::Checkpoint::content_sha256`]; empty in stores of fusellm
    /// before 0.1 recorded it.
    #[serde(default)]
    pub model_sha256: String,
    pub tokenizer_sha256: String,
    pub corpus: String,
    pub corpus_sha256: String,
    pub documents: usize,
    pub docs_per_shard: usize,
    pub layout: Layout,
}

/// The manifest: the identity and the hash of every shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub identity: Identity,
    pub fusellm_version: String,
    pub tokens: usize,
    pub bytes: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub sha256: String,
    pub documents: usize,
    pub tokens: usize,
}

impl Identity {
    pub fn shards(&self) -> usize {
        self.documents.div_ceil(self.docs_per_shard)
    }
}

pub fn shard_file(dir: &Path, s: usize) -> PathBuf {
    dir.join(format!("shard-{s:05}.safetensors"))
}

/// The first value that is NaN or +Inf: a log-probability, a logit or a probability
/// never is (-Inf, a probability of zero, is one), so such a value is a broken computation
/// caught where it enters a store instead of spreading through the stages after it.
pub fn not_a_number(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| v.is_nan() || *v == f32::INFINITY)
}

/// The sha256 of a shard as it was written, beside it (`shard-NNNNN.sha256`): what a
/// resumed or merged precompute checks a finished shard against before the store has a
/// manifest.
fn hash_file(shard: &Path) -> PathBuf {
    shard.with_extension("sha256")
}

/// Writes a shard and then its hash.
fn write_shard(file: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(file, bytes)?;
    Ok(write_atomically(&hash_file(file), sha256_hex(bytes).as_bytes())?)
}

/// What precompute keeps of one document.
#[derive(Clone, Debug, PartialEq)]
pub struct DocTopK {
    /// The document's token ids (BOS included where the model adds one).
    pub ids: Vec<u32>,
    /// `k` ids per position, by decreasing probability (`ids.len() * k`).
    pub topk_ids: Vec<u32>,
    /// Their natural-log probabilities under the full softmax.
    pub topk_logprobs: Vec<f32>,
    /// `-log p(ids[t + 1])` for `t < ids.len() - 1`.
    pub ce: Vec<f32>,
    /// The mean of `ce` (NaN for a one-token document).
    pub mean_ce: f32,
    /// Per position, the probability mass outside the top-k (when asked for).
    pub residual: Option<Vec<f32>>,
}

/// What one precompute run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunSummary {
    pub written: usize,
    pub skipped: usize,
    pub documents: usize,
    pub tokens: usize,
}

/// Where a precompute run stands, after each shard it writes.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub shards_done: usize,
    pub shards: usize,
    /// Documents and tokens computed by this run so far.
    pub documents: usize,
    pub tokens: usize,
}

/// What precompute keeps and how it batches (`fusellm precompute`, `[precompute]`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub k: usize,
    /// Log-probabilities as f16 (else f32).
    pub half: bool,
    pub residual: bool,
    pub docs_per_shard: usize,
    /// Padded tokens per forward pass.
    pub batch_tokens: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { k: 10, half: true, residual: false, docs_per_shard: 256, batch_tokens: 4096 }
    }
}

/// Fills this worker's shards of the store in `dir` (creating it, or checking that it was
/// made from the same model, corpus and layout) with what `compute` returns for each
/// shard's documents, then writes the manifest if every shard now exists. Finished, sound
/// shards are kept; `compute` is called only for the others.
pub fn fill(
    dir: &Path,
    identity: &Identity,
    (worker, workers): (usize, usize),
    mut compute: impl FnMut(Range<usize>) -> Result<Vec<DocTopK>>,
    mut progress: impl FnMut(Progress),
) -> Result<RunSummary> {
    if workers == 0 || worker >= workers {
        return Err(Error::msg(format!(
            "--shard {worker}/{workers}: the worker index must be below the number of workers"
        )));
    }
    claim(dir, identity)?;
    let mut summary = RunSummary::default();
    let mine: Vec<usize> = (0..identity.shards()).filter(|s| s % workers == worker).collect();
    let recorded = read_manifest(dir).ok();
    for (n, &s) in mine.iter().enumerate() {
        let file = shard_file(dir, s);
        if shard_is_sound(&file, recorded.as_ref()) {
            summary.skipped += 1;
            continue;
        }
        let range = s * identity.docs_per_shard..((s + 1) * identity.docs_per_shard).min(identity.documents);
        let tops = compute(range.clone())?;
        for (doc, top) in range.clone().zip(&tops) {
            if let Some(at) = not_a_number(&top.topk_logprobs).or_else(|| not_a_number(&top.ce)) {
                return Err(Error::msg(format!(
                    "{}: document {doc} gets a log-probability of {} (position {}): the model computes NaN or Inf; check its weights (`fusellm validate`) or compute in f32",
                    identity.model,
                    top.topk_logprobs.get(at).copied().unwrap_or(f32::NAN),
                    at / identity.layout.k.max(1)
                )));
            }
        }
        let indices: Vec<u32> = range.map(|i| i as u32).collect();
        let bytes = Shard::new(&indices, &tops, identity.layout).encode(identity.layout)?;
        write_shard(&file, &bytes)?;
        summary.written += 1;
        summary.tokens += tops.iter().map(|t| t.ids.len()).sum::<usize>();
        summary.documents += tops.len();
        progress(Progress {
            shards_done: n + 1,
            shards: mine.len(),
            documents: summary.documents,
            tokens: summary.tokens,
        });
    }
    if (0..identity.shards()).all(|s| shard_file(dir, s).exists()) {
        write_manifest(dir, identity)?;
    }
    Ok(summary)
}

/// Whether a finished shard can be kept: it has the hash the manifest records, or before
/// there is a manifest the hash written beside it (a shard without one, or one that does
/// not decode, is not kept). A corrupt shard is written again, alone.
fn shard_is_sound(file: &Path, manifest: Option<&Manifest>) -> bool {
    let Ok(bytes) = map_shard(file) else { return false };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let listed = manifest.and_then(|m| m.shards.iter().find(|e| Some(&e.file) == name.as_ref()));
    let recorded = match listed {
        Some(entry) => Some(entry.sha256.clone()),
        None => std::fs::read_to_string(hash_file(file)).ok(),
    };
    let sound = recorded.is_some_and(|h| h == sha256_hex(&bytes)) && Shard::decode(&bytes).is_ok();
    if !sound {
        tracing::warn!("{} is corrupt or unfinished; computing it again", file.display());
    }
    sound
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let file = dir.join("manifest.json");
    let text = std::fs::read(&file).context(|| {
        format!("{} has no manifest: its precompute has not finished (run it again to complete it)", dir.display())
    })?;
    serde_json::from_slice(&text).context(|| format!("reading {}", file.display()))
}

/// Records the identity of a new store, or checks an existing one against it.
fn claim(dir: &Path, identity: &Identity) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("store.json");
    match file.exists() {
        true => {
            let existing = read_identity(dir)?;
            if let Some(diff) = difference(&existing, identity) {
                return Err(Error::msg(format!(
                    "{} was written with {diff}; use another folder, or remove it to start over",
                    dir.display()
                )));
            }
            Ok(())
        }
        false => Ok(write_atomically(&file, &serde_json::to_vec_pretty(identity).expect("JSON"))?),
    }
}

/// The first way in which an existing store differs from what a run asks for.
fn difference(existing: &Identity, wanted: &Identity) -> Option<String> {
    let fields: [(&str, String, String); 7] = [
        ("format", existing.format.clone(), wanted.format.clone()),
        ("tokenizer (sha256)", existing.tokenizer_sha256.clone(), wanted.tokenizer_sha256.clone()),
        ("corpus (sha256)", existing.corpus_sha256.clone(), wanted.corpus_sha256.clone()),
        ("k", existing.layout.k.to_string(), wanted.layout.k.to_string()),
        ("log-prob dtype", dtype(existing.layout), dtype(wanted.layout)),
        ("documents per shard", existing.docs_per_shard.to_string(), wanted.docs_per_shard.to_string()),
        ("residual setting", existing.layout.residual.to_string(), wanted.layout.residual.to_string()),
    ];
    let model = match existing.model_sha256.is_empty() {
        // A store from before content hashes: the path is all it says.
        true => existing.model != wanted.model,
        false => existing.model_sha256 != wanted.model_sha256,
    };
    fields.into_iter().find(|(_, a, b)| a != b).map(|(what, a, b)| format!("another {what}: {a}, not {b}")).or_else(
        || {
            model.then(|| {
                format!("another model (its config, tokenizer or weights): {}, not {}", existing.model, wanted.model)
            })
        },
    )
}

fn dtype(layout: Layout) -> String {
    if layout.half { "f16" } else { "f32" }.into()
}

fn write_manifest(dir: &Path, identity: &Identity) -> Result<()> {
    let mut shards = Vec::new();
    let (mut tokens, mut bytes_total) = (0, 0);
    for s in 0..identity.shards() {
        let file = shard_file(dir, s);
        let bytes = map_shard(&file)?;
        let shard = Shard::decode(&bytes).context(|| file.display().to_string())?;
        let n = *shard.offsets.last().unwrap_or(&0) as usize;
        tokens += n;
        bytes_total += bytes.len() as u64;
        let name = file.file_name().expect("a file").to_string_lossy().into_owned();
        shards.push(ShardEntry { file: name, sha256: sha256_hex(&bytes), documents: shard.docs.len(), tokens: n });
    }
    let manifest = Manifest {
        identity: identity.clone(),
        fusellm_version: env!("CARGO_PKG_VERSION").into(),
        tokens,
        bytes: bytes_total,
        shards,
    };
    Ok(write_atomically(&dir.join("manifest.json"), &serde_json::to_vec_pretty(&manifest).expect("JSON"))?)
}

/// Gathers the shards of stores that workers filled in separate folders (cluster nodes
/// without a shared file system) into `out`, and writes its manifest. The stores must have
/// the same identity; every shard must be in one of them.
pub fn merge(out: &Path, inputs: &[PathBuf]) -> Result<usize> {
    let first = inputs.first().ok_or_else(|| Error::msg("store merge needs at least one input store"))?;
    let identity = read_identity(first)?;
    for dir in &inputs[1..] {
        if let Some(diff) = difference(&read_identity(dir)?, &identity) {
            return Err(Error::msg(format!("{} was written with {diff} than {}", dir.display(), first.display())));
        }
    }
    claim(out, &identity)?;
    let mut missing = Vec::new();
    for s in 0..identity.shards() {
        let target = shard_file(out, s);
        if shard_is_sound(&target, None) {
            continue;
        }
        match inputs.iter().map(|d| shard_file(d, s)).find(|f| shard_is_sound(f, None)) {
            Some(source) => {
                let bytes = std::fs::read(&source).context(|| format!("reading {}", source.display()))?;
                write_shard(&target, &bytes)?;
            }
            None => missing.push(s.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::msg(format!(
            "shard(s) {} are in none of the inputs; run their workers (--shard) and merge again",
            missing.join(", ")
        )));
    }
    write_manifest(out, &identity)?;
    Ok(identity.shards())
}

pub fn read_identity(dir: &Path) -> Result<Identity> {
    let file = dir.join("store.json");
    let bytes = std::fs::read(&file).context(|| format!("{} is not a store (no store.json)", dir.display()))?;
    serde_json::from_slice(&bytes).context(|| format!("reading {}", file.display()))
}

/// What `fusellm store verify` finds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    pub missing: Vec<String>,
    pub corrupt: Vec<String>,
    pub tokens: usize,
    pub bytes: u64,
}

/// Checks a store against its manifest: every shard present, with its recorded hash.
pub fn verify(dir: &Path) -> Result<Verification> {
    let manifest = read_manifest(dir)?;
    let mut out = Verification { tokens: manifest.tokens, bytes: manifest.bytes, ..Default::default() };
    if !read_identity(dir).is_ok_and(|identity| identity == manifest.identity) {
        out.corrupt.push("store.json".into());
    }
    for entry in &manifest.shards {
        let file = dir.join(&entry.file);
        match file.exists() {
            false => out.missing.push(entry.file.clone()),
            true if !crate::files::cached_file_sha256(&file).is_ok_and(|h| h == entry.sha256) => {
                out.corrupt.push(entry.file.clone())
            }
            true => {}
        }
    }
    Ok(out)
}

/// The store in `dir` checked whole before a stage reads it: every shard there with the
/// hash its manifest records (hashes cached per file version, so a store is read once).
pub fn verify_for_reading(dir: &Path) -> Result<()> {
    let v = verify(dir)?;
    if v.missing.is_empty() && v.corrupt.is_empty() {
        return Ok(());
    }
    let damaged: Vec<String> = v.missing.iter().chain(&v.corrupt).map(|f| dir.join(f).display().to_string()).collect();
    Err(Error::msg(format!(
        "{} {} missing or changed since the store was written; run the same `fusellm precompute` on {} again (it recomputes those shards alone), or `fusellm run`",
        damaged.join(", "),
        if damaged.len() == 1 { "is" } else { "are" },
        dir.display()
    )))
}

/// A shard file, memory-mapped: readers decode it from the map rather than a copy.
pub fn map_shard(file: &Path) -> Result<memmap2::Mmap> {
    let opened = std::fs::File::open(file).context(|| format!("opening {}", file.display()))?;
    // SAFETY: shards are written once under a temporary name and renamed into place, never
    // modified afterwards; the map is read-only.
    unsafe { memmap2::Mmap::map(&opened) }.context(|| format!("mapping {}", file.display()))
}
