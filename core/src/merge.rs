//! `fusellm merge`: weight merging, the paper's other way of combining models that share an
//! architecture and a tokenizer (its Table 7): the weighted average of the checkpoints'
//! parameters, or task arithmetic, `base + sum_i w_i (model_i - base)`.

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

/// How to combine.
pub struct Merge<'a> {
    pub models: &'a [PathBuf],
    /// One weight per model (uniform when empty).
    pub weights: &'a [f64],
    /// Task arithmetic against this base; a plain weighted average without it.
    pub base: Option<&'a Path>,
}

impl Merge<'_> {
    /// Writes the merged checkpoint to `out` (with the first model's config and tokenizer).
    pub fn write(&self, out: &Path) -> Result<()> {
        let first = self.models.first().ok_or_else(|| Error::msg("merge needs at least one model"))?;
        let weights: Vec<f64> = match self.weights {
            [] => vec![1.0 / self.models.len() as f64; self.models.len()],
            w if w.len() == self.models.len() => w.to_vec(),
            w => return Err(Error::msg(format!("{} weights for {} models", w.len(), self.models.len()))),
        };
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::msg(format!("a merge weight of {w}: every weight must be a finite number")));
        }
        if self.base.is_none() && weights.iter().all(|&w| w == 0.0) {
            return Err(Error::msg(
                "every merge weight is 0, which makes a model of zeros; give at least one model a weight",
            ));
        }
        let reference = tensors(first)?;
        let check = |dir: &Path, set: &BTreeMap<String, Tensor>| match first_difference(&reference, set) {
            Some(diff) => Err(Error::msg(format!(
                "{} and {} differ: {diff}; only checkpoints of one architecture merge",
                first.display(),
                dir.display()
            ))),
            None => Ok(()),
        };
        let base = match self.base {
            Some(dir) => Some(tensors(dir).and_then(|b| check(dir, &b).map(|()| b))?),
            None => None,
        };
        let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
        for (dir, &w) in self.models.iter().zip(&weights) {
            let model = if dir == first { reference.clone() } else { tensors(dir)? };
            check(dir, &model)?;
            for (name, t) in &model {
                let mut delta = t.to_dtype(DType::F32)?;
                if let Some(b) = &base {
                    delta = (delta - b[name].to_dtype(DType::F32)?)?;
                }
                let term = (delta * w)?;
                let total = match sum.remove(name) {
                    Some(acc) => (acc + term)?,
                    None => term,
                };
                sum.insert(name.clone(), total);
            }
        }
        let merged = sum
            .into_iter()
            .map(|(name, t)| {
                let t = match &base {
                    Some(b) => (t + b[&name].to_dtype(DType::F32)?)?,
                    None => t,
                };
                Ok((name.clone(), t.to_dtype(reference[&name].dtype())?))
            })
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        // Written beside `out` and renamed into place whole: no half-written model, and no
        // file of what `out` held before left next to the new weights.
        let partial = out.with_extension(format!("partial{}", std::process::id()));
        std::fs::create_dir_all(&partial).context(|| format!("creating {}", partial.display()))?;
        crate::train::copy_carried(first, &partial)?;
        candle_core::safetensors::save(&merged, partial.join("model.safetensors"))
            .context(|| format!("writing {}", partial.display()))?;
        if out.exists() {
            replaceable(out)?;
            std::fs::remove_dir_all(out).context(|| format!("replacing {}", out.display()))?;
        }
        std::fs::rename(&partial, out).context(|| format!("renaming {} to {}", partial.display(), out.display()))
    }
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
