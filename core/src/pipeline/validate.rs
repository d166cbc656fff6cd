//! `fusellm validate`: everything a run needs, checked before any compute: files exist,
//! checkpoints open with their adapters, plugins load and take their parameters, and the
//! lengths fit every model.

use std::path::Path;

use fusellm_sdk::Params;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, ConfigError, ModelRef, PathAt};
use crate::plugins::{Entry, Registry};

/// The opened parts of a valid config.
pub struct Checked<'r> {
    pub target: Checkpoint,
    pub sources: Vec<Checkpoint>,
    pub sequence: (&'r Entry, Params),
    pub vocab: (&'r Entry, Params),
    pub fusion: Option<(&'r Entry, Params)>,
}

fn exists(path: &PathAt, what: &str) -> Result<(), ConfigError> {
    match path.path.exists() {
        true => Ok(()),
        false => Err(path.error(format!("{what} {} does not exist", path.path.display()))),
    }
}

fn open(model: &ModelRef, registry: &Registry) -> Result<Checkpoint, ConfigError> {
    Checkpoint::open(&model.dir.path, registry, None).map_err(|e| model.dir.error(e.message))
}

/// Checks `config` for a run, with the plugins it names by file already loaded into
/// `registry` ([`Config::load_plugins`]).
pub fn validate<'r>(config: &Config, registry: &'r Registry) -> Result<Checked<'r>, ConfigError> {
    let data =
        config.data.as_ref().ok_or_else(|| config.error_at("data", "a run needs a [data] section with the corpus"))?;
    for file in &data.corpus {
        exists(file, "the corpus file")?;
    }
    let target = config.target.as_ref().ok_or_else(|| config.error_at("target", "a run needs a [target] model"))?;
    let target = open(target, registry)?;
    let sources = config.sources.iter().map(|s| open(s, registry)).collect::<Result<Vec<_>, _>>()?;
    if config.fusion.is_some() && sources.is_empty() {
        return Err(config.error_at("fusion", "fusion needs at least one [[sources]] model"));
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
    }
    if let Some(eval) = &config.eval {
        for (_, file) in &eval.sets {
            exists(file, "the evaluation set")?;
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
