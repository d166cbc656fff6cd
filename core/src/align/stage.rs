//! `fusellm align` (DESIGN.md step 4 as a stage): a source's store in, its aligned store
//! out (the source's top-k projected onto the target's positions, shard by shard), and a
//! report of how well the two tokenizations and vocabularies met.

use std::path::Path;

use serde::Serialize;

use super::vocab::{map_vocab, Vocabulary};
use super::{DocumentAligner, SequencePaths, Tokens};
use crate::checkpoint::Stored;
use crate::error::{Context, Error, Result};
use crate::files::{sha256_hex, write_atomically};
use crate::plugins::Configured;
use crate::split::read_texts;
use crate::store::{map_shard, shard_file, AlignedShard, Shard};
use fusellm_sdk::{Alignment, CooccurrenceBuf, SparseRowsBuf, VocabMap};

/// How the alignment went, for one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub source: String,
    pub target: String,
    pub aligner: String,
    pub mapper: String,
    pub compat: bool,
    pub documents: usize,
    pub target_positions: usize,
    /// Target positions by how many source tokens align to them, and how.
    pub one_to_one: usize,
    pub one_to_many: usize,
    pub many_to_one: usize,
    pub unaligned: usize,
    /// Shares of the source's top-k probability mass that map exactly, by edit distance,
    /// or not at all.
    pub mass_exact: f64,
    pub mass_mined: f64,
    pub mass_lost: f64,
    /// Source vocabulary entries by edit distance of their mapping (index = distance; the
    /// last bucket counts the rest).
    pub distance_histogram: Vec<usize>,
    /// Every shard of the aligned store: file and sha256.
    pub shards: Vec<(String, String)>,
}

