//! The stages of DESIGN.md, each a [`Stage`]: split, precompute, align, fuse, train, merge,
//! eval.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::stage::{ModelId, PluginId, Stage};
use super::{EvalRow, Event};
use crate::align::stage::{align_stores, Report};
use crate::checkpoint::{Checkpoint, Stored};
use crate::config::{Config, EvalSection};
use crate::error::{Context, Result};
use crate::eval::{score, Scorer};
use crate::files::{file_sha256, write_atomically};
use crate::fuse::{fuse_stores, FusedManifest};
use crate::model::LoadMode;
use crate::plugins::{Configured, Registry};
use crate::precompute::precompute_model;
use crate::split::{read_documents, split_corpus, OnBadInput, SplitSummary, Splitter};
use crate::store::{verify, Options, RunSummary};
use crate::tokenizer::Tokenizer;
use crate::train::{latest_checkpoint, Dataset, Document, Precision, Trainer};

/// The corpus cut into pieces that fit every model's context: `pieces.jsonl`.
pub struct Split<'a> {
    pub corpus: &'a [PathBuf],
    pub text_fields: &'a [String],
    pub max_len: usize,
    pub margin: usize,
    pub on_bad: OnBadInput,
    /// Every model's tokenizer, and the files they were read from.
    pub tokenizers: Vec<Tokenizer>,
    pub tokenizer_files: Vec<PathBuf>,
}

#[derive(Serialize)]
pub struct SplitInput<'a> {
    corpus_sha256: Vec<String>,
    text_fields: &'a [String],
    max_len: usize,
    margin: usize,
    skip_bad: bool,
    tokenizers_sha256: Vec<String>,
}

impl<'a> Stage for Split<'a> {
    const NAME: &'static str = "split";
    type Input = SplitInput<'a>;
    type Output = SplitSummary;

    fn input(&self) -> Result<SplitInput<'a>> {
        let hashes = |files: &[PathBuf]| files.iter().map(|f| Ok(file_sha256(f)?)).collect::<Result<Vec<_>>>();
        Ok(SplitInput {
            corpus_sha256: hashes(self.corpus)?,
            text_fields: self.text_fields,
            max_len: self.max_len,
            margin: self.margin,
            skip_bad: self.on_bad == OnBadInput::Skip,
            tokenizers_sha256: hashes(&self.tokenizer_files)?,
        })
    }

    fn done(&self, out: &Path) -> bool {
        out.join("pieces.jsonl").exists()
    }

    fn run(self, out: &Path, _: &mut dyn FnMut(Event)) -> Result<SplitSummary> {
        self.write(&out.join("pieces.jsonl"))
    }
}

impl Split<'_> {
    /// The pieces written to the file `pieces` (`fusellm split --out`).
    pub fn write(self, pieces: &Path) -> Result<SplitSummary> {
        let splitter = Splitter { tokenizers: &self.tokenizers, max_len: self.max_len, margin: self.margin };
        split_corpus(self.corpus, self.text_fields, &splitter, self.on_bad, pieces)
    }
}

/// One model's forward passes over the pieces: its store.
pub struct Precompute<'a> {
    pub checkpoint: &'a Checkpoint,
    pub corpus: &'a Path,
    pub options: Options,
    pub device: &'a Device,
    pub dtype: Precision,
    /// This worker's slice `(i, N)` of the shards: who computes, not what.
    pub worker: (usize, usize),
}

#[derive(Serialize)]
pub struct PrecomputeInput {
    model: ModelId,
    options: Options,
    dtype: Precision,
}

impl Stage for Precompute<'_> {
    const NAME: &'static str = "precompute";
    type Input = PrecomputeInput;
    type Output = RunSummary;

    fn input(&self) -> Result<PrecomputeInput> {
        Ok(PrecomputeInput { model: ModelId::of(self.checkpoint)?, options: self.options, dtype: self.dtype })
    }

    fn done(&self, out: &Path) -> bool {
        verify(out).is_ok_and(|v| v.missing.is_empty() && v.corrupt.is_empty())
    }

    fn run(self, out: &Path, events: &mut dyn FnMut(Event)) -> Result<RunSummary> {
        let start = Instant::now();
        let progress = |p: crate::store::Progress| events(Event::of_precompute(&p, start.elapsed().as_secs_f64()));
        let (corpus, options, worker) = (self.corpus, self.options, self.worker);
        let on = (self.device, self.dtype.dtype());
        precompute_model(self.checkpoint, on, corpus, out, options, worker, progress)
    }
}

/// A source's store aligned to the target's tokens and vocabulary.
pub struct Align<'a> {
    pub source: Stored<'a>,
    pub target: Stored<'a>,
    pub sequence: &'a Configured<'a>,
    pub vocab: &'a Configured<'a>,
    pub compat: bool,
    /// Where vocabulary maps are kept between runs.
    pub cache: Option<&'a Path>,
}

#[derive(Serialize)]
pub struct AlignInput {
    sequence: PluginId,
    vocab: PluginId,
    compat: bool,
}

