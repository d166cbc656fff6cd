//! A stage as one abstraction: its typed inputs, what of them its output depends on (a
//! serialisable value whose hash, with the keys of the stages it reads, names its cache
//! folder), whether a folder holds its finished output, and the work. `fusellm run` chains
//! the stages through the cache; the subcommands run the same stages on folders they name.

use std::path::Path;

use serde::Serialize;

use super::Event;
use crate::checkpoint::Checkpoint;
use crate::error::{Context, Result};
use crate::files::sha256_hex;
use crate::plugins::Configured;

pub trait Stage {
    /// The cache folder's name starts with it.
    const NAME: &'static str;
    /// Everything of the stage's own inputs its output depends on (the stages it reads
    /// contribute their keys).
    type Input: Serialize;
    type Output;

    fn input(&self) -> Result<Self::Input>;

    /// Whether `out` holds the stage's finished output (an interrupted one is continued).
    fn done(&self, out: &Path) -> bool;

    fn run(self, out: &Path, events: &mut dyn FnMut(Event)) -> Result<Self::Output>;

    /// Removes what depends on the `damaged` files of a finished output (paths relative to
    /// `out`), so that [`Stage::run`] makes them again: by default the files themselves
    /// (each stage continues an interrupted output, computing only what is missing).
    fn repair(&self, out: &Path, damaged: &[std::path::PathBuf]) -> Result<()> {
        for file in damaged {
            let path = out.join(file);
            if path.exists() {
                std::fs::remove_file(&path).context(|| format!("removing the damaged {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Runs the stage into `out` and then writes the folder's manifest (every file's
    /// hash), by which a later run or reader knows the output whole.
    fn complete(self, out: &Path, events: &mut dyn FnMut(Event)) -> Result<Self::Output>
    where
        Self: Sized,
    {
        std::fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
        let output = self.run(out, events)?;
        crate::files::manifest::write_manifest(out)?;
        Ok(output)
    }
}

/// The cache key of a stage: a short hash of its input, the keys of the stages it reads,
/// and the version of fusellm (a release that computes a stage differently is a new one).
pub fn key(input: &impl Serialize, upstream: &[&str]) -> String {
    #[derive(Serialize)]
    struct Keyed<'a, T> {
        fusellm: &'a str,
        upstream: &'a [&'a str],
        input: &'a T,
    }
    let keyed = Keyed { fusellm: env!("CARGO_PKG_VERSION"), upstream, input };
    sha256_hex(&serde_json::to_vec(&keyed).expect("JSON"))[..16].to_string()
}

/// What identifies an opened checkpoint: the adapter that read it and its content (the
/// hashes of its config, tokenizer and weight files), so that weights edited in place are
/// noticed and a moved checkpoint is the same one.
#[derive(Serialize)]
pub struct ModelId {
    adapter: String,
    adapter_version: String,
    config_sha256: String,
    tokenizer_sha256: String,
    weights: Vec<(String, String)>,
}

impl ModelId {
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        Ok(ModelId {
            adapter: checkpoint.adapter.clone(),
            adapter_version: checkpoint.adapter_version.clone(),
            config_sha256: checkpoint.config_sha256.clone(),
            tokenizer_sha256: checkpoint.tokenizer_sha256.clone(),
            weights: checkpoint.weights_sha256()?,
        })
    }
}

/// A configured plugin as a stage input: name, version and resolved parameters.
#[derive(Serialize)]
pub struct PluginId {
    name: String,
    version: String,
    params: fusellm_sdk::Params,
}

impl From<&Configured<'_>> for PluginId {
    fn from(c: &Configured<'_>) -> Self {
        PluginId { name: c.entry.info.name.clone(), version: c.entry.info.version.clone(), params: c.params.clone() }
    }
}