/// Aligns the store of a source to the target's, with a sequence aligner and a
/// vocabulary mapper and their parameters.
pub fn align_stores(
    source_store: Stored<'_>,
    target_store: Stored<'_>,
    out: &Path,
    (aligner, mapper): (&Configured<'_>, &Configured<'_>),
    compat: bool,
    cache: Option<&Path>,
) -> Result<Report> {
    let (source, target) = (source_store.identity()?, target_store.identity()?);
    let (source_dir, target_dir) = (source_store.dir, target_store.dir);
    if source.corpus_sha256 != target.corpus_sha256 {
        return Err(Error::msg(format!(
            "{} and {} were computed over different corpora ({} vs {}); precompute both over the same split",
            source_dir.display(),
            target_dir.display(),
            source.corpus,
            target.corpus
        )));
    }
    let (source_ckpt, target_ckpt) = (source_store.checkpoint, target_store.checkpoint);
    let (source_vocab, target_vocab) =
        (Vocabulary::from_checkpoint(source_ckpt)?, Vocabulary::from_checkpoint(target_ckpt)?);
    let texts = read_texts(Path::new(&source.corpus))?;
    let counts = match mapper.entry.info.cooccurrence {
        true => {
            let paths = SequencePaths::new(aligner.entry, aligner.params.clone(), &source_vocab, &target_vocab, compat);
            Some(cooccurrence(&paths, (source_ckpt, target_ckpt), &texts)?)
        }
        false => None,
    };
    let map = map_vocab(mapper, &source_vocab, &target_vocab, compat, cache, counts.as_ref())?;
    let doc_aligner =
        DocumentAligner::new(aligner.entry, aligner.params.clone(), &map, &source_vocab, &target_vocab, compat);
    std::fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
    let mut report = Report {
        source: source.model.clone(),
        target: target.model.clone(),
        aligner: aligner.entry.info.name.clone(),
        mapper: mapper.entry.info.name.clone(),
        compat,
        distance_histogram: histogram(&map),
        ..Default::default()
    };
    let k = source.layout.k;
    let mut sample: Option<(Vec<String>, Vec<String>, Alignment)> = None;
    for s in 0..source.shards() {
        let file = shard_file(source_dir, s);
        let bytes = map_shard(&file)?;
        let shard = Shard::decode(&bytes).context(|| file.display().to_string())?;
        if shard.topk_ids.len() != *shard.offsets.last().unwrap_or(&0) as usize * k {
            return Err(Error::msg(format!(
                "{} does not hold k = {k} entries per token as store.json says",
                file.display()
            )));
        }
        let mut aligned = AlignedShard {
            docs: shard.docs.clone(),
            offsets: vec![0],
            rows: SparseRowsBuf::with_capacity(0, 0),
            ce_token: Vec::new(),
            mean_ce: shard.mean_ce.clone(),
            source_tokens: shard.offsets.windows(2).map(|w| w[1] - w[0]).collect(),
        };
        for (d, &doc) in shard.docs.iter().enumerate() {
            let text =
                texts.get(doc as usize).ok_or_else(|| Error::msg(format!("document {doc} is not in the corpus")))?;
            let (s_ids, s_spans) = source_ckpt.tokenizer.encode_with_spans(text)?;
            let (t_ids, t_spans) = target_ckpt.tokenizer.encode_with_spans(text)?;
            let ce = shard.ce(d, &s_ids, k)?;
            let (start, end) = (shard.offsets[d] as usize, shard.offsets[d + 1] as usize);
            let row_offsets: Vec<u32> = (0..=(end - start) as u32).map(|r| r * k as u32).collect();
            let topk = fusellm_sdk::SparseRows {
                offsets: &row_offsets,
                ids: &shard.topk_ids[start * k..end * k],
                values: &shard.topk_logprobs[start * k..end * k],
            };
            let (rows, path) = doc_aligner.align(
                Tokens { ids: &s_ids, spans: &s_spans },
                Tokens { ids: &t_ids, spans: &t_spans },
                topk,
            )?;
            if let Some(at) = crate::store::not_a_number(&rows.values) {
                return Err(Error::msg(format!(
                    "the aligner `{}` gave document {doc} of {} the value {} (entry {at}): NaN or Inf, which no aligned distribution holds",
                    aligner.entry.info.name,
                    source_dir.display(),
                    rows.values[at]
                )));
            }
            report.add(&path, s_ids.len(), t_ids.len(), topk, &map);
            if sample.is_none() {
                let strings = |v: &Vocabulary, ids: &[u32]| {
                    ids.iter().map(|&i| v.tokens.get(i as usize).cloned().unwrap_or_default()).collect()
                };
                sample = Some((strings(&source_vocab, &s_ids), strings(&target_vocab, &t_ids), path.clone()));
            }
            append(&mut aligned, &rows, &path, &ce, t_ids.len());
        }
        let bytes = aligned.encode(target.layout.wide_ids, source.layout.half)?;
        let name = format!("aligned-{s:05}.safetensors");
        write_atomically(&out.join(&name), &bytes)?;
        report.shards.push((name, sha256_hex(&bytes)));
        report.documents += aligned.docs.len();
    }
    let report = report.finish();
    write_atomically(&out.join("report.json"), &serde_json::to_vec_pretty(&report).expect("JSON"))?;
    if let Some((source_tokens, target_tokens, path)) = &sample {
        write_atomically(&out.join("report.html"), html(&report, source_tokens, target_tokens, path).as_bytes())?;
    }
    Ok(report)
}

/// How often the sequence aligner pairs each source id with each target id over `texts`:
/// every pair on each document's path, once per target position (FuseChat's counts).
pub fn cooccurrence(
    paths: &SequencePaths<'_>,
    (source, target): (&crate::checkpoint::Checkpoint, &crate::checkpoint::Checkpoint),
    texts: &[String],
) -> Result<CooccurrenceBuf> {
    let mut counts: std::collections::HashMap<(u32, u32), u32> = std::collections::HashMap::new();
    for text in texts {
        let (s_ids, s_spans) = source.tokenizer.encode_with_spans(text)?;
        let (t_ids, t_spans) = target.tokenizer.encode_with_spans(text)?;
        let path = paths.path(Tokens { ids: &s_ids, spans: &s_spans }, Tokens { ids: &t_ids, spans: &t_spans })?;
        let mut pairs: Vec<(u32, u32, u32)> =
            path.a.iter().zip(&path.b).map(|(&i, &j)| (j, s_ids[i as usize], t_ids[j as usize])).collect();
        pairs.sort_unstable();
        pairs.dedup();
        for (_, s, t) in pairs {
            *counts.entry((s, t)).or_default() += 1;
        }
    }
    Ok(CooccurrenceBuf::from_counts(counts))
}

