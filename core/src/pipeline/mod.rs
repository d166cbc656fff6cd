//! `fusellm run` (DESIGN.md, "The pipeline as stages"): split -> precompute -> vocab-map
//! and align -> fuse -> train -> eval. Each stage writes into a cache folder named by a
//! hash of its inputs (the upstream stages' keys, its config section, the names and
//! versions of its plugins), so a stage whose inputs are unchanged is reused: changing the
//! fusion plugin never recomputes the sources' forward passes, and a sweep's variants share
//! every stage they have in common. An interrupted run continues where it stopped.

mod validate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::align::stage::align_stores;
use crate::checkpoint::{Checkpoint, Stored};
use crate::config::Config;
use crate::error::{Context, Result};
use crate::eval::{score, Score, Scorer};
use crate::files::{file_sha256, sha256_hex, write_atomically};
use crate::fuse::fuse_stores;
use crate::model::LoadMode;
use crate::plugins::{default_cache_dir, Configured, Entry, Registry};
use crate::precompute::precompute_model;
use crate::split::{read_documents, read_texts, split_corpus, Splitter};
use crate::store::verify;
use crate::train::data::fused_documents;
use crate::train::{latest_checkpoint, Dataset, Document, Trainer};
pub use validate::{open_model, validate, Checked};

/// What a run reports as it goes.
pub enum Event<'a> {
    /// A stage starts (`reused`: its output is already in the cache).
    Stage { name: &'a str, reused: bool },
    /// Where the running stage stands: `done` of `total` units (shards, steps, sets), and
    /// what else to show (throughput, losses).
    Progress { done: u64, total: u64, message: String },
}

impl Event<'_> {
    /// A precompute's progress, `elapsed_s` seconds after it started.
    pub fn of_precompute(p: &crate::store::Progress, elapsed_s: f64) -> Self {
        let rate = |n: usize| n as f64 / elapsed_s.max(1e-9);
        let message = format!("shards  {:.1} documents/s  {:.0} tokens/s", rate(p.documents), rate(p.tokens));
        Event::Progress { done: p.shards_done as u64, total: p.shards as u64, message }
    }
}

impl From<crate::train::Progress<'_>> for Event<'_> {
    fn from(p: crate::train::Progress<'_>) -> Self {
        Event::Progress { done: p.metrics.step, total: p.total_steps, message: p.parts() }
    }
}

/// One stage of a run, as recorded in run.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub key: String,
    pub output: String,
    pub reused: bool,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub role: String,
    pub name: String,
    pub version: String,
    pub tier: String,
    pub origin: String,
}

/// A model's score on one evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub model: String,
    pub set: String,
    #[serde(flatten)]
    pub score: Score,
    pub perplexity: f64,
    pub bits_per_byte: f64,
}

/// run.json: what was run, with what, and what came out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub fusellm_version: String,
    pub git_revision: String,
    pub config: String,
    pub plugins: Vec<PluginRecord>,
    pub stages: Vec<StageRecord>,
    pub checkpoint: Option<String>,
    pub eval: Vec<EvalRow>,
}

/// A stage key: a short hash of everything the stage's output depends on.
fn key<S: AsRef<str>>(parts: &[S]) -> String {
    let joined: Vec<&str> = parts.iter().map(AsRef::as_ref).collect();
    sha256_hex(joined.join("\u{1f}").as_bytes())[..16].to_string()
}

/// What identifies an opened checkpoint: the adapter that read it (name and version), its
/// config and tokenizer, and the names, sizes and times of its weight files (hashing
/// gigabytes of weights on every run would cost more than it saves).
fn model_identity(checkpoint: &Checkpoint) -> Result<String> {
    let dir = &checkpoint.dir;
    let mut parts = vec![
        format!("{}@{}", checkpoint.adapter, checkpoint.adapter_version),
        file_sha256(&dir.join("config.json"))?,
        file_sha256(&dir.join("tokenizer.json"))?,
    ];
    let mut weights: Vec<String> = std::fs::read_dir(dir)
        .context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            let meta = e.metadata().ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!("{}:{}:{:?}", e.file_name().to_string_lossy(), meta.map_or(0, |m| m.len()), modified)
        })
        .collect();
    weights.sort();
    parts.extend(weights);
    Ok(key(&parts))
}

