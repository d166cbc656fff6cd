//! `fusellm validate`: everything a run needs, checked before any compute: files exist and
//! hold text, the device is there, checkpoints open with their adapters and their weight
//! files hold every tensor, plugins load and take their parameters, and the lengths fit
//! every model.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, ConfigError, ModelRef, PathAt};
use crate::plugins::{Configured, Registry};

/// The opened parts of a valid config: every model resolved to its checkpoint (with the
/// adapter the config names) and every stage's plugin with its parameters, once, for all
/// the stages that use them.
pub struct Checked<'r> {
    pub target: Checkpoint,
    pub sources: Vec<Checkpoint>,
    pub sequence: Configured<'r>,
    pub vocab: Configured<'r>,
    pub fusion: Option<Configured<'r>>,
}

/// The file exists, can be read, and holds some text (its first 64 KiB are read).
fn has_text(path: &PathAt, what: &str) -> Result<(), ConfigError> {
    use std::io::Read;
    let shown = path.path.display();
    if !path.path.exists() {
        return Err(path.error(format!("{what} {shown} does not exist")));
    }
    let mut head = Vec::new();
    std::fs::File::open(&path.path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|e| path.error(format!("{what} {shown} cannot be read: {e}")))?;
    match head.iter().any(|b| !b.is_ascii_whitespace()) {
        true => Ok(()),
        false => Err(path.error(format!("{what} {shown} is empty"))),
    }
}

/// The checkpoint of `model`, read by the adapter the config names for it, if any.
pub fn open_model(model: &ModelRef, registry: &Registry) -> Result<Checkpoint, ConfigError> {
    let adapter = model.adapter.as_ref().map(|a| a.find(registry)).transpose()?;
    let name = adapter.as_ref().map(|a| a.entry.info.name.as_str());
    Checkpoint::open(&model.dir.path, registry, name).map_err(|e| model.dir.error(e.report()))
}

/// [`open_model`], and its weight files checked against the spec without loading them.
fn open_checked(model: &ModelRef, registry: &Registry) -> Result<Checkpoint, ConfigError> {
    let checkpoint = open_model(model, registry)?;
    checkpoint.check_weights().map_err(|e| model.dir.error(e.report()))?;
    Ok(checkpoint)
}

/// Checks `config` for a run, with the plugins it names by file already loaded into
/// `registry` ([`Config::load_plugins`]).
pub fn validate<'r>(config: &Config, registry: &'r Registry) -> Result<Checked<'r>, ConfigError> {
    let data =
        config.data.as_ref().ok_or_else(|| config.error_at("data", "a run needs a [data] section with the corpus"))?;
    for file in &data.corpus {
        has_text(file, "the corpus file")?;
    }
    crate::device::parse(&config.run.device).map_err(|e| config.error_at("run.device", e.report()))?;
    let target = config.target.as_ref().ok_or_else(|| config.error_at("target", "a run needs a [target] model"))?;
    let target = open_checked(target, registry)?;
    let sources = config.sources.iter().map(|s| open_checked(s, registry)).collect::<Result<Vec<_>, _>>()?;
    if config.fusion.is_some() && sources.is_empty() {
        return Err(config.error_at("fusion", "fusion needs at least one [[sources]] model"));
    }
    if config.merge.is_some() && config.train.as_ref().is_some_and(|t| t.lora.is_some()) {
        return Err(config.error_at(
            "merge",
            "[merge] merges whole trained checkpoints, and [train.lora] trains adapters only: remove one of them",
        ));
    }
    if config.merge.is_some() && (config.fusion.is_none() || config.train.is_none()) {
        return Err(config.error_at(
            "merge",
            "[merge] merges the targets trained with each source (FuseChat's pairwise fusion): it needs [fusion] and [train]",
        ));
    }
    for checkpoint in std::iter::once(&target).chain(&sources) {
        fits(config, checkpoint)?;
    }
    if let Some(train) = &config.train {
        if train.batching.seq_len > target.spec.max_positions {
            return Err(config.error_at(
                "train.seq_len",
                format!(
                    "{} tokens do not fit the target's {} positions",
                    train.batching.seq_len, target.spec.max_positions
                ),
            ));
        }
        if let Some(lora) = &train.lora {
            target.check_adapter(&lora.adapter).map_err(|e| config.error_at("train.lora.targets", e.report()))?;
        }
    }
    if let Some(eval) = &config.eval {
        for (_, file) in &eval.sets {
            has_text(file, "the evaluation set")?;
        }
    }
    let load = |choice: &crate::config::PluginChoice| choice.find(registry);
    Ok(Checked {
        target,
        sources,
        sequence: load(&config.align.sequence)?,
        vocab: load(&config.align.vocab)?,
        fusion: config.fusion.as_ref().map(load).transpose()?,
    })
}

/// The split length and k fit the model.
fn fits(config: &Config, checkpoint: &Checkpoint) -> Result<(), ConfigError> {
    let name = Path::new(&checkpoint.dir).display();
    let data = config.data.as_ref().expect("checked before");
    if data.max_len > checkpoint.spec.max_positions {
        return Err(config.error_at(
            "data.max_len",
            format!(
                "pieces of {} tokens do not fit {name}, which has {} positions",
                data.max_len, checkpoint.spec.max_positions
            ),
        ));
    }
    if config.precompute.k > checkpoint.spec.vocab_size {
        return Err(config
            .error_at("precompute.k", format!("k = {} is more than the vocabulary of {name}", config.precompute.k)));
    }
    Ok(())
}