/// Adds one document's rows, and the source CE at each target position (that of the last
/// source token aligned to it; NaN where none is).
fn append(shard: &mut AlignedShard, rows: &SparseRowsBuf, path: &Alignment, ce: &[f32], targets: usize) {
    let mut last_source = vec![None; targets];
    for (&a, &b) in path.a.iter().zip(&path.b) {
        last_source[b as usize] = Some(a as usize);
    }
    shard.ce_token.extend(last_source.iter().map(|j| j.and_then(|j| ce.get(j).copied()).unwrap_or(f32::NAN)));
    let base = *shard.rows.offsets.last().expect("starts at 0");
    shard.rows.offsets.extend(rows.offsets[1..].iter().map(|o| o + base));
    shard.rows.ids.extend_from_slice(&rows.ids);
    shard.rows.values.extend_from_slice(&rows.values);
    shard.offsets.push(shard.offsets.last().expect("starts at 0") + targets as u32);
}

impl Report {
    /// Counts one document's alignment kinds and top-k mass by how it maps.
    pub fn add(
        &mut self,
        path: &Alignment,
        sources: usize,
        targets: usize,
        topk: fusellm_sdk::SparseRows<'_>,
        map: &VocabMap,
    ) {
        tally(self, path, sources, targets, topk, map);
    }
}

fn tally(
    report: &mut Report,
    path: &Alignment,
    sources: usize,
    targets: usize,
    topk: fusellm_sdk::SparseRows<'_>,
    map: &VocabMap,
) {
    let (mut to_source, mut to_target) = (vec![0usize; targets], vec![0usize; sources]);
    let mut source_of = vec![0usize; targets];
    for (&a, &b) in path.a.iter().zip(&path.b) {
        to_source[b as usize] += 1;
        to_target[a as usize] += 1;
        source_of[b as usize] = a as usize;
    }
    for (i, &n) in to_source.iter().enumerate() {
        match n {
            0 => report.unaligned += 1,
            1 if to_target[source_of[i]] == 1 => report.one_to_one += 1,
            1 => report.one_to_many += 1,
            _ => report.many_to_one += 1,
        }
    }
    report.target_positions += targets;
    let mut probs = Vec::new();
    for p in 0..topk.len() {
        let (ids, values) = topk.row(p);
        fusellm_sdk::math::softmax_into(values, 1.0, &mut probs);
        for (&id, &q) in ids.iter().zip(&probs) {
            match (map.get(id), map.distance.get(id as usize).copied().unwrap_or(0)) {
                (None, _) => report.mass_lost += q,
                (Some(_), 0) => report.mass_exact += q,
                (Some(_), _) => report.mass_mined += q,
            }
        }
    }
}

