//! `fusellm merge` and the `[merge]` stage: weight merging of models that share an
//! architecture and a tokenizer, by mergekit's methods with mergekit's parameter names
//! (`method.rs`), from a plan built in code or read from a mergekit YAML (`yaml.rs`).

mod method;
mod settings;
mod yaml;

pub use method::{Method, Param};
pub use settings::{depth, Condition, Setting};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Context, Error, Result};
use crate::model::weights::safetensors_files;

/// Every tensor of a checkpoint folder, by name.
fn tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for file in safetensors_files(dir)? {
        let loaded =
            candle_core::safetensors::load(&file, &Device::Cpu).context(|| format!("reading {}", file.display()))?;
        out.extend(loaded);
    }
    Ok(out)
}

/// The first tensor (in name order) that two checkpoints do not share with the same shape.
fn first_difference(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Option<String> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names.into_iter().find_map(|name| match (a.get(name), b.get(name)) {
        (Some(x), Some(y)) if x.dims() == y.dims() => None,
        (Some(x), Some(y)) => Some(format!("`{name}` has shape {:?} in one and {:?} in the other", x.dims(), y.dims())),
        (Some(_), None) | (None, Some(_)) => Some(format!("`{name}` is in only one of them")),
        (None, None) => None,
    })
}

/// The paper's two ways, as `fusellm merge --model ... [--weights] [--base]` gives them:
/// the weighted sum of the models (uniform weights by default), or task arithmetic,
/// `base + sum_i w_i (model_i - base)`; weights are not normalised.
pub struct Merge<'a> {
    pub models: &'a [PathBuf],
    /// One weight per model (uniform when empty).
    pub weights: &'a [f64],
    /// Task arithmetic against this base; a weighted sum without it.
    pub base: Option<&'a Path>,
}

impl Merge<'_> {
    /// Writes the merged checkpoint to `out` (with the config and tokenizer of the base, or
    /// of the first model without one).
    pub fn write(&self, out: &Path) -> Result<()> {
        let weights: Vec<f64> = match self.weights {
            [] => vec![1.0 / self.models.len().max(1) as f64; self.models.len()],
            w if w.len() == self.models.len() => w.to_vec(),
            w => return Err(Error::msg(format!("{} weights for {} models", w.len(), self.models.len()))),
        };
        if self.base.is_none() && weights.iter().all(|&w| w == 0.0) {
            return Err(Error::msg(
                "every merge weight is 0, which makes a model of zeros; give at least one model a weight",
            ));
        }
        let method = if self.base.is_some() { Method::TaskArithmetic } else { Method::Linear };
        let plan = MergePlan {
            method,
            models: self
                .models
                .iter()
                .zip(weights)
                .map(|(dir, w)| ModelSpec { dir: dir.clone(), params: BTreeMap::from([("weight".into(), w.into())]) })
                .collect(),
            base: self.base.map(Path::to_owned),
            params: BTreeMap::from([("normalize".into(), Setting::Flag(false))]),
            dtype: None,
        };
        plan.check()?;
        plan.write(out)
    }
}

/// A model of a merge and its own parameters.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub params: BTreeMap<String, Setting>,
}

/// A merge: the method, the models, the base, the global parameters, the output dtype (the
/// base's, or the first model's, when none).
#[derive(Clone, Debug)]
pub struct MergePlan {
    pub method: Method,
    pub models: Vec<ModelSpec>,
    pub base: Option<PathBuf>,
    pub params: BTreeMap<String, Setting>,
    pub dtype: Option<DType>,
}

/// A dtype by mergekit's name.
pub fn dtype_named(name: &str) -> std::result::Result<DType, String> {
    match name {
        "float32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "fp16" => Ok(DType::F16),
        other => Err(format!("dtype `{other}`: expected float32, bfloat16 or float16")),
    }
}

/// A method by mergekit's name.
pub fn method_named(name: &str) -> std::result::Result<Method, String> {
    Method::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        format!("merge method `{name}` is not one fusellm has (it has {})", names.join(", "))
    })
}

