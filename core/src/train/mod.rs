//! The training loop (DESIGN.md step 6): the target model continually trained on
//! `lambda * CLM + (1 - lambda) * fusion`, with our own AdamW, clipping by global norm,
//! warmup and decay, gradient accumulation, checkpoints in the Hugging Face layout plus a
//! training state, exact resume, and a stop with the step and the parameter at the first
//! NaN or Inf.

pub mod data;
pub mod memory;
mod metrics;
pub mod optim;
mod parallel;
pub mod schedule;
mod state;

use std::path::{Path, PathBuf};
use std::time::Instant;

use fusellm_dist::Communicator;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::LoraSpec;
use crate::model::loss::{Divergence, Objective, Tail};
use crate::model::Transformer;
pub use data::{Batching, Dataset, Document};
pub use metrics::StepMetrics;
use optim::{grad_norm, AdamWConfig};
pub use parallel::all_reduce_grads;
use parallel::RankOptimizer;
use schedule::{LambdaSchedule, LrSchedule};
pub use state::{copy_carried, latest_checkpoint, TrainState, CARRIED};

/// The dtype the target computes in. Below f32 the optimizer keeps f32 master weights and
/// f32 state (bf16 is for CUDA; candle's CPU matmul has no bf16 kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    /// As configs and the command line write it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| format!("`{s}`: expected f32, bf16 or f16"))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that decides what training computes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps in all.
    pub steps: u64,
    pub batching: Batching,
    /// Micro-batches per optimizer step.
    pub accumulation: u64,
    pub lr: LrSchedule,
    pub lambda: LambdaSchedule,
    pub divergence: Divergence,
    /// Left out of the record (and of the training stage's key) at its default.
    #[serde(default, skip_serializing_if = "Tail::is_renormalize")]
    pub tail: Tail,
    pub temperature: f64,
    pub adamw: AdamWConfig,
    pub precision: Precision,
    /// Clip the gradient to this global L2 norm (the paper: 1.0).
    pub clip: Option<f64>,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are removed once a newer one is complete.
    pub keep_checkpoints: usize,
    /// The ZeRO stage: 0, every rank keeps the whole optimizer state; 1, each rank keeps
    /// the AdamW moments and master weights of its shard of the parameters. The updates are
    /// the same either way, so the stage is neither in the train stage's key nor in the
    /// resume check: a run resumes under another stage or another number of ranks.
    #[serde(skip)]
    pub zero: u8,
    /// Recompute each block's activations in the backward instead of keeping them (the
    /// same gradients; like `zero`, outside the key and the resume check).
    #[serde(skip)]
    pub checkpoint_activations: bool,
    /// Train LoRA adapters instead of the whole target (absent from the key of a run
    /// without them, so that such runs keep theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTraining>,
}

/// `[train.lora]`: the adapters to train, and whether the last checkpoint also holds the
/// target with them merged in (a full Hugging Face checkpoint, in its `merged/` folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraTraining {
    #[serde(flatten)]
    pub adapter: LoraSpec,
    pub merge: bool,
}

/// What the caller sees after each step.
pub struct Progress<'a> {
    pub metrics: &'a StepMetrics,
    pub total_steps: u64,
}

impl Progress<'_> {
    /// The loss parts and the throughput of the last step.
    pub fn parts(&self) -> String {
        let m = self.metrics;
        format!("steps  loss {:.4} (clm {:.4}, fusion {:.4})  {:.0} tokens/s", m.loss, m.clm, m.fusion, m.tokens_per_s)
    }
}

/// A training run in a folder: `checkpoints/step-NNNNNNN/` (Hugging Face layout, plus the
/// training state), `metrics.jsonl` and `loss.png`. With more than one rank, every rank
/// runs a `Trainer` on its slice of the data (`train/parallel.rs`) and rank 0 alone writes.
pub struct Trainer<'a> {
    pub run_dir: PathBuf,
    /// The folder the target came from: its config.json and tokenizer files go with every
    /// checkpoint.
    pub base: PathBuf,
    pub model: &'a Transformer,
    pub config: TrainConfig,
    /// The ranks of the run (`fusellm_dist::Single` for one process).
    pub comm: &'a dyn Communicator,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub step: u64,
    pub checkpoint: PathBuf,
    pub tokens: u64,
    pub seconds: f64,
}

