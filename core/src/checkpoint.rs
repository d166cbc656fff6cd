//! A model checkpoint directory in the Hugging Face layout (config.json, *.safetensors,
//! tokenizer.json): which adapter reads it, its spec, its tokenizer and its weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fusellm_sdk::{CheckpointFiles, HfConfig, ModelSpec, PluginKind};

use crate::error::{Context, Error, Result};
use crate::model::{LoadMode, Transformer};
use crate::plugins::Registry;
use crate::tokenizer::Tokenizer;

/// An opened checkpoint: its spec (from the adapter) and tokenizer; weights load on demand.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub adapter: String,
    pub adapter_version: String,
    pub tokenizer: Tokenizer,
}

impl Checkpoint {
    /// Reads `dir` with the adapter named `adapter`, or else the one a config bound to `dir`
    /// ([`Registry::bind_adapter`]), or else the one that declares the config's `model_type`.
    pub fn open(dir: &Path, registry: &Registry, adapter: Option<&str>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "{} is not a checkpoint folder (a folder with config.json, weights, tokenizer.json)",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&config_path)
            .context(|| format!("{} has no readable config.json", dir.display()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tokenizer_path)
            .context(|| format!("{} has no readable tokenizer.json", dir.display()))?;
        let entry = match adapter.or_else(|| registry.bound_adapter(dir)) {
            Some(name) => registry.get(PluginKind::Adapter, name)?,
            None => {
                let config = HfConfig::parse(&config_json).context(|| config_path.display().to_string())?;
                let model_type = config.str("model_type").ok_or_else(|| {
                    Error::msg(format!("{}: no `model_type`; name the adapter to use", config_path.display()))
                })?;
                registry.adapter_for(model_type)?
            }
        };
        let params = entry.resolve_params(&Default::default()).map_err(|e| Error::msg(e.message))?;
        let files = CheckpointFiles { config_json: &config_json, tokenizer_json: Some(&tokenizer_json) };
        let spec = entry.adapt(&params, files).map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
        let tokenizer = Tokenizer::load(&tokenizer_path, &spec)?;
        let (adapter, adapter_version) = (entry.info.name.clone(), entry.info.version.clone());
        Ok(Self { dir: dir.to_owned(), spec, adapter, adapter_version, tokenizer })
    }

    /// Loads the weights: frozen (memory-mapped) or trainable.
    pub fn load_model(&self, mode: LoadMode, dtype: DType, device: &Device) -> Result<Transformer> {
        Transformer::load(&self.dir, &self.spec, mode, dtype, device)
    }
}
