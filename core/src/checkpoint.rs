//! A model checkpoint directory in the Hugging Face layout (config.json, *.safetensors,
//! tokenizer.json): which adapter reads it, its spec, its tokenizer and its weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fusellm_sdk::{CheckpointFiles, HfConfig, ModelSpec, PluginKind};

use crate::error::{Context, Error, Result};
use crate::files::sha256_hex;
use crate::model::lora::{AdapterSource, LoraSpec};
use crate::model::{LoadMode, Transformer};
use crate::plugins::Registry;
use crate::store::{read_identity, Identity};
use crate::tokenizer::Tokenizer;

/// An opened checkpoint: its spec (from the adapter) and tokenizer; weights load on demand.
/// The hashes of config.json and tokenizer.json are taken once, from the text the adapter
/// read, for every stage that keys on them.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub adapter: String,
    pub adapter_version: String,
    pub tokenizer: Tokenizer,
    pub config_sha256: String,
    pub tokenizer_sha256: String,
}

impl Checkpoint {
    /// Reads `dir` with the adapter named `adapter`, or else the one that declares the
    /// config's `model_type`.
    pub fn open(dir: &Path, registry: &Registry, adapter: Option<&str>) -> Result<Self> {
        // A Hub id (`Qwen/Qwen2.5-7B`) where no such folder exists: its snapshot in the cache.
        let located = crate::hub::locate(dir).map_err(Error::msg)?;
        let dir = located.as_path();
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
        let entry = match adapter {
            Some(name) => registry.get(PluginKind::Adapter, name)?,
            None => {
                let config = HfConfig::parse(&config_json).context(|| config_path.display().to_string())?;
                let model_type = config.str("model_type").ok_or_else(|| {
                    Error::msg(format!("{}: no `model_type`; name the adapter to use", config_path.display()))
                })?;
                registry.adapter_for(model_type)?
            }
        };
        let params = entry.resolve_params(&Default::default())?;
        let files = CheckpointFiles { config_json: &config_json, tokenizer_json: Some(&tokenizer_json) };
        let spec = entry.adapt(&params, files).context(|| dir.display().to_string())?;
        let tokenizer = Tokenizer::load(&tokenizer_path, &spec)?;
        Ok(Self {
            dir: crate::files::absolute(dir),
            spec,
            adapter: entry.info.name.clone(),
            adapter_version: entry.info.version.clone(),
            tokenizer,
            config_sha256: sha256_hex(config_json.as_bytes()),
            tokenizer_sha256: sha256_hex(tokenizer_json.as_bytes()),
        })
    }

    /// The checkpoint the store in `store` was computed from (its store.json names it),
    /// read as [`Checkpoint::open`] reads one.
    pub fn of_store(store: &Path, registry: &Registry, adapter: Option<&str>) -> Result<Self> {
        Self::open(Path::new(&read_identity(store)?.model), registry, adapter)
    }

