//! Loading a checkpoint's tensors by the block library's names: memory-mapped and frozen
//! (sources, precompute) or as trainable `Var`s (the target).

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use fusellm_sdk::ModelSpec;
use safetensors::tensor::TensorView;

use crate::error::{Error, Result};
use crate::lora::{AdapterSource, Lora, LoraSpec};
use fusellm_sdk::rng::Rng;

/// How weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Constants, read through a memory map of the files (each tensor copied once into
    /// its compute dtype); no gradients.
    Frozen,
    /// Every tensor a `Var`, so that a backward pass reaches it.
    Trainable,
    /// Nothing read: each tensor's name, dtype and shape checked against the spec from the
    /// file headers, and a zero stand-in of its shape (a broadcast scalar, no memory) given
    /// in its place. For checking a checkpoint before a run, not for computing.
    HeadersOnly,
}

/// Where tensors come from.
enum Source {
    Checkpoint {
        files: MmapedSafetensors,
        dir: PathBuf,
    },
    /// A fresh initialisation: N(0, std^2) matrices, unit norm weights, zero biases.
    Random {
        rng: Rng,
        std: f64,
    },
}

/// The tensors of a model, addressed by the names of [`ModelSpec::tensor_names`].
pub struct Weights {
    source: Source,
    spec: ModelSpec,
    mode: LoadMode,
    dtype: DType,
    device: Device,
    /// The trainable parameters handed out so far, by checkpoint name.
    vars: Vec<(String, Var)>,
    /// Low-rank adapters on the projections a LoRA spec targets ([`Weights::adapted`]).
    adapters: Option<Adapters>,
    /// The checkpoint names read so far.
    used: std::collections::HashSet<String>,
}

struct Adapters {
    spec: LoraSpec,
    source: AdapterSource,
    /// The projections' modules seen so far.
    modules: Vec<String>,
}

