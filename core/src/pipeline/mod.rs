//! `fusellm run` (DESIGN.md, "The pipeline as stages"): split -> precompute -> vocab-map
//! and align -> fuse -> train -> eval. Each stage writes into a cache folder named by a
//! hash of its inputs (the upstream stages' keys, its config section, the names and
//! versions of its plugins), so a stage whose inputs are unchanged is reused: changing the
//! fusion plugin never recomputes the sources' forward passes, and a sweep's variants share
//! every stage they have in common. An interrupted run continues where it stopped.

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
use stages::{Align, Eval, Fuse, Precompute, Split, Train};
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
        let docs = match &checked.fusion {
            Some(fusion) => {
                let (dir, k) = stages.fuse(checked, fusion, &corpus, &split_key)?;
                (fused_documents(&dir)?.1, k)
            }
            None => {
                let texts = read_texts(&corpus)?;
                let docs = texts
                    .iter()
                    .map(|t| Ok(Document { ids: checked.target.tokenizer.encode(t)?, rows: None }))
                    .collect::<Result<Vec<_>>>()?;
                (docs, stage::key(&"clm", &[&split_key]))
            }
        };
        if let Some(checkpoint) = stages.train(checked, docs)? {
            stages.record.checkpoint = Some(checkpoint.display().to_string());
            stages.evaluate(registry, checked, &checkpoint)?;
        }
        write_atomically(&self.out.join("run.json"), &serde_json::to_vec_pretty(&record).expect("JSON"))?;
        write_atomically(&self.out.join("config.toml"), self.text.as_bytes())?;
        Ok(record)
    }
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

    /// Precompute, align and fuse: the fused store and its key.
    fn fuse(
        &mut self,
        checked: &Checked,
        fusion: &Configured<'_>,
        corpus: &Path,
        split_key: &str,
    ) -> Result<(PathBuf, String)> {
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
        let target = Stored { dir: &target_store, checkpoint: &checked.target };
        let (mut aligned, mut aligned_keys) = (Vec::new(), vec![target_key.clone()]);
        let cache = default_cache_dir();
        for (source, checkpoint) in config.sources.iter().zip(&checked.sources) {
            let (source_store, source_key) = store(self, &source.name, checkpoint)?;
            let align = Align {
                source: Stored { dir: &source_store, checkpoint },
                target,
                sequence: &checked.sequence,
                vocab: &checked.vocab,
                compat: config.align.compat,
                cache: cache.as_deref(),
            };
            let (dir, k) = self.stage(Some(&source.name), &[&source_key, &target_key], align)?;
            aligned.push(dir);
            aligned_keys.push(k);
        }
        let upstream: Vec<&str> = aligned_keys.iter().map(String::as_str).collect();
        self.stage(None, &upstream, Fuse { target, aligned: &aligned, fusion })
    }

    /// Trains the target when the config has [train]; resumes an interrupted training.
    fn train(&mut self, checked: &Checked, (docs, data_key): (Vec<Document>, String)) -> Result<Option<PathBuf>> {
        if self.run.config.train.is_none() {
            return Ok(None);
        }
        let (target, comm) = (&checked.target, &fusellm_dist::Single);
        let train = Train { config: self.run.config, target, docs, resume: None, stop_at: None, comm };
        let (dir, _) = self.stage(None, &[&data_key], train)?;
        Ok(latest_checkpoint(&dir).map(|(_, d)| d))
    }

    /// Scores the target before and after training on every evaluation set.
    fn evaluate(&mut self, registry: &Registry, checked: &Checked, trained: &Path) -> Result<()> {
        let config = self.run.config;
        let Some(eval) = &config.eval else { return Ok(()) };
        let device = self.device()?;
        let stage = Eval {
            registry,
            target: &checked.target,
            trained,
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