/// The number of layers a checkpoint's config.json declares (under any of the names the
/// families use).
fn layers(dir: &Path) -> Result<usize> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).context(|| format!("reading {}", file.display()))?;
    let in_file = |e: String| Error::msg(format!("{}: {e}", file.display()));
    let config = fusellm_sdk::HfConfig::parse(&text).map_err(in_file)?;
    for key in ["num_hidden_layers", "n_layers", "n_layer", "num_layers"] {
        if let Some(n) = config.opt_usize(key).map_err(in_file)? {
            return Ok(n);
        }
    }
    Err(Error::msg(format!("{}: no num_hidden_layers", file.display())))
}

impl MergePlan {
    /// Every parameter known to the method and given where it belongs; a base where the
    /// method needs one; finite numbers.
    pub fn check(&self) -> Result<()> {
        let m = self.method;
        let declared = m.params();
        let list = |per_model: bool| {
            declared.iter().filter(|p| p.per_model == per_model).map(|p| p.name).collect::<Vec<_>>().join(", ")
        };
        let unknown = |name: &str, per_model: bool, place: &str| {
            Error::msg(format!(
                "{place}: `{name}` is not a {} parameter of {} (its {} parameters: {})",
                if per_model { "per-model" } else { "global" },
                m.name(),
                if per_model { "per-model" } else { "global" },
                list(per_model)
            ))
        };
        if self.models.is_empty() {
            return Err(Error::msg(format!("{} needs models to merge", m.name())));
        }
        if m.needs_base() && self.base.is_none() {
            return Err(Error::msg(format!("{} needs a base_model", m.name())));
        }
        if m == Method::Slerp && self.models.iter().filter(|s| Some(&s.dir) != self.base.as_ref()).count() != 1 {
            return Err(Error::msg("slerp interpolates two models: the base_model and one other"));
        }
        for name in self.params.keys() {
            // A global value of a per-model parameter is every model's default, as in mergekit.
            if !declared.iter().any(|p| p.name == name) {
                return Err(unknown(name, false, "parameters"));
            }
        }
        for spec in &self.models {
            for name in spec.params.keys() {
                if !declared.iter().any(|p| p.name == name && p.per_model) {
                    return Err(unknown(name, true, &format!("model {}", spec.dir.display())));
                }
            }
        }
        for p in declared.iter().filter(|p| p.default.is_none()) {
            let given = self.params.contains_key(p.name)
                || (p.per_model && self.merged().all(|s| s.params.contains_key(p.name)));
            if !given {
                return Err(Error::msg(format!(
                    "{} needs `{}`{}",
                    m.name(),
                    p.name,
                    if p.per_model { " for every model" } else { "" }
                )));
            }
        }
        Ok(())
    }

    /// The models that are merged (the base aside, where it is also listed).
    fn merged(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.iter().filter(move |s| self.method == Method::Linear || Some(&s.dir) != self.base.as_ref())
    }

    /// The value of parameter `p` for tensor `name` at depth `t`: the model's own, else the
    /// global one, else the default.
    fn value(&self, p: &Param, model: Option<&ModelSpec>, name: &str, t: f64) -> Result<f64> {
        let own = model.and_then(|m| m.params.get(p.name));
        let setting = own.or_else(|| self.params.get(p.name));
        let value = setting.and_then(|s| s.at(name, t)).or(p.default).ok_or_else(|| {
            Error::msg(format!("`{}` has no value for tensor {name} (no condition matches it)", p.name))
        })?;
        if !value.is_finite() {
            return Err(Error::msg(format!("`{}` is {value} for tensor {name}: give a finite number", p.name)));
        }
        Ok(value)
    }

