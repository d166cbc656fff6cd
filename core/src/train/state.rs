//! Checkpoints of a training run: `checkpoints/step-NNNNNNN/` in the Hugging Face layout
//! (config.json, model.safetensors, tokenizer files) so that transformers loads it, plus
//! what resuming needs (optimizer.safetensors, trainer_state.json). A LoRA run writes the
//! adapters as PEFT does (adapter_config.json, adapter_model.safetensors) in place of
//! model.safetensors; its last checkpoint holds the merged model in `merged/` when asked
//! to. A checkpoint
//! is written under a `.partial` name and renamed when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::parallel::RankOptimizer;
use super::{LoraTraining, TrainConfig};
use crate::checkpoint::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Context, Error, Result};
use crate::files::write_atomically;
use crate::model::Transformer;

/// Files of the base checkpoint that every checkpoint carries along (when present).
pub const CARRIED: &[&str] =
    &["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

/// Where a run stands: the step reached and the tokens seen; the configuration it was
/// started with, so that a resume with another one is refused. Its `batching.batch_size`
/// is the global batch (the ranks' batch_size times their number): a run resumes on
/// another number of ranks when it keeps that product, and the ranks then serve the same
/// global micro-batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub tokens: u64,
    pub config: TrainConfig,
    pub fusellm_version: String,
}

impl TrainState {
    /// The state of a fresh run of `config` on `ranks` ranks.
    pub fn new(config: &TrainConfig, ranks: usize) -> Self {
        let config = global(config, ranks);
        Self { step: 0, tokens: 0, config, fusellm_version: env!("CARGO_PKG_VERSION").into() }
    }

    /// The state of checkpoint `dir`, checked against the configuration of the run
    /// resuming it on `ranks` ranks.
    pub fn load(dir: &Path, config: &TrainConfig, ranks: usize) -> Result<Self> {
        let file = dir.join("trainer_state.json");
        let bytes = std::fs::read(&file).context(|| format!("reading {}", file.display()))?;
        let state: TrainState = serde_json::from_slice(&bytes).context(|| file.display().to_string())?;
        let asked = global(config, ranks);
        let (was, now) = (state.config.batching.batch_size, asked.batching.batch_size);
        if was != now {
            return Err(Error::msg(format!(
                "{} was trained with a global batch of {was} sequences; {ranks} rank(s) of batch_size {} make {now}: set batch_size to {was} / {ranks} per rank (or start a new run folder)",
                dir.display(),
                config.batching.batch_size
            )));
        }
        if let Some(key) = first_difference(&serde_json::json!(state.config), &serde_json::json!(asked), "") {
            return Err(Error::msg(format!(
                "{} was trained with another `{key}` than this run asks for; resume with the same training settings, or start a new run folder",
                dir.display()
            )));
        }
        Ok(state)
    }
}

/// `config` with the global batch of `ranks` ranks in place of the per-rank one.
fn global(config: &TrainConfig, ranks: usize) -> TrainConfig {
    let mut config = config.clone();
    config.batching.batch_size *= ranks.max(1);
    config
}

/// The dotted path of the first value that differs between two JSON objects.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                first_difference(
                    x.get(k).unwrap_or(&serde_json::Value::Null),
                    y.get(k).unwrap_or(&serde_json::Value::Null),
                    &path,
                )
            })
        }
        _ => (a != b).then(|| at.to_string()),
    }
}

fn checkpoints(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The complete checkpoint of the highest step, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<(u64, PathBuf)> {
    complete_checkpoints(run_dir).into_iter().max_by_key(|(step, _)| *step)
}

fn complete_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints(run_dir)) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            p.join("trainer_state.json").exists().then_some((step, p))
        })
        .collect()
}

/// The folder of the checkpoint of `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints(run_dir).join(format!("step-{step:07}"))
}