    /// The sha256 of each of the folder's safetensors files, by name (hashed once per file
    /// version: [`crate::files::cached_file_sha256`]).
    pub fn weights_sha256(&self) -> Result<Vec<(String, String)>> {
        let mut files: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(&self.dir)
            .context(|| format!("reading {}", self.dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        files.sort();
        files.into_iter().map(|(name, path)| Ok((name, crate::files::cached_file_sha256(&path)?))).collect()
    }

    /// One hash of what the model computes with: its config, tokenizer and weights.
    pub fn content_sha256(&self) -> Result<String> {
        let content = serde_json::json!([self.config_sha256, self.tokenizer_sha256, self.weights_sha256()?]);
        Ok(sha256_hex(content.to_string().as_bytes()))
    }

    /// Checks the weight files without loading a tensor: every file's header reads, its
    /// data is as long as the header says (a truncated download is caught here), and every
    /// tensor the model needs is there with a loadable dtype and the shape config.json
    /// implies.
    pub fn check_weights(&self) -> Result<()> {
        self.load_model(LoadMode::HeadersOnly, DType::F32, &Device::Cpu).map(|_| ())
    }

    /// Loads the weights: frozen (memory-mapped) or trainable. A folder holding a PEFT
    /// LoRA adapter and no weights of its own (a LoRA run's checkpoint that was not merged)
    /// loads as its base with the adapter, frozen.
    pub fn load_model(&self, mode: LoadMode, dtype: DType, device: &Device) -> Result<Transformer> {
        let Some((lora, base)) = self.peft_adapter()? else {
            return Ok(Transformer::load(&self.dir, &self.spec, mode, dtype, device)?);
        };
        if mode == LoadMode::Trainable {
            return Err(Error::msg(format!(
                "{} holds a LoRA adapter, not a model to train: train from its base ({}) or merge the adapter first ([train.lora] merge = true)",
                self.dir.display(),
                base.display()
            )));
        }
        let file = self.dir.join(ADAPTER_WEIGHTS);
        // SAFETY: mapped read-only, as the weights are (see `Weights::open`).
        let saved = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }
            .context(|| format!("reading the LoRA adapter {}", file.display()))?;
        let adapter = (&lora, AdapterSource::File(saved));
        let model = Transformer::load_adapted(&base, &self.spec, adapter, mode, dtype, device)
            .context(|| format!("loading {} with the LoRA adapter of {}", base.display(), self.dir.display()))?;
        Ok(model)
    }

    /// Loads the weights frozen with fresh, trainable LoRA adapters (drawn from `seed`).
    pub fn load_adapted(&self, lora: &LoraSpec, seed: u64, dtype: DType, device: &Device) -> Result<Transformer> {
        let adapter = (lora, AdapterSource::Init(fusellm_sdk::rng::Rng::new(seed)));
        Ok(Transformer::load_adapted(&self.dir, &self.spec, adapter, LoadMode::Frozen, dtype, device)?)
    }

    /// Checks, without loading a tensor, that every target of `lora` names projections of
    /// this model.
    pub fn check_adapter(&self, lora: &LoraSpec) -> Result<()> {
        let adapter = (lora, AdapterSource::Init(fusellm_sdk::rng::Rng::new(0)));
        Transformer::load_adapted(&self.dir, &self.spec, adapter, LoadMode::HeadersOnly, DType::F32, &Device::Cpu)?;
        Ok(())
    }

    /// The spec and the base folder of the PEFT adapter this folder holds in place of
    /// weights, if it does.
    fn peft_adapter(&self) -> Result<Option<(LoraSpec, PathBuf)>> {
        let config = self.dir.join(ADAPTER_CONFIG);
        let has_weights =
            ["model.safetensors", "model.safetensors.index.json"].iter().any(|f| self.dir.join(f).exists());
        if has_weights || !config.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&config).context(|| format!("reading {}", config.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).context(|| config.display().to_string())?;
        let (lora, base) = LoraSpec::from_peft(&json).map_err(|e| Error::msg(format!("{}: {e}", config.display())))?;
        let base = self.dir.join(base);
        if !base.join("config.json").exists() {
            return Err(Error::msg(format!(
                "{}: `base_model_name_or_path` is {}, which is not a checkpoint folder here; set it to the base model's folder",
                config.display(),
                base.display()
            )));
        }
        Ok(Some((lora, base)))
    }
}

/// The files of a PEFT adapter, as PEFT names them.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A model's store and the checkpoint it was computed from, opened by the caller with the
/// adapter the caller chose.
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    pub dir: &'a Path,
    pub checkpoint: &'a Checkpoint,
}

impl Stored<'_> {
    /// The store's identity, checked against the checkpoint: the same tokenizer.
    pub fn identity(&self) -> Result<Identity> {
        crate::store::verify_for_reading(self.dir)?;
        let identity = read_identity(self.dir)?;
        if identity.tokenizer_sha256 != self.checkpoint.tokenizer_sha256 {
            return Err(Error::msg(format!(
                "{} was computed with another tokenizer than {}'s (store: {}); give the checkpoint it was computed from",
                self.dir.display(),
                self.checkpoint.dir.display(),
                identity.model
            )));
        }
        Ok(identity)
    }
}
