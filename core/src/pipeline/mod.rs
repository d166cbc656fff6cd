//! `fusellm run` (DESIGN.md, "The pipeline as stages"): split -> precompute -> vocab-map
//! and align -> fuse -> train -> (merge, FuseChat's recipe) -> eval. Each stage writes into
//! a cache folder named by a hash of its inputs (the upstream stages' keys, its config
//! section, the names and versions of its plugins), so a stage whose inputs are unchanged
//! is reused: changing the fusion plugin never recomputes the sources' forward passes, and
//! a sweep's variants share every stage they have in common. An interrupted run continues
//! where it stopped.

pub mod stage;
pub mod stages;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Stored};
use crate::config::Config;
use crate::error::{Context, Result};
use crate::eval::Score;
use crate::files::manifest::{self, Check};
use crate::files::{file_sha256, write_atomically};
use crate::plugins::{default_cache_dir, Configured, Entry, Registry};
use crate::split::read_texts;
use crate::train::data::fused_documents;
use crate::train::{latest_checkpoint, Document};
use stage::Stage;
use stages::{Align, Eval, Fuse, Merge, Precompute, Split, Train};
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
        // One run at a time on a cache: a second would compute every stage again beside it.
        let _lock = crate::files::FolderLock::acquire(&self.cache)?;
        let mut stages = Stages { run: self, record: &mut record, events };
        let (corpus, split_key) = stages.split(checked)?;
        let trained = match (&checked.fusion, &self.config.merge) {
            (Some(fusion), merge) => {
                let aligned = stages.aligned(checked, &corpus, &split_key)?;
                let all: Vec<usize> = (0..checked.sources.len()).collect();
                let mut trained = Vec::new();
                if merge.as_ref().is_none_or(|m| m.all_sources) {
                    let fused = stages.fuse(&aligned, &all, fusion)?;
                    trained.extend(stages.train(checked, None, fused)?.map(|(c, _)| ("trained".to_string(), c)));
                }
                if let Some(merge) = merge {
                    let pairwise = stages.pairwise(checked, &aligned, fusion)?;
                    let merged = stages.merge(checked, merge, &pairwise)?;
                    trained.extend(pairwise.into_iter().map(|(name, c, _)| (format!("pairwise-{name}"), c)));
                    trained.push(("merged".to_string(), merged));
                }
                trained
            }
            (None, _) => {
                let texts = read_texts(&corpus)?;
                let docs = texts
                    .iter()
                    .map(|t| Ok(Document { ids: checked.target.tokenizer.encode(t)?, rows: None }))
                    .collect::<Result<Vec<_>>>()?;
                let clm = (docs, stage::key(&"clm", &[&split_key]));
                stages.train(checked, None, clm)?.map(|(c, _)| ("trained".to_string(), c)).into_iter().collect()
            }
        };
        if let Some((_, checkpoint)) = trained.last() {
            stages.record.checkpoint = Some(checkpoint.display().to_string());
            stages.evaluate(registry, checked, trained)?;
        }
        write_atomically(&self.out.join("run.json"), &serde_json::to_vec_pretty(&record).expect("JSON"))?;
        write_atomically(&self.out.join("config.toml"), self.text.as_bytes())?;
        Ok(record)
    }
}

/// The target's store and each source's store aligned to it (folder and stage key).
struct Aligned<'c> {
    target: &'c Checkpoint,
    target_store: PathBuf,
    target_key: String,
    sources: Vec<(PathBuf, String)>,
}

/// A run's stages as it goes: each into the cache, recorded, reported.
struct Stages<'a> {
    run: &'a Run<'a>,
    record: &'a mut RunRecord,
    events: &'a mut dyn FnMut(Event),
}

