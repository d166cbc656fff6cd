//! The options every subcommand that runs a model shares: which plugin files to load,
//! which adapter reads the checkpoint, and the device, resolved the way `fusellm run`
//! resolves a config's `adapter`, `[sandbox]` and `[run] device`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::plugins::Registry;

/// Plugin files to load besides the built-ins.
#[derive(Args)]
pub struct PluginArgs {
    /// A plugin file to load (repeatable; .so/.dylib/.dll or .wasm): its aligners and fusion
    /// plugins can be named, its adapters read the checkpoints whose model_type they declare.
    #[arg(long = "plugin")]
    pub plugins: Vec<PathBuf>,
}

impl PluginArgs {
    /// The built-ins and the plugins of these files.
    pub fn registry(&self) -> Result<Registry> {
        let mut registry = Registry::with_builtins()?;
        registry.load_files(&self.plugins)?;
        Ok(registry)
    }
}

/// How to open and where to run a model.
#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub plugins: PluginArgs,
    /// The adapter to read the checkpoint with (default: by config.json's model_type).
    #[arg(long)]
    pub adapter: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn device(&self) -> Result<Device> {
        Ok(fusellm_core::device::parse(&self.device)?)
    }

    /// The checkpoint in `dir`, read by the chosen adapter.
    pub fn open(&self, registry: &Registry, dir: &Path) -> Result<Checkpoint> {
        Ok(Checkpoint::open(dir, registry, self.adapter.as_deref())?)
    }
}