impl Weights {
    pub fn open(dir: &Path, spec: &ModelSpec, mode: LoadMode, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; like every mmap reader, this assumes no
        // other process truncates them while the model is loaded.
        let files = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::context(format!("reading the weights in {}", dir.display()), e))?;
        let source = Source::Checkpoint { files, dir: dir.to_owned() };
        let (vars, adapters, used) = (Vec::new(), None, Default::default());
        Ok(Self { source, spec: spec.clone(), mode, dtype, device: device.clone(), vars, adapters, used })
    }

    /// These weights frozen (or only checked, `HeadersOnly`), with LoRA adapters on the
    /// projections `lora` targets: fresh and trainable (their `Var`s are then the only
    /// parameters) from `AdapterSource::Init`, frozen from a saved adapter.
    pub fn adapted(self, lora: &LoraSpec, source: AdapterSource) -> Self {
        let adapters = Some(Adapters { spec: lora.clone(), source, modules: Vec::new() });
        let mode = if self.mode == LoadMode::HeadersOnly { LoadMode::HeadersOnly } else { LoadMode::Frozen };
        Self { mode, adapters, ..self }
    }

    /// A fresh, trainable initialisation from a seed, the same on every platform.
    pub fn random(spec: &ModelSpec, seed: u64, std: f64, dtype: DType, device: &Device) -> Self {
        let source = Source::Random { rng: Rng::new(seed), std };
        let device = device.clone();
        let (vars, adapters, used) = (Vec::new(), None, Default::default());
        Self { source, spec: spec.clone(), mode: LoadMode::Trainable, dtype, device, vars, adapters, used }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The spec of the LoRA adapters these weights add, if any.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.adapters.as_ref().map(|a| &a.spec)
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
        let Ok(full) = self.checkpoint_name(name, layer) else { return false };
        match &self.source {
            Source::Checkpoint { files, .. } => files.get(&full).is_ok(),
            Source::Random { .. } => true,
        }
    }

    /// Tensor `name` of `layer`, checked against the shape the config implies.
    pub fn get(&mut self, name: &str, layer: Option<usize>, shape: &[usize]) -> Result<Tensor> {
        let full = self.checkpoint_name(name, layer)?;
        self.used.insert(full.clone());
        if let Some((_, var)) = self.vars.iter().find(|(n, _)| *n == full) {
            return Ok(var.as_tensor().clone());
        }
        let tensor = match &mut self.source {
            Source::Checkpoint { files, dir } if self.mode == LoadMode::HeadersOnly => {
                view(files, dir, &full, shape)?;
                return Ok(Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?);
            }
            Source::Checkpoint { files, dir } => {
                view(files, dir, &full, shape)?;
                let tensor = files.load(&full, &self.device)?;
                check_finite(&tensor, dir, &full)?;
                tensor
            }
            Source::Random { rng, std } => init(rng, *std, name, shape, &self.device)?,
        }
        .to_dtype(self.dtype)?;
        match self.mode {
            LoadMode::Frozen | LoadMode::HeadersOnly => Ok(tensor),
            LoadMode::Trainable => {
                let var = Var::from_tensor(&tensor)?;
                self.vars.push((full, var.clone()));
                Ok(var.as_tensor().clone())
            }
        }
    }

    /// The adapter of the projection `name` (of `layer`), `[out, inp]`, if a LoRA spec
    /// targets it.
    pub fn adapter(&mut self, name: &str, layer: Option<usize>, (out, inp): (usize, usize)) -> Result<Option<Lora>> {
        let full = self.checkpoint_name(&format!("{name}.weight"), layer)?;
        let Some(adapters) = self.adapters.as_mut() else { return Ok(None) };
        let Some(module) = adapters.spec.targets_module(&full) else {
            adapters.modules.push(full.trim_end_matches(".weight").to_owned());
            return Ok(None);
        };
        let (lora, tensors) =
            Lora::make(&adapters.spec, &mut adapters.source, module, (out, inp), self.dtype, &self.device)?;
        adapters.modules.push(module.to_owned());
        if !matches!(adapters.source, AdapterSource::Init(_)) {
            return Ok(Some(lora));
        }
        let [(ka, a), (kb, b)] = tensors;
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let lora = lora.with(a.as_tensor().clone(), b.as_tensor().clone());
        self.vars.extend([(ka, a), (kb, b)]);
        Ok(Some(lora))
    }

    /// Refuses a checkpoint whose tensors and config.json disagree: layers beyond the
    /// config's count (they would be ignored), an LM head of its own beside tied
    /// embeddings (it would be ignored too).
    fn check_consistent(&self) -> Result<()> {
        let Source::Checkpoint { files, dir } = &self.source else { return Ok(()) };
        let names: Vec<String> = files.tensors().into_iter().map(|(name, _)| name).collect();
        let layers = self.spec.layers;
        for name in names.iter().filter(|n| !self.used.contains(*n)) {
            let beyond = self.spec.tensor_names.values().filter_map(|p| p.split_once("{i}")).find_map(|(pre, post)| {
                let index = name.strip_prefix(pre)?.strip_suffix(post)?.parse::<usize>().ok()?;
                (index >= layers).then_some(index)
            });
            if let Some(index) = beyond {
                return Err(Error::msg(format!(
                    "{}: the checkpoint holds layer {index} (`{name}`), but config.json gives {layers} layers; fix num_hidden_layers (or the checkpoint)",
                    dir.display()
                )));
            }
        }
        let head = self.checkpoint_name("lm_head.weight", None).ok();
        if let Some(head) = head.filter(|h| self.spec.tied_embeddings && names.contains(h)) {
            let embed = self.checkpoint_name("embed.weight", None)?;
            let load = |name: &str| -> Result<Tensor> { Ok(files.load(name, &Device::Cpu)?.to_dtype(DType::F32)?) };
            let (h, e) = (load(&head)?, load(&embed)?);
            let same = h.dims() == e.dims() && (h - e)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
            if !same {
                return Err(Error::msg(format!(
                    "{}: config.json ties the LM head to the embeddings (tie_word_embeddings), but the checkpoint holds its own `{head}`, which differs; set tie_word_embeddings to false to use it",
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// The trainable parameters, by checkpoint name (empty when frozen), once every LoRA
    /// target has matched a projection and the checkpoint has proven consistent with its
    /// config.
    pub fn into_vars(self) -> Result<Vec<(String, Var)>> {
        self.check_consistent()?;
        if let Some(adapters) = &self.adapters {
            let modules: Vec<&str> = adapters.modules.iter().map(String::as_str).collect();
            let unmatched = adapters.spec.unmatched(&modules);
            if !unmatched.is_empty() {
                let projections: std::collections::BTreeSet<&str> =
                    modules.iter().filter_map(|m| m.rsplit('.').next()).collect();
                return Err(Error::msg(format!(
                    "the LoRA targets {unmatched:?} match no projection of this {} model; its projections are {projections:?}",
                    self.spec.model_type
                )));
            }
        }
        Ok(self.vars)
    }
}

/// Tensor `name` of a checkpoint, its dtype and shape checked against what the config
/// implies (only the header is read).
fn view<'a>(files: &'a MmapedSafetensors, dir: &Path, name: &str, shape: &[usize]) -> Result<TensorView<'a>> {
    let view = files.get(name).map_err(|_| {
        Error::msg(format!(
            "{}: the checkpoint has no tensor `{name}` (the config implies one of shape {shape:?})",
            dir.display()
        ))
    })?;
    use safetensors::Dtype;
    if !matches!(view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64) {
        return Err(Error::msg(format!(
            "{}: tensor `{name}` is stored as {:?}, which fusellm cannot load as weights; supported: F32, BF16, F16, F64 (convert the checkpoint, e.g. dequantise it)",
            dir.display(),
            view.dtype()
        )));
    }
    if view.shape() != shape {
        return Err(Error::msg(format!(
            "{}: tensor `{name}` has shape {:?} but config.json implies {shape:?}",
            dir.display(),
            view.shape()
        )));
    }
    Ok(view)
}

/// Who knows that a checkpoint holds NaN or Inf on purpose sets this variable to 1.
pub const ALLOW_NON_FINITE_VAR: &str = "FUSELLM_ALLOW_NONFINITE_WEIGHTS";

/// Refuses a weight with a NaN or an infinity (it would turn every output it reaches into
/// NaN, silently, downstream), unless [`ALLOW_NON_FINITE_VAR`] is set.
fn check_finite(tensor: &Tensor, dir: &Path, name: &str) -> Result<()> {
    let values = tensor.to_dtype(DType::F32)?.flatten_all()?;
    let finite = values.abs()?.broadcast_lt(&Tensor::new(f32::INFINITY, values.device())?)?;
    let bad = values.elem_count() - finite.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
    if bad == 0 || std::env::var(ALLOW_NON_FINITE_VAR).is_ok_and(|v| v == "1") {
        return Ok(());
    }
    Err(Error::msg(format!(
        "{}: tensor `{name}` holds {bad} NaN or infinite value(s) of {}; the checkpoint is damaged (download or convert it again), or set {ALLOW_NON_FINITE_VAR}=1 to load it anyway",
        dir.display(),
        values.elem_count()
    )))
}

/// A fresh tensor for block-library tensor `name`: norm weights one, biases zero,
/// matrices N(0, std^2).
fn init(rng: &mut Rng, std: f64, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.contains("norm.") {
        vec![1.0; n]
    } else {
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    };
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// The safetensors files of a checkpoint: those of model.safetensors.index.json when it
/// is sharded, else model.safetensors, else every *.safetensors file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| Error::context(format!("reading {}", index.display()), e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::context(format!("parsing {}", index.display()), e))?;
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
        .map_err(|e| Error::context(format!("reading the checkpoint folder {}", dir.display()), e))?
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