/// Writes the checkpoint of `state.step`.
pub fn write_checkpoint(
    run_dir: &Path,
    base: &Path,
    model: &Transformer,
    optimizer_state: &HashMap<String, candle_core::Tensor>,
    state: &TrainState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir, state.step);
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).context(|| format!("creating {}", partial.display()))?;
    copy_carried(base, &partial)?;
    model.save_weights(&partial.join(weights_file(model)))?;
    if let Some(lora) = &state.config.lora {
        write_adapter(base, model, lora, state, &partial)?;
    }
    candle_core::safetensors::save(optimizer_state, partial.join("optimizer.safetensors"))
        .context(|| format!("writing the optimizer state in {}", partial.display()))?;
    write_atomically(&partial.join("trainer_state.json"), &serde_json::to_vec_pretty(state).expect("JSON"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&partial, &dir).context(|| format!("renaming {} into place", partial.display()))?;
    Ok(dir)
}

/// The file of a checkpoint that holds the trained parameters: the model's, or only the
/// LoRA adapters' (PEFT's file).
fn weights_file(model: &Transformer) -> &'static str {
    match model.lora() {
        Some(_) => ADAPTER_WEIGHTS,
        None => "model.safetensors",
    }
}

/// PEFT's adapter_config.json beside the adapter's weights (the base named by its
/// absolute path), and, in the run's last checkpoint when `merge` is asked for, the
/// target with the adapters merged in, in `merged/`: a folder of its own, because
/// transformers loads a folder holding adapter_config.json as the base plus the adapter,
/// which would apply the adapter twice to merged weights.
fn write_adapter(base: &Path, model: &Transformer, lora: &LoraTraining, state: &TrainState, dir: &Path) -> Result<()> {
    let base_name = crate::files::absolute(base).display().to_string();
    let config = serde_json::to_vec_pretty(&lora.adapter.peft_config(&base_name)).expect("JSON");
    write_atomically(&dir.join(ADAPTER_CONFIG), &config)?;
    if lora.merge && state.step == state.config.steps {
        let merged = dir.join(MERGED);
        std::fs::create_dir_all(&merged).context(|| format!("creating {}", merged.display()))?;
        copy_carried(base, &merged)?;
        let adapter = model.vars().iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        crate::model::lora::merge(base, &adapter, &lora.adapter, &merged)?;
    }
    Ok(())
}

/// The folder of a LoRA run's last checkpoint that holds the merged model.
pub const MERGED: &str = "merged";

/// Sets the model's weights and the optimizer's moments to those of checkpoint `dir`.
pub fn load_weights(dir: &Path, model: &Transformer, optimizer: &mut RankOptimizer, step: u64) -> Result<()> {
    let device = model.device();
    let weights = candle_core::safetensors::load(dir.join(weights_file(model)), device)
        .context(|| format!("reading the weights of {}", dir.display()))?;
    for (name, var) in model.vars() {
        let saved = weights.get(name).ok_or_else(|| Error::msg(format!("{} has no `{name}`", dir.display())))?;
        var.set(&saved.to_dtype(var.dtype())?)
            .context(|| format!("{}: `{name}` does not fit the model", dir.display()))?;
    }
    // On the host: a rank keeps only its share of it on the device (ZeRO).
    let moments: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(dir.join("optimizer.safetensors"), &candle_core::Device::Cpu)
            .context(|| format!("reading the optimizer state of {}", dir.display()))?;
    optimizer.restore(moments, step)
}

/// Removes all but the newest `keep` complete checkpoints.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let mut all = complete_checkpoints(run_dir);
    all.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    for (_, dir) in all.into_iter().skip(keep) {
        std::fs::remove_dir_all(&dir).context(|| format!("removing the old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Copies the config and tokenizer files of checkpoint folder `from` (those it has) to `to`.
pub fn copy_carried(from: &Path, to: &Path) -> Result<()> {
    for name in CARRIED {
        let file = from.join(name);
        if file.exists() {
            std::fs::copy(&file, to.join(name)).context(|| format!("copying {}", file.display()))?;
        }
    }
    Ok(())
}