/// The aligned store in `dir` checked whole before fusion reads it: every shard its
/// report.json lists there with the recorded hash.
pub fn verify_aligned(dir: &Path) -> Result<()> {
    let file = dir.join("report.json");
    if !file.exists() && dir.join("store.json").exists() {
        return Err(Error::msg(format!(
            "{} is a source's store, not yet aligned to the target: align it first (`fusellm align --source {} --target TARGET_STORE --out ALIGNED`) and fuse the aligned store",
            dir.display(),
            dir.display()
        )));
    }
    let bytes = std::fs::read(&file).context(|| {
        format!("{} is not a finished aligned store (no report.json): run `fusellm align` into it", dir.display())
    })?;
    #[derive(serde::Deserialize)]
    struct Listed {
        shards: Vec<(String, String)>,
    }
    let listed: Listed = serde_json::from_slice(&bytes).context(|| file.display().to_string())?;
    for (name, sha256) in &listed.shards {
        let shard = dir.join(name);
        if !crate::files::cached_file_sha256(&shard).is_ok_and(|h| h == *sha256) {
            return Err(Error::msg(format!(
                "{} is missing or changed since it was aligned; run the same `fusellm align` into {} again, or `fusellm run`",
                shard.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Mapping distances of the source vocabulary, in buckets 0..=10 and more.
fn histogram(map: &VocabMap) -> Vec<usize> {
    let mut buckets = vec![0; 12];
    for (t, &d) in map.target.iter().zip(&map.distance) {
        if t.is_some() {
            buckets[(d as usize).min(11)] += 1;
        }
    }
    buckets
}

impl Report {
    /// The figures in two lines: how target positions align, and where the top-k mass goes.
    pub fn summary(&self) -> [String; 2] {
        let pct = |n: usize| 100.0 * n as f64 / self.target_positions.max(1) as f64;
        [
            format!(
                "target positions: {:.1}% one-to-one, {:.1}% one-to-many, {:.1}% many-to-one, {:.1}% unaligned",
                pct(self.one_to_one),
                pct(self.one_to_many),
                pct(self.many_to_one),
                pct(self.unaligned)
            ),
            format!(
                "top-k mass: {:.1}% maps exactly, {:.1}% by edit distance, {:.1}% lost",
                100.0 * self.mass_exact,
                100.0 * self.mass_mined,
                100.0 * self.mass_lost
            ),
        ]
    }

    /// Normalises the mass shares (they are summed as raw mass while documents are added).
    pub fn finish(mut self) -> Self {
        let total = self.mass_exact + self.mass_mined + self.mass_lost;
        if total > 0.0 {
            (self.mass_exact, self.mass_mined, self.mass_lost) =
                (self.mass_exact / total, self.mass_mined / total, self.mass_lost / total);
        }
        self
    }
}

/// A page with the report's figures and the first document's two tokenizations, the
/// alignment drawn between them (the first 150 tokens of each).
fn html(report: &Report, source: &[String], target: &[String], path: &Alignment) -> String {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let row = |tokens: &[String], y: usize| -> (String, Vec<f64>) {
        let (mut x, mut svg, mut centres) = (4.0, String::new(), Vec::new());
        for t in tokens.iter().take(150) {
            let w = 8.0 * t.chars().count().max(1) as f64 + 6.0;
            svg += &format!(
                "<rect x='{x:.0}' y='{y}' width='{w:.0}' height='22' fill='#eef' stroke='#99c'/>\
                 <text x='{:.0}' y='{}' font-family='monospace' font-size='13'>{}</text>",
                x + 3.0,
                y + 16,
                escape(t)
            );
            centres.push(x + w / 2.0);
            x += w + 2.0;
        }
        (svg, centres)
    };
    let (top, top_x) = row(source, 10);
    let (bottom, bottom_x) = row(target, 110);
    let lines: String = path
        .a
        .iter()
        .zip(&path.b)
        .filter_map(|(&a, &b)| Some((top_x.get(a as usize)?, bottom_x.get(b as usize)?)))
        .map(|(x1, x2)| format!("<line x1='{x1:.0}' y1='32' x2='{x2:.0}' y2='110' stroke='#c55' stroke-width='1'/>"))
        .collect();
    let width = top_x.last().copied().unwrap_or(0.0).max(bottom_x.last().copied().unwrap_or(0.0)) + 200.0;
    let [positions, mass] = report.summary();
    format!(
        "<!doctype html><meta charset='utf-8'><title>fusellm align</title><body style='font-family:sans-serif'>\
         <h1>{} &rarr; {}</h1><p>{} with {}{}: {} documents, {} target positions.</p>\
         <p>{positions}.<br>{mass}.<br>Mapping distances 0..10 and more: {:?}</p>\
         <h2>The first document (source above, target below)</h2><div style='overflow-x:scroll'>\
         <svg xmlns='http://www.w3.org/2000/svg' width='{width:.0}' height='140'>{lines}{top}{bottom}</svg></div></body>",
        escape(&report.source),
        escape(&report.target),
        report.aligner,
        report.mapper,
        if report.compat { " (compat)" } else { "" },
        report.documents,
        report.target_positions,
        report.distance_histogram
    )
}