/// Trains `target` on `docs` into `run_dir` as the config's `[train]` says, in its dtype on
/// `[run] device`, resuming from the latest checkpoint there when asked and stopping after
/// step `stop_at` if given: the train stage for `fusellm run` and `fusellm train` alike.
pub fn train_target(
    config: &Config,
    target: &Checkpoint,
    docs: Vec<Document>,
    run_dir: &Path,
    (resume, stop_at): (bool, Option<u64>),
    progress: impl FnMut(crate::train::Progress),
) -> Result<crate::train::Summary> {
    let train = config.train.as_ref().ok_or_else(|| config.error_at("train", "needs a [train] section"))?;
    let device = crate::device::parse(&config.run.device)?;
    let model = target.load_model(LoadMode::Trainable, train.precision.dtype(), &device)?;
    let mut data = Dataset::new(docs, train.batching)?;
    let trainer =
        Trainer { run_dir: run_dir.to_owned(), base: target.dir.clone(), model: &model, config: train.clone() };
    trainer.run(&mut data, resume, stop_at, progress)
}

/// One run of one config: its record is written to `out`/run.json, stages go to `cache`.
pub struct Run<'c> {
    pub config: &'c Config,
    /// The config text as run (after overrides), recorded.
    pub text: String,
    pub cache: PathBuf,
    pub out: PathBuf,
    pub git_revision: String,
}