impl Stage for Align<'_> {
    const NAME: &'static str = "align";
    type Input = AlignInput;
    type Output = Report;

    fn input(&self) -> Result<AlignInput> {
        Ok(AlignInput { sequence: self.sequence.into(), vocab: self.vocab.into(), compat: self.compat })
    }

    fn done(&self, out: &Path) -> bool {
        out.join("report.json").exists()
    }

    fn run(self, out: &Path, _: &mut dyn FnMut(Event)) -> Result<Report> {
        align_stores(self.source, self.target, out, (self.sequence, self.vocab), self.compat, self.cache)
    }
}

/// The aligned stores fused into one target distribution per position.
pub struct Fuse<'a> {
    pub target: Stored<'a>,
    pub aligned: &'a [PathBuf],
    pub fusion: &'a Configured<'a>,
}

impl Stage for Fuse<'_> {
    const NAME: &'static str = "fuse";
    type Input = PluginId;
    type Output = FusedManifest;

    fn input(&self) -> Result<PluginId> {
        Ok(self.fusion.into())
    }

    fn done(&self, out: &Path) -> bool {
        out.join("fused.json").exists()
    }

    fn run(self, out: &Path, _: &mut dyn FnMut(Event)) -> Result<FusedManifest> {
        fuse_stores(self.target, self.aligned, self.fusion, out)
    }
}

/// The target trained on documents as the config's `[train]` says, in its dtype on
/// `[run] device`: checkpoints, metrics.jsonl and loss.png in the run folder.
pub struct Train<'a> {
    pub config: &'a Config,
    pub target: &'a Checkpoint,
    pub docs: Vec<Document>,
    /// Whether to continue from the folder's latest checkpoint; `None`: if it has one.
    pub resume: Option<bool>,
    /// Stop (with a checkpoint) after this step.
    pub stop_at: Option<u64>,
    /// The ranks training together (`fusellm_dist::Single` for one process).
    pub comm: &'a dyn fusellm_dist::Communicator,
}

#[derive(Serialize)]
pub struct TrainInput<'a> {
    target: ModelId,
    train: &'a crate::train::TrainConfig,
}

impl<'a> Train<'a> {
    fn train(&self) -> Result<&'a crate::train::TrainConfig> {
        Ok(self.config.train.as_ref().ok_or_else(|| self.config.error_at("train", "needs a [train] section"))?)
    }
}

impl<'a> Stage for Train<'a> {
    const NAME: &'static str = "train";
    type Input = TrainInput<'a>;
    type Output = crate::train::Summary;

    fn input(&self) -> Result<TrainInput<'a>> {
        Ok(TrainInput { target: ModelId::of(self.target)?, train: self.train()? })
    }

    fn done(&self, out: &Path) -> bool {
        let steps = self.train().map_or(u64::MAX, |t| t.steps);
        latest_checkpoint(out).is_some_and(|(step, _)| step >= steps)
    }

    /// A damaged checkpoint is removed whole (training resumes from the one before, to the
    /// same weights); damaged metrics or plots, which no checkpoint restores, start the run
    /// over.
    fn repair(&self, out: &Path, damaged: &[std::path::PathBuf]) -> Result<()> {
        let checkpoint = |f: &std::path::PathBuf| {
            let mut parts = f.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
            match (parts.next(), parts.next()) {
                (Some(top), Some(step)) if top == "checkpoints" && step.starts_with("step-") => {
                    Some(out.join(top).join(step))
                }
                _ => None,
            }
        };
        let dirs: Option<Vec<std::path::PathBuf>> = damaged.iter().map(checkpoint).collect();
        let remove = dirs.unwrap_or_else(|| vec![out.to_owned()]);
        for dir in remove {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).context(|| format!("removing the damaged {}", dir.display()))?;
            }
        }
        Ok(())
    }

    fn run(self, out: &Path, events: &mut dyn FnMut(Event)) -> Result<crate::train::Summary> {
        let train = self.train()?;
        let (local_rank, ranks) = (self.comm.local_rank(), self.comm.world());
        let device = crate::device::parse(&crate::device::for_rank(&self.config.run.device, local_rank, ranks))?;
        let dtype = train.precision.dtype();
        let model = match &train.lora {
            Some(lora) => self.target.load_adapted(&lora.adapter, train.batching.seed, dtype, &device)?,
            None => self.target.load_model(LoadMode::Trainable, dtype, &device)?,
        };
        let mut data = Dataset::new(self.docs, train.batching)?;
        let base = self.target.dir.clone();
        let trainer = Trainer { run_dir: out.to_owned(), base, model: &model, config: train.clone(), comm: self.comm };
        let resume = self.resume.unwrap_or_else(|| latest_checkpoint(out).is_some());
        trainer.run(&mut data, resume, self.stop_at, |p| events(p.into()))
    }
}