impl Trainer<'_> {
    /// Trains from the model's current weights, or, when `resume` and the run folder has a
    /// checkpoint, from that checkpoint's weights, optimizer state and step. Stops after
    /// `stop_at` steps when given (a checkpoint is written there).
    pub fn run(
        &self,
        data: &mut Dataset,
        resume: bool,
        stop_at: Option<u64>,
        mut progress: impl FnMut(Progress),
    ) -> Result<Summary> {
        let vars = self.model.vars();
        if vars.is_empty() {
            return Err(Error::msg("the target must be loaded trainable (LoadMode::Trainable)"));
        }
        let comm = self.comm;
        // Rank 0 writes the folder: one trainer at a time in it.
        let _lock = (comm.rank() == 0).then(|| crate::files::FolderLock::acquire(&self.run_dir)).transpose()?;
        data.set_rank(comm.rank(), comm.world());
        parallel::agree(comm, &self.config, vars, data)?;
        // Before the optimizer copies master weights from them.
        parallel::broadcast_weights(comm, vars)?;
        let mut optimizer = RankOptimizer::new(comm, vars, &self.config)?;
        let mut state = self.start(resume, &mut optimizer)?;
        parallel::same_step(comm, state.step)?;
        let lead = comm.rank() == 0;
        let mut log = lead.then(|| metrics::Log::open(&self.run_dir, state.step)).transpose()?;
        let end = stop_at.unwrap_or(self.config.steps).min(self.config.steps);
        let started = Instant::now();
        let first_tokens = state.tokens;
        let mut last = latest_checkpoint(&self.run_dir).map(|(_, dir)| dir);
        while state.step < end {
            let step = state.step + 1;
            // On a worker of rayon's pool, the step's kernels hand work to the other workers
            // directly instead of waking them from outside for each one (a tenth of a small
            // model's step went to those wake-ups).
            let mut metrics =
                rayon::scope(|_| self.step(data, &mut optimizer, step, &mut state, started, last.as_deref()))?;
            metrics.tokens_per_s = (state.tokens - first_tokens) as f64 / metrics.elapsed_s.max(1e-9);
            if let Some(log) = log.as_mut() {
                log.push(&metrics)?;
                progress(Progress { metrics: &metrics, total_steps: self.config.steps });
            }
            if step % self.config.checkpoint_every.max(1) == 0 || step == end {
                last = Some(self.checkpoint(&optimizer, &state, log.as_ref())?);
            }
        }
        let checkpoint = match last {
            Some(dir) => dir,
            None => self.checkpoint(&optimizer, &state, log.as_ref())?,
        };
        Ok(Summary { step: state.step, checkpoint, tokens: state.tokens, seconds: started.elapsed().as_secs_f64() })
    }

    /// A fresh state, or the one of the latest checkpoint (its weights and moments loaded).
    fn start(&self, resume: bool, optimizer: &mut RankOptimizer) -> Result<TrainState> {
        match (latest_checkpoint(&self.run_dir), resume) {
            (Some((_, dir)), true) => {
                let state = TrainState::load(&dir, &self.config, self.comm.world())?;
                state::load_weights(&dir, self.model, optimizer, state.step)?;
                Ok(state)
            }
            (Some((_, dir)), false) => Err(Error::msg(format!(
                "{} already holds a checkpoint ({}); resume it with --resume, or choose another run folder",
                self.run_dir.display(),
                dir.display()
            ))),
            (None, _) => Ok(TrainState::new(&self.config, self.comm.world())),
        }
    }

    /// One optimizer step over `accumulation` micro-batches.
    fn step(
        &self,
        data: &mut Dataset,
        optimizer: &mut RankOptimizer,
        step: u64,
        state: &mut TrainState,
        started: Instant,
        last_good: Option<&Path>,
    ) -> Result<StepMetrics> {
        let config = &self.config;
        let lambda = config.lambda.at(step, config.steps);
        let objective =
            Objective { lambda, divergence: config.divergence, temperature: config.temperature, tail: config.tail };
        let accumulation = config.accumulation.max(1);
        let (mut loss_sum, mut clm_sum, mut fusion_sum, mut tokens) = (0.0, 0.0, 0.0, 0);
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let parallel = self.comm.world() > 1;
        for micro in 0..accumulation {
            let mut batch = data.batch((step - 1) * accumulation + micro)?;
            if parallel {
                batch.over = Some(parallel::global_counts(self.comm, batch.counts())?);
                if batch.batch == 0 {
                    continue;
                }
            }
            let checkpointed = config.checkpoint_activations;
            let (losses, g) = self.model.gradients(&batch, &objective, accumulation as f64, checkpointed)?;
            let scalar = |t: &candle_core::Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
            let (loss, clm, fusion) = (scalar(&losses.total)?, scalar(&losses.clm)?, scalar(&losses.fusion)?);
            if !loss.is_finite() {
                return Err(nan_error(step, &format!("the loss is {loss} (CLM {clm}, fusion {fusion})"), last_good));
            }
            grads = Some(match grads {
                None => g,
                Some(mut sum) => {
                    for (_, var) in self.model.vars() {
                        if let (Some(a), Some(b)) = (sum.get(var), g.get(var)) {
                            let total = (a + b)?;
                            sum.insert(var, total);
                        }
                    }
                    sum
                }
            });
            loss_sum += loss;
            clm_sum += clm;
            fusion_sum += fusion;
            tokens += batch.tokens() as u64;
        }
        let vars = self.model.vars();
        let grads = match parallel {
            true => {
                let [loss, clm, fusion, all] =
                    parallel::sum(self.comm, [loss_sum, clm_sum, fusion_sum, tokens as f64])?;
                (loss_sum, clm_sum, fusion_sum, tokens) = (loss, clm, fusion, all as u64);
                parallel::all_reduce_grads(self.comm, vars, grads)?
            }
            false => grads.expect("at least one micro-batch"),
        };
        let (norm, bad) = grad_norm(vars, &grads)?;
        if let Some(name) = bad {
            return Err(nan_error(step, &format!("the gradient of `{name}` is not finite"), last_good));
        }
        let scale = match config.clip {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let lr = config.lr.at(step, config.steps);
        optimizer.step(self.comm, vars, &grads, scale, lr)?;
        state.step = step;
        state.tokens += tokens;
        let n = accumulation as f64;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step,
            loss: loss_sum / n,
            clm: clm_sum / n,
            fusion: fusion_sum / n,
            lambda,
            lr,
            grad_norm: norm,
            tokens: state.tokens,
            tokens_per_s: 0.0,
            elapsed_s: elapsed,
        })
    }

    /// Writes `checkpoints/step-NNNNNNN` atomically, then the plot, and prunes old ones:
    /// the rank with the log (rank 0) does; every rank waits for it and gets the folder.
    fn checkpoint(&self, optimizer: &RankOptimizer, state: &TrainState, log: Option<&metrics::Log>) -> Result<PathBuf> {
        let optimizer_state = optimizer.state(self.comm, self.model.vars())?;
        let dir = match (log, optimizer_state) {
            (Some(log), Some(optimizer_state)) => {
                let dir = state::write_checkpoint(&self.run_dir, &self.base, self.model, &optimizer_state, state)?;
                log.plot(&self.run_dir.join("loss.png"))?;
                state::prune(&self.run_dir, self.config.keep_checkpoints.max(1))?;
                dir
            }
            _ => state::checkpoint_dir(&self.run_dir, state.step),
        };
        self.comm.barrier()?;
        Ok(dir)
    }
}

fn nan_error(step: u64, what: &str, last_good: Option<&Path>) -> Error {
    let kept = match last_good {
        Some(dir) => format!("the last good checkpoint is {}", dir.display()),
        None => "no checkpoint was written before it".into(),
    };
    Error::msg(format!(
        "step {step}: {what}; training stopped ({kept}). Lower the learning rate, enable clipping, or check the data of this step"
    ))
}