impl Run<'_> {
    /// Loads the config's plugins, validates it, and runs it.
    pub fn execute(&self, registry: &mut Registry, events: &mut dyn FnMut(Event)) -> Result<RunRecord> {
        self.config.load_plugins(registry)?;
        let registry = &*registry;
        let checked = validate(self.config, registry)?;
        self.execute_checked(registry, &checked, events)
    }

    /// Runs the config, `checked` being what [`validate`] made of it.
    pub fn execute_checked(
        &self,
        registry: &Registry,
        checked: &Checked,
        events: &mut dyn FnMut(Event),
    ) -> Result<RunRecord> {
        let mut record = RunRecord {
            fusellm_version: env!("CARGO_PKG_VERSION").into(),
            git_revision: self.git_revision.clone(),
            config: self.text.clone(),
            plugins: plugins(registry, checked),
            stages: Vec::new(),
            checkpoint: None,
            eval: Vec::new(),
        };
        std::fs::create_dir_all(&self.out).context(|| format!("creating {}", self.out.display()))?;
        let (corpus, split_key) = self.split(checked, &mut record, events)?;
        let docs = match &checked.fusion {
            Some(fusion) => {
                let (dir, k) = self.fuse_stages(checked, fusion, &corpus, &split_key, &mut record, events)?;
                (fused_documents(&dir)?.1, k)
            }
            None => {
                let texts = read_texts(&corpus)?;
                let docs = texts
                    .iter()
                    .map(|t| Ok(Document { ids: checked.target.tokenizer.encode(t)?, rows: None }))
                    .collect::<Result<Vec<_>>>()?;
                (docs, key(&["clm", &split_key, &model_identity(&checked.target)?]))
            }
        };
        if let Some(checkpoint) = self.train(checked, docs, &mut record, events)? {
            record.checkpoint = Some(checkpoint.display().to_string());
            self.evaluate(registry, checked, &checkpoint, &mut record, events)?;
        }
        write_atomically(&self.out.join("run.json"), &serde_json::to_vec_pretty(&record).expect("JSON"))?;
        write_atomically(&self.out.join("config.toml"), self.text.as_bytes())?;
        Ok(record)
    }

    fn device(&self) -> Result<Device> {
        crate::device::parse(&self.config.run.device)
    }

    /// Runs `work` into the cache folder `name-key` unless `done` says it is complete there.
    fn stage(
        &self,
        record: &mut RunRecord,
        events: &mut dyn FnMut(Event),
        (name, key): (&str, &str),
        done: impl Fn(&Path) -> bool,
        work: impl FnOnce(&Path, &mut dyn FnMut(Event)) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self.cache.join(format!("{name}-{key}"));
        let reused = done(&dir);
        events(Event::Stage { name, reused });
        let start = Instant::now();
        if !reused {
            std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
            work(&dir, events).context(|| format!("stage {name}"))?;
        }
        record.stages.push(StageRecord {
            name: name.into(),
            key: key.into(),
            output: dir.display().to_string(),
            reused,
            seconds: start.elapsed().as_secs_f64(),
        });
        Ok(dir)
    }

    /// The split corpus, and the hash of its content as the key of the stages after it.
    fn split(
        &self,
        checked: &Checked,
        record: &mut RunRecord,
        events: &mut dyn FnMut(Event),
    ) -> Result<(PathBuf, String)> {
        let data = self.config.data.as_ref().expect("validated");
        let mut parts: Vec<String> = data.corpus.iter().map(|c| file_sha256(&c.path)).collect::<Result<_>>()?;
        parts.extend(data.text_fields.iter().cloned());
        parts.push(format!("{} {} {:?}", data.max_len, data.margin, data.on_bad));
        for c in std::iter::once(&checked.target).chain(&checked.sources) {
            parts.push(file_sha256(&c.dir.join("tokenizer.json"))?);
        }
        let split_key = key(&parts);
        let dir = self.stage(
            record,
            events,
            ("split", &split_key),
            |d| d.join("pieces.jsonl").exists(),
            |dir, _| {
                let tokenizers: Vec<_> =
                    std::iter::once(&checked.target).chain(&checked.sources).map(|c| c.tokenizer.clone()).collect();
                let splitter = Splitter { tokenizers: &tokenizers, max_len: data.max_len, margin: data.margin };
                let corpus: Vec<PathBuf> = data.corpus.iter().map(|c| c.path.clone()).collect();
                split_corpus(&corpus, &data.text_fields, &splitter, data.on_bad, &dir.join("pieces.jsonl")).map(|_| ())
            },
        )?;
        // Later stages depend on the pieces, not on how they were made: runs whose split
        // settings differ but cut the corpus alike (another set of sources whose tokenizers
        // need no extra cut) share their forward passes.
        let pieces = dir.join("pieces.jsonl");
        let content = file_sha256(&pieces)?;
        Ok((pieces, content))
    }

    /// Precompute, align and fuse: the fused store and its key.
    fn fuse_stages(
        &self,
        checked: &Checked,
        fusion: &Configured<'_>,
        corpus: &Path,
        split_key: &str,
        record: &mut RunRecord,
        events: &mut dyn FnMut(Event),
    ) -> Result<(PathBuf, String)> {
        let options = self.config.precompute;
        let store = |record: &mut RunRecord,
                     events: &mut dyn FnMut(Event),
                     name: &str,
                     checkpoint: &Checkpoint|
         -> Result<(PathBuf, String)> {
            let k = key(&[split_key, &model_identity(checkpoint)?, &serde_json::to_string(&options).expect("JSON")]);
            let out = self.stage(
                record,
                events,
                (&format!("precompute-{name}"), &k),
                |d| verify(d).is_ok_and(|v| v.missing.is_empty() && v.corrupt.is_empty()),
                |out, events| {
                    let start = Instant::now();
                    precompute_model(checkpoint, &self.device()?, corpus, out, options, (0, 1), |p| {
                        events(Event::of_precompute(&p, start.elapsed().as_secs_f64()));
                    })
                    .map(|_| ())
                },
            )?;
            Ok((out, k))
        };
        let target_name = self.config.target.as_ref().expect("validated").name.clone();
        let (target_store, target_key) = store(record, events, &target_name, &checked.target)?;
        let (sequence, vocab) = (&checked.sequence, &checked.vocab);
        // The version names the alignment code's behaviour: a change that alters aligned
        // stores bumps it, so that cached ones are not reused.
        let align_id = format!("align/2 {} {} compat={}", sequence.id(), vocab.id(), self.config.align.compat);
        let mut aligned = Vec::new();
        let mut aligned_keys = vec![target_key.clone()];
        for (source, checkpoint) in self.config.sources.iter().zip(&checked.sources) {
            let (source_store, source_key) = store(record, events, &source.name, checkpoint)?;
            let k = key(&[&source_key, &target_key, &align_id]);
            let dir = self.stage(
                record,
                events,
                (&format!("align-{}", source.name), &k),
                |d| d.join("report.json").exists(),
                |out, _| {
                    align_stores(
                        Stored { dir: &source_store, checkpoint },
                        Stored { dir: &target_store, checkpoint: &checked.target },
                        out,
                        (sequence, vocab),
                        self.config.align.compat,
                        default_cache_dir().as_deref(),
                    )
                    .map(|_| ())
                },
            )?;
            aligned.push(dir);
            aligned_keys.push(k);
        }
        aligned_keys.push(fusion.id());
        let k = key(&aligned_keys);
        let dir = self.stage(
            record,
            events,
            ("fuse", &k),
            |d| d.join("fused.json").exists(),
            |out, _| {
                let target = Stored { dir: &target_store, checkpoint: &checked.target };
                fuse_stores(target, &aligned, fusion, out).map(|_| ())
            },
        )?;
        Ok((dir, k))
    }

    /// Trains the target when the config has [train]; resumes an interrupted training.
    fn train(
        &self,
        checked: &Checked,
        (docs, data_key): (Vec<Document>, String),
        record: &mut RunRecord,
        events: &mut dyn FnMut(Event),
    ) -> Result<Option<PathBuf>> {
        let Some(config) = &self.config.train else { return Ok(None) };
        let k = key(&[&data_key, &model_identity(&checked.target)?, &serde_json::to_string(config).expect("JSON")]);
        let finished = |d: &Path| latest_checkpoint(d).is_some_and(|(step, _)| step >= config.steps);
        let dir = self.stage(record, events, ("train", &k), finished, |run_dir, events| {
            let resume = latest_checkpoint(run_dir).is_some();
            let progress = |p: crate::train::Progress| events(p.into());
            train_target(self.config, &checked.target, docs, run_dir, (resume, None), progress).map(|_| ())
        })?;
        Ok(latest_checkpoint(&dir).map(|(_, d)| d))
    }

    /// Scores the target before and after training on every evaluation set.
    fn evaluate(
        &self,
        registry: &Registry,
        checked: &Checked,
        trained: &Path,
        record: &mut RunRecord,
        events: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let Some(eval) = &self.config.eval else { return Ok(()) };
        let mut parts = vec![
            trained.display().to_string(),
            model_identity(&checked.target)?,
            format!("{} {}", eval.window, eval.batch_tokens),
        ];
        for (name, file) in &eval.sets {
            parts.push(format!("{name}={}", file_sha256(&file.path)?));
        }
        let k = key(&parts);
        let dir = self.stage(
            record,
            events,
            ("eval", &k),
            |d| d.join("eval.json").exists(),
            |out, events| {
                let fields = &self.config.data.as_ref().expect("validated").text_fields;
                let sets = eval
                    .sets
                    .iter()
                    .map(|(set, file)| Ok((set, read_documents(&file.path, fields)?)))
                    .collect::<Result<Vec<_>>>()?;
                let mut rows = Vec::new();
                // The trained checkpoint is the target's architecture: the same adapter reads it.
                let adapter = Some(checked.target.adapter.as_str());
                for (label, dir) in [("target-base", checked.target.dir.as_path()), ("trained", trained)] {
                    let checkpoint = Checkpoint::open(dir, registry, adapter)?;
                    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &self.device()?)?;
                    let scorer = Scorer {
                        model: &model,
                        tokenizer: &checkpoint.tokenizer,
                        window: eval.window,
                        batch_tokens: eval.batch_tokens,
                    };
                    for (set, texts) in &sets {
                        let (done, total) = (rows.len() as u64, 2 * sets.len() as u64);
                        events(Event::Progress { done, total, message: format!("sets: {label} on {set}") });
                        let s = score(&scorer.text_nlls(texts)?, texts.iter().map(|t| t.len() as u64).sum());
                        rows.push(EvalRow {
                            model: label.into(),
                            set: set.to_string(),
                            score: s,
                            perplexity: s.perplexity(),
                            bits_per_byte: s.bits_per_byte(),
                        });
                    }
                }
                write_atomically(&out.join("eval.json"), &serde_json::to_vec_pretty(&rows).expect("JSON"))
            },
        )?;
        let bytes = std::fs::read(dir.join("eval.json")).context(|| format!("reading {}", dir.display()))?;
        record.eval = serde_json::from_slice(&bytes).context(|| dir.join("eval.json").display().to_string())?;
        Ok(())
    }
}

fn plugins(registry: &Registry, checked: &Checked) -> Vec<PluginRecord> {
    let entry = |role: &str, e: &Entry| PluginRecord {
        role: role.into(),
        name: e.info.name.clone(),
        version: e.info.version.clone(),
        tier: e.tier.as_str().into(),
        origin: e.origin.clone(),
    };
    let mut out =
        vec![entry("sequence aligner", checked.sequence.entry), entry("vocabulary mapper", checked.vocab.entry)];
    out.extend(checked.fusion.as_ref().map(|f| entry("fusion", f.entry)));
    for c in std::iter::once(&checked.target).chain(&checked.sources) {
        if let Ok(e) = registry.get(fusellm_sdk::PluginKind::Adapter, &c.adapter) {
            out.push(entry(&format!("adapter of {}", c.dir.display()), e));
        }
    }
    out
}