    /// Writes the merged checkpoint to `out`, with the config and tokenizer of the base (or
    /// of the first model).
    pub fn write(&self, out: &Path) -> Result<()> {
        let located = |dir: &Path| crate::hub::locate(dir).map_err(Error::msg);
        let specs: Vec<&ModelSpec> = self.merged().collect();
        let models: Vec<PathBuf> = specs.iter().map(|s| located(&s.dir)).collect::<Result<_>>()?;
        let base_dir = self.base.as_deref().map(located).transpose()?;
        let template = base_dir.clone().unwrap_or_else(|| models[0].clone());
        let reference = tensors(&template)?;
        let check = |dir: &Path, set: &BTreeMap<String, Tensor>| match first_difference(&reference, set) {
            Some(diff) => Err(Error::msg(format!(
                "{} and {} differ: {diff}; only checkpoints of one architecture merge",
                template.display(),
                dir.display()
            ))),
            None => Ok(()),
        };
        let loaded: Vec<BTreeMap<String, Tensor>> = models
            .iter()
            .map(|dir| {
                let set = if *dir == template { reference.clone() } else { tensors(dir)? };
                check(dir, &set).map(|()| set)
            })
            .collect::<Result<_>>()?;
        let layers = layers(&template)?;
        // DARE's masks: from `random_seed` and the tensor's place, the same on every run.
        let seed = self.params.get("random_seed").and_then(|s| s.at("", 0.0)).unwrap_or(0.0) as u64;
        let declared = self.method.params();
        let mut merged = std::collections::HashMap::new();
        for (index, (name, like)) in reference.iter().enumerate() {
            let t = depth(name, layers);
            let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
            let base = base_dir.as_ref().map(|_| flat(like)).transpose()?;
            let values: Vec<Vec<f32>> = loaded.iter().map(|set| flat(&set[name])).collect::<Result<_>>()?;
            let per_model = specs
                .iter()
                .map(|s| {
                    declared
                        .iter()
                        .filter(|p| p.per_model)
                        .map(|p| Ok((p.name, self.value(p, Some(s), name, t)?)))
                        .collect::<Result<BTreeMap<_, _>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            let global = declared
                .iter()
                .filter(|p| !p.per_model)
                .map(|p| Ok((p.name, self.value(p, None, name, t)?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let inputs = method::Inputs {
                base: base.as_deref(),
                models: &slices,
                per_model: &per_model,
                global: &global,
                seed: seed ^ (index as u64).wrapping_mul(0xd6e8_feb8_6659_fd93),
            };
            let out = self.method.merge(&inputs);
            if let Some(bad) = out.iter().find(|v| !v.is_finite()) {
                return Err(Error::msg(format!("merging {name} gave {bad}: check the parameters and the models")));
            }
            let dtype = self.dtype.unwrap_or(like.dtype());
            merged.insert(name.clone(), Tensor::from_vec(out, like.dims(), &Device::Cpu)?.to_dtype(dtype)?);
        }
        write_checkpoint(&template, &merged, out)
    }
}

/// Writes `tensors` with `like`'s config and tokenizer files into `out`: beside it first and
/// renamed into place whole, so no half-written model, and no file of what `out` held before
/// left next to the new weights.
fn write_checkpoint(like: &Path, tensors: &std::collections::HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let partial = out.with_extension(format!("partial{}", std::process::id()));
    std::fs::create_dir_all(&partial).context(|| format!("creating {}", partial.display()))?;
    crate::train::copy_carried(like, &partial)?;
    candle_core::safetensors::save(tensors, partial.join("model.safetensors"))
        .context(|| format!("writing {}", partial.display()))?;
    if out.exists() {
        replaceable(out)?;
        std::fs::remove_dir_all(out).context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&partial, out).context(|| format!("renaming {} to {}", partial.display(), out.display()))
}

/// An existing `out` is replaced only when it holds what a merge writes and nothing else.
fn replaceable(out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(out).context(|| format!("reading {}", out.display()))?;
    for entry in entries {
        let name = entry.context(|| format!("reading {}", out.display()))?.file_name().to_string_lossy().into_owned();
        if name != "model.safetensors" && !crate::train::CARRIED.contains(&name.as_str()) {
            return Err(Error::msg(format!(
                "{} exists and holds {name}, which a merge does not write; choose a new folder for --out (or remove it)",
                out.display()
            )));
        }
    }
    Ok(())
}
