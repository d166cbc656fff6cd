//! Loading a checkpoint's tensors by the block library's names: memory-mapped and frozen
//! (sources, precompute) or as trainable `Var`s (the target).

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use fusellm_sdk::ModelSpec;

use crate::error::{Context, Error, Result};

/// How weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Constants read from memory-mapped files: no gradients, no copies beyond the dtype
    /// conversion.
    Frozen,
    /// Every tensor a `Var`, so that a backward pass reaches it.
    Trainable,
}

/// The tensors of a checkpoint, addressed by the names of [`ModelSpec::tensor_names`].
pub struct Weights {
    files: MmapedSafetensors,
    dir: PathBuf,
    spec: ModelSpec,
    mode: LoadMode,
    dtype: DType,
    device: Device,
    /// The trainable parameters handed out so far, by checkpoint name.
    vars: Vec<(String, Var)>,
}

impl Weights {
    pub fn open(dir: &Path, spec: &ModelSpec, mode: LoadMode, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; like every mmap reader, this assumes no
        // other process truncates them while the model is loaded.
        let files = unsafe { MmapedSafetensors::multi(&files) }
            .context(|| format!("reading the weights in {}", dir.display()))?;
        Ok(Self {
            files,
            dir: dir.to_owned(),
            spec: spec.clone(),
            mode,
            dtype,
            device: device.clone(),
            vars: Vec::new(),
        })
    }

    /// The checkpoint name of block-library tensor `name` (`{i}` replaced by `layer`).
    pub fn checkpoint_name(&self, name: &str, layer: Option<usize>) -> Result<String> {
        let pattern = self.spec.tensor_names.get(name).ok_or_else(|| {
            Error::msg(format!("the {} adapter names no checkpoint tensor for `{name}`", self.spec.model_type))
        })?;
        Ok(match layer {
            Some(i) => pattern.replace("{i}", &i.to_string()),
            None => pattern.clone(),
        })
    }

    /// Whether the checkpoint holds tensor `name` (an untied LM head may be absent).
    pub fn contains(&self, name: &str, layer: Option<usize>) -> bool {
        self.checkpoint_name(name, layer).is_ok_and(|n| self.files.get(&n).is_ok())
    }

    /// Tensor `name` of `layer`, checked against the shape the config implies.
    pub fn get(&mut self, name: &str, layer: Option<usize>, shape: &[usize]) -> Result<Tensor> {
        let full = self.checkpoint_name(name, layer)?;
        if let Some((_, var)) = self.vars.iter().find(|(n, _)| *n == full) {
            return Ok(var.as_tensor().clone());
        }
        let view = self.files.get(&full).map_err(|_| {
            Error::msg(format!(
                "{}: the checkpoint has no tensor `{full}` (the config implies one of shape {shape:?})",
                self.dir.display()
            ))
        })?;
        if view.shape() != shape {
            return Err(Error::msg(format!(
                "{}: tensor `{full}` has shape {:?} but config.json implies {shape:?}",
                self.dir.display(),
                view.shape()
            )));
        }
        let tensor = self.files.load(&full, &self.device)?.to_dtype(self.dtype)?;
        match self.mode {
            LoadMode::Frozen => Ok(tensor),
            LoadMode::Trainable => {
                let var = Var::from_tensor(&tensor)?;
                self.vars.push((full, var.clone()));
                Ok(var.as_tensor().clone())
            }
        }
    }

    /// The trainable parameters, by checkpoint name (empty when frozen).
    pub fn into_vars(self) -> Vec<(String, Var)> {
        self.vars
    }
}

/// The safetensors files of a checkpoint: those of model.safetensors.index.json when it
/// is sharded, else model.safetensors, else every *.safetensors file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).context(|| format!("parsing {}", index.display()))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::msg(format!("{}: no `weight_map` object", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(Error::msg(format!(
                "{} lists the shard {}, which does not exist",
                index.display(),
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .context(|| format!("reading the checkpoint folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::msg(format!(
            "{} has no weights: expected model.safetensors or model.safetensors.index.json with its shards",
            dir.display()
        )));
    }
    Ok(files)
}