/// The trained targets of FuseChat's pairwise fusion merged against the untrained target:
/// `model/`, a checkpoint with the target's config and tokenizer.
pub struct Merge<'a> {
    pub target: &'a Checkpoint,
    pub section: &'a crate::config::MergeSection,
    /// `(source name, trained checkpoint)`, in the sources' order.
    pub pairwise: Vec<(String, PathBuf)>,
}

#[derive(Serialize)]
pub struct MergeInput<'a> {
    target: ModelId,
    method: &'static str,
    parameters: &'a std::collections::BTreeMap<String, crate::merge::Setting>,
    models: &'a std::collections::BTreeMap<String, std::collections::BTreeMap<String, crate::merge::Setting>>,
    dtype: Option<String>,
    sources: Vec<String>,
}

impl<'a> Stage for Merge<'a> {
    const NAME: &'static str = "merge";
    type Input = MergeInput<'a>;
    type Output = PathBuf;

    fn input(&self) -> Result<MergeInput<'a>> {
        Ok(MergeInput {
            target: ModelId::of(self.target)?,
            method: self.section.method.name(),
            parameters: &self.section.params,
            models: &self.section.models,
            dtype: self.section.dtype.map(|d| format!("{d:?}")),
            sources: self.pairwise.iter().map(|(name, _)| name.clone()).collect(),
        })
    }

    fn done(&self, out: &Path) -> bool {
        out.join("model").join("model.safetensors").exists()
    }

    fn run(self, out: &Path, _: &mut dyn FnMut(Event)) -> Result<PathBuf> {
        let dir = out.join("model");
        self.section.plan(&self.target.dir, &self.pairwise).write(&dir)?;
        Ok(dir)
    }
}

/// The target before training and the models a run made from it (`(label, checkpoint)`)
/// scored on every evaluation set: `eval.json`.
pub struct Eval<'a> {
    pub registry: &'a Registry,
    pub target: &'a Checkpoint,
    pub models: Vec<(String, PathBuf)>,
    pub eval: &'a EvalSection,
    pub text_fields: &'a [String],
    pub device: &'a Device,
    pub dtype: Precision,
}

#[derive(Serialize)]
pub struct EvalInput {
    target: ModelId,
    models: Vec<(String, PathBuf)>,
    window: usize,
    batch_tokens: usize,
    sets_sha256: Vec<(String, String)>,
    dtype: Precision,
}

impl Stage for Eval<'_> {
    const NAME: &'static str = "eval";
    type Input = EvalInput;
    type Output = Vec<EvalRow>;

    fn input(&self) -> Result<EvalInput> {
        let sets = self.eval.sets.iter().map(|(name, file)| Ok((name.clone(), file_sha256(&file.path)?)));
        Ok(EvalInput {
            target: ModelId::of(self.target)?,
            models: self.models.clone(),
            window: self.eval.window,
            batch_tokens: self.eval.batch_tokens,
            sets_sha256: sets.collect::<Result<_>>()?,
            dtype: self.dtype,
        })
    }

    fn done(&self, out: &Path) -> bool {
        out.join("eval.json").exists()
    }

    fn run(self, out: &Path, events: &mut dyn FnMut(Event)) -> Result<Vec<EvalRow>> {
        let sets = self
            .eval
            .sets
            .iter()
            .map(|(set, file)| Ok((set, read_documents(&file.path, self.text_fields)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut rows = Vec::new();
        // Every model is the target's architecture: the same adapter reads it.
        let adapter = Some(self.target.adapter.as_str());
        let models = std::iter::once(("target-base", self.target.dir.as_path()))
            .chain(self.models.iter().map(|(label, dir)| (label.as_str(), dir.as_path())));
        let total = ((1 + self.models.len()) * sets.len()) as u64;
        for (label, dir) in models {
            let checkpoint = Checkpoint::open(dir, self.registry, adapter)?;
            let model = checkpoint.load_model(LoadMode::Frozen, self.dtype.dtype(), self.device)?;
            let (window, batch_tokens) = (self.eval.window, self.eval.batch_tokens);
            let scorer = Scorer { model: &model, tokenizer: &checkpoint.tokenizer, window, batch_tokens };
            for (set, texts) in &sets {
                events(Event::Progress { done: rows.len() as u64, total, message: format!("sets: {label} on {set}") });
                let s = score(&scorer.text_nlls(texts)?, texts.iter().map(|t| t.len() as u64).sum())
                    .context(|| format!("{label} on {set}"))?;
                rows.push(EvalRow {
                    model: label.into(),
                    set: set.to_string(),
                    score: s,
                    perplexity: s.perplexity(),
                    bits_per_byte: s.bits_per_byte(),
                });
            }
        }
        write_atomically(&out.join("eval.json"), &serde_json::to_vec_pretty(&rows).expect("JSON"))?;
        Ok(rows)
    }
}

/// The rows of a finished eval stage.
pub fn eval_rows(out: &Path) -> Result<Vec<EvalRow>> {
    let file = out.join("eval.json");
    let bytes = std::fs::read(&file).context(|| format!("reading {}", file.display()))?;
    serde_json::from_slice(&bytes).context(|| file.display().to_string())
}