impl Stages<'_> {
    fn device(&self) -> Result<Device> {
        crate::device::parse(&self.run.config.run.device)
    }

    /// Runs `stage` into the cache folder `name-key`, its key made of its input and the keys
    /// of the stages it reads (`upstream`), unless that folder holds its finished output.
    fn stage<S: Stage>(&mut self, label: Option<&str>, upstream: &[&str], stage: S) -> Result<(PathBuf, String)> {
        let name = match label {
            Some(label) => format!("{}-{label}", S::NAME),
            None => S::NAME.to_string(),
        };
        let key = stage::key(&stage.input()?, upstream);
        let dir = self.run.cache.join(format!("{name}-{key}"));
        // Finished, and every file as it was written.
        let check = match stage.done(&dir) {
            true => manifest::check_manifest(&dir)?,
            false => Check::Unlisted,
        };
        if let Check::Damaged(files) = &check {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            tracing::warn!("{}: {} changed since written; computing again", dir.display(), names.join(", "));
            stage.repair(&dir, files).context(|| format!("stage {name}"))?;
        }
        let reused = check == Check::Sound;
        (self.events)(Event::Stage { name: &name, reused });
        let start = Instant::now();
        if !reused {
            stage.complete(&dir, &mut *self.events).context(|| format!("stage {name}"))?;
        }
        self.record.stages.push(StageRecord {
            name,
            key: key.clone(),
            output: dir.display().to_string(),
            reused,
            seconds: start.elapsed().as_secs_f64(),
        });
        Ok((dir, key))
    }

    /// The split corpus, and the hash of its content as the key of the stages after it.
    fn split(&mut self, checked: &Checked) -> Result<(PathBuf, String)> {
        let data = self.run.config.data.as_ref().expect("validated");
        let models = || std::iter::once(&checked.target).chain(&checked.sources);
        let corpus: Vec<PathBuf> = data.corpus.iter().map(|c| c.path.clone()).collect();
        let split = Split {
            corpus: &corpus,
            text_fields: &data.text_fields,
            max_len: data.max_len,
            margin: data.margin,
            on_bad: data.on_bad,
            tokenizers: models().map(|c| c.tokenizer.clone()).collect(),
            tokenizer_files: models().map(|c| c.dir.join("tokenizer.json")).collect(),
        };
        let (dir, _) = self.stage(None, &[], split)?;
        // Later stages depend on the pieces, not on how they were made: runs whose split
        // settings differ but cut the corpus alike (another set of sources whose tokenizers
        // need no extra cut) share their forward passes.
        let pieces = dir.join("pieces.jsonl");
        let content = file_sha256(&pieces)?;
        Ok((pieces, content))
    }

    /// Precompute and align: the target's store, and each source's aligned to it.
    fn aligned<'s>(&mut self, checked: &'s Checked, corpus: &Path, split_key: &str) -> Result<Aligned<'s>> {
        let config = self.run.config;
        let device = self.device()?;
        let store = |stages: &mut Self, name: &str, checkpoint: &Checkpoint| {
            let options = config.precompute;
            let worker = (0, 1);
            let precompute =
                Precompute { checkpoint, corpus, options, device: &device, dtype: config.run.dtype, worker };
            stages.stage(Some(name), &[split_key], precompute)
        };
        let target_name = &config.target.as_ref().expect("validated").name;
        let (target_store, target_key) = store(self, target_name, &checked.target)?;
        let cache = default_cache_dir();
        let mut sources = Vec::new();
        for (source, checkpoint) in config.sources.iter().zip(&checked.sources) {
            let (source_store, source_key) = store(self, &source.name, checkpoint)?;
            let align = Align {
                source: Stored { dir: &source_store, checkpoint },
                target: Stored { dir: &target_store, checkpoint: &checked.target },
                sequence: &checked.sequence,
                vocab: &checked.vocab,
                compat: config.align.compat,
                cache: cache.as_deref(),
            };
            sources.push(self.stage(Some(&source.name), &[&source_key, &target_key], align)?);
        }
        Ok(Aligned { target: &checked.target, target_store, target_key, sources })
    }

    /// The fusion of the sources `which` (indices into the config's sources): the fused
    /// documents and the fused store's key.
    fn fuse(&mut self, aligned: &Aligned, which: &[usize], fusion: &Configured<'_>) -> Result<(Vec<Document>, String)> {
        let target = Stored { dir: &aligned.target_store, checkpoint: aligned.target };
        let dirs: Vec<PathBuf> = which.iter().map(|&i| aligned.sources[i].0.clone()).collect();
        let upstream: Vec<&str> = std::iter::once(aligned.target_key.as_str())
            .chain(which.iter().map(|&i| aligned.sources[i].1.as_str()))
            .collect();
        let (dir, key) = self.stage(None, &upstream, Fuse { target, aligned: &dirs, fusion })?;
        Ok((fused_documents(&dir)?.1, key))
    }

    /// FuseChat's pairwise fusion: the target fused with each source alone and trained on
    /// it, one checkpoint per source (its name, the checkpoint, the training's key).
    fn pairwise(
        &mut self,
        checked: &Checked,
        aligned: &Aligned,
        fusion: &Configured<'_>,
    ) -> Result<Vec<(String, PathBuf, String)>> {
        let config = self.run.config;
        // With one source, its pairwise fusion is the all-sources one: the same folder.
        let alone = config.sources.len() == 1;
        let mut out = Vec::new();
        for (i, source) in config.sources.iter().enumerate() {
            let fused = self.fuse(aligned, &[i], fusion)?;
            let label = (!alone).then_some(source.name.as_str());
            let (checkpoint, key) = self.train(checked, label, fused)?.expect("validated: [merge] has [train]");
            out.push((source.name.clone(), checkpoint, key));
        }
        Ok(out)
    }

    /// Trains the target when the config has [train] (resuming an interrupted training):
    /// the last checkpoint and the stage's key.
    fn train(
        &mut self,
        checked: &Checked,
        label: Option<&str>,
        (docs, data_key): (Vec<Document>, String),
    ) -> Result<Option<(PathBuf, String)>> {
        if self.run.config.train.is_none() {
            return Ok(None);
        }
        let (target, comm) = (&checked.target, &fusellm_dist::Single);
        let train = Train { config: self.run.config, target, docs, resume: None, stop_at: None, comm };
        let (dir, key) = self.stage(label, &[&data_key], train)?;
        Ok(latest_checkpoint(&dir).map(|(_, d)| (d, key)))
    }

    /// The pairwise targets merged as `[merge]` says: the merged checkpoint.
    fn merge(
        &mut self,
        checked: &Checked,
        section: &crate::config::MergeSection,
        pairwise: &[(String, PathBuf, String)],
    ) -> Result<PathBuf> {
        // What was merged is named by the trainings' keys.
        let upstream: Vec<&str> = pairwise.iter().map(|(_, _, key)| key.as_str()).collect();
        let models = pairwise.iter().map(|(name, dir, _)| (name.clone(), dir.clone())).collect();
        let (dir, _) = self.stage(None, &upstream, Merge { target: &checked.target, section, pairwise: models })?;
        Ok(dir.join("model"))
    }

    /// Scores the target before training, and the models made from it, on every evaluation
    /// set.
    fn evaluate(&mut self, registry: &Registry, checked: &Checked, models: Vec<(String, PathBuf)>) -> Result<()> {
        let config = self.run.config;
        let Some(eval) = &config.eval else { return Ok(()) };
        let device = self.device()?;
        let stage = Eval {
            registry,
            target: &checked.target,
            models,
            eval,
            text_fields: &config.data.as_ref().expect("validated").text_fields,
            device: &device,
            dtype: config.run.dtype,
        };
        let (dir, _) = self.stage(None, &[], stage)?;
        self.record.eval = stages::eval_rows(&dir)?;
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
