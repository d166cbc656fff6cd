//! `fusellm fuse` (DESIGN.md step 5 as a stage): the target's store and each source's
//! aligned store in, a fused store out. Per document, every candidate's sparse top-k at the
//! target's positions and its CE (per document, per token) go to a fusion plugin, whose
//! sparse target per position is what training distils.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Stored;
use crate::error::{Context, Error, Result};
use crate::files::write_atomically;
use crate::plugins::Configured;
use crate::split::read_texts;
use crate::store::{map_shard, shard_file, AlignedShard, FusedShard, Shard};
use fusellm_sdk::{CandidateBuf, FusionInputBuf, SparseRowsBuf};

/// What a fused store was made from, written as fused.json when every shard exists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FusedManifest {
    pub format: String,
    pub plugin: String,
    pub plugin_version: String,
    pub params: String,
    pub target_store: String,
    pub aligned_stores: Vec<String>,
    /// The target model's checkpoint folder (its tokenizer and config go with checkpoints).
    pub target_model: String,
    pub wide_ids: bool,
    pub documents: usize,
    pub positions: usize,
    pub entries: usize,
    pub shards: Vec<(String, String)>,
}

pub fn fused_file(dir: &Path, s: usize) -> PathBuf {
    dir.join(format!("fused-{s:05}.safetensors"))
}

/// Fuses the target's store with the sources' aligned stores (aligned against it), shard
/// by shard; finished shards of an interrupted run are kept.
pub fn fuse_stores(
    target: Stored<'_>,
    aligned_dirs: &[PathBuf],
    fusion: &Configured<'_>,
    out: &Path,
) -> Result<FusedManifest> {
    let identity = target.identity()?;
    aligned_dirs.iter().try_for_each(|dir| crate::align::stage::verify_aligned(dir))?;
    let texts = read_texts(Path::new(&identity.corpus))?;
    std::fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
    let mut manifest = FusedManifest {
        format: crate::store::FUSED_FORMAT.into(),
        plugin: fusion.entry.info.name.clone(),
        plugin_version: fusion.entry.info.version.clone(),
        params: serde_json::to_string(&fusion.params).expect("JSON"),
        target_store: target.dir.display().to_string(),
        aligned_stores: aligned_dirs.iter().map(|d| d.display().to_string()).collect(),
        target_model: identity.model.clone(),
        wide_ids: identity.layout.wide_ids,
        ..Default::default()
    };
    for s in 0..identity.shards() {
        let file = fused_file(out, s);
        // A finished shard of an interrupted run is kept; its bytes are hashed as read.
        let done = std::fs::read(&file).ok().and_then(|b| FusedShard::decode(&b).ok().map(|f| (f, b)));
        let (fused, bytes) = match done {
            Some(done) => done,
            None => {
                let fused = fuse_shard(s, target, aligned_dirs, &texts, fusion)?;
                if let Some(at) = crate::store::not_a_number(&fused.rows.values) {
                    return Err(Error::msg(format!(
                        "the fusion plugin `{}` gave shard {s} the probability {} (entry {at}): NaN or Inf, which no distribution holds",
                        fusion.entry.info.name,
                        fused.rows.values[at]
                    )));
                }
                let bytes = fused.encode(identity.layout.wide_ids)?;
                write_atomically(&file, &bytes)?;
                (fused, bytes)
            }
        };
        manifest.documents += fused.docs.len();
        manifest.positions += fused.tokens.len();
        manifest.entries += fused.rows.ids.len();
        let name = file.file_name().expect("a file").to_string_lossy().into_owned();
        manifest.shards.push((name, crate::files::sha256_hex(&bytes)));
    }
    write_atomically(&out.join("fused.json"), &serde_json::to_vec_pretty(&manifest).expect("JSON"))?;
    Ok(manifest)
}

fn fuse_shard(
    s: usize,
    Stored { dir: target_dir, checkpoint }: Stored<'_>,
    aligned_dirs: &[PathBuf],
    texts: &[String],
    fusion: &Configured<'_>,
) -> Result<FusedShard> {
    let file = shard_file(target_dir, s);
    let target = Shard::decode(&map_shard(&file)?).context(|| file.display().to_string())?;
    let sources = aligned_dirs
        .iter()
        .map(|dir| {
            let file = dir.join(format!("aligned-{s:05}.safetensors"));
            let shard = AlignedShard::decode(&map_shard(&file)?).context(|| file.display().to_string())?;
            match shard.docs == target.docs {
                true => Ok(shard),
                false => Err(Error::msg(format!(
                    "{} holds other documents than {}: align that source against this target store again",
                    file.display(),
                    shard_file(target_dir, s).display()
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let k = target.topk_ids.len().checked_div(*target.offsets.last().unwrap_or(&0) as usize).unwrap_or(0);
    let mut out = FusedShard::default();
    for (d, &doc) in target.docs.iter().enumerate() {
        let text = texts.get(doc as usize).ok_or_else(|| Error::msg(format!("document {doc} is not in the corpus")))?;
        let ids = checkpoint.tokenizer.encode(text)?;
        let input = fusion_input(&target, d, k, &ids, text.len(), &sources)?;
        let mut fused =
            fusion.entry.fuse(&fusion.params, &input.view()).context(|| format!("document {doc} (shard {s})"))?;
        fused.end_row(); // the last position predicts nothing
        out.push(doc, &ids, &fused);
    }
    Ok(out)
}

/// One document's fusion input: the target's own candidate and each aligned source's, over
/// the `ids.len() - 1` positions that predict a next token.
fn fusion_input(
    target: &Shard,
    d: usize,
    k: usize,
    ids: &[u32],
    text_bytes: usize,
    sources: &[AlignedShard],
) -> Result<FusionInputBuf> {
    let positions = ids.len().saturating_sub(1);
    let start = target.offsets[d] as usize;
    let own = CandidateBuf {
        dist: SparseRowsBuf {
            offsets: (0..=positions as u32).map(|p| p * k as u32).collect(),
            ids: target.topk_ids[start * k..(start + positions) * k].to_vec(),
            values: target.topk_logprobs[start * k..(start + positions) * k].to_vec(),
        },
        ce_doc: target.mean_ce[d],
        ce_token: target.ce(d, ids, k)?,
        tokens: ids.len() as u32,
        is_target: true,
    };
    let mut candidates = vec![own];
    for source in sources {
        let (lo, hi) = (source.offsets[d] as usize, source.offsets[d + 1] as usize);
        if hi - lo != ids.len() {
            return Err(Error::msg(format!(
                "document {}: the aligned store has {} target positions, the target tokenizer gives {}",
                target.docs[d],
                hi - lo,
                ids.len()
            )));
        }
        let rows = &source.rows.offsets[lo..=lo + positions];
        let (a, b) = (rows[0] as usize, rows[positions] as usize);
        candidates.push(CandidateBuf {
            dist: SparseRowsBuf {
                offsets: rows.iter().map(|o| o - a as u32).collect(),
                ids: source.rows.ids[a..b].to_vec(),
                values: source.rows.values[a..b].to_vec(),
            },
            ce_doc: source.mean_ce[d],
            ce_token: source.ce_token[lo..lo + positions].to_vec(),
            tokens: source.source_tokens[d],
            is_target: false,
        });
    }
    Ok(FusionInputBuf { gold: ids[1..].to_vec(), text_bytes: text_bytes as u32, candidates })
}
