//! mergekit's YAML merge config (`mergekit-yaml merge.yml OUT`): `merge_method`, `models`
//! (each a `model` and its `parameters`), `base_model`, global `parameters`, `dtype`,
//! `out_dtype`, `tokenizer_source: base`, and `slices` where each covers whole models.
//! Model paths are read as mergekit reads them: relative to the working folder (or Hub ids).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{MergePlan, ModelSpec, Setting};
use crate::error::{Context, Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Yaml {
    merge_method: String,
    #[serde(default)]
    models: Vec<YamlModel>,
    base_model: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, Setting>,
    dtype: Option<String>,
    out_dtype: Option<String>,
    tokenizer_source: Option<String>,
    slices: Option<Vec<Slice>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlModel {
    model: String,
    #[serde(default)]
    parameters: BTreeMap<String, Setting>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Slice {
    sources: Vec<SliceSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SliceSource {
    model: String,
    layer_range: [usize; 2],
    #[serde(default)]
    parameters: BTreeMap<String, Setting>,
}

impl MergePlan {
    /// The plan of a mergekit YAML file.
    pub fn from_yaml(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).context(|| format!("reading {}", file.display()))?;
        let yaml: Yaml = serde_norway::from_str(&text).map_err(|e| {
            Error::msg(format!("{}: not a mergekit config ({e}); see mergekit's README for its keys", file.display()))
        })?;
        let at = |what: String| Error::msg(format!("{}: {what}", file.display()));
        let method = super::method_named(&yaml.merge_method).map_err(|e| at(format!("merge_method: {e}")))?;
        if let Some(source) = yaml.tokenizer_source.as_deref().filter(|s| *s != "base") {
            return Err(at(format!(
                "tokenizer_source `{source}`: fusellm writes the base model's tokenizer only (`base`); a union of vocabularies is alignment's job"
            )));
        }
        let (models, range_end) = match yaml.slices {
            Some(slices) => {
                let (models, end) = whole_model_slices(slices).map_err(at)?;
                (models, Some(end))
            }
            None => (yaml.models.into_iter().map(|m| (m.model, m.parameters)).collect(), None),
        };
        let dtype = yaml.out_dtype.or(yaml.dtype).as_deref().map(super::dtype_named).transpose().map_err(at)?;
        let plan = MergePlan {
            method,
            models: models.into_iter().map(|(dir, params)| ModelSpec { dir: PathBuf::from(dir), params }).collect(),
            base: yaml.base_model.map(PathBuf::from),
            params: yaml.parameters,
            dtype,
        };
        plan.check().map_err(|e| at(e.to_string()))?;
        if let Some(end) = range_end {
            let layers = super::layers(&plan.models[0].dir)?;
            if end != layers {
                return Err(at(format!(
                    "layer_range [0, {end}] of models with {layers} layers: fusellm merges whole models"
                )));
            }
        }
        Ok(plan)
    }
}

/// Slices that each take every layer of their models are the models themselves; anything
/// finer (frankenmerges, layer ranges) is not supported.
type Models = Vec<(String, BTreeMap<String, Setting>)>;

/// The models of whole-model slices, and the end of their layer range.
fn whole_model_slices(slices: Vec<Slice>) -> std::result::Result<(Models, usize), String> {
    let [slice] = <[Slice; 1]>::try_from(slices)
        .map_err(|s| format!("{} slices: fusellm merges whole models (one slice over all layers)", s.len()))?;
    let ranges: Vec<[usize; 2]> = slice.sources.iter().map(|s| s.layer_range).collect();
    if ranges.windows(2).any(|w| w[0] != w[1]) || ranges.first().is_some_and(|r| r[0] != 0) {
        return Err(format!("layer ranges {ranges:?}: fusellm merges whole models (every source over 0..layers)"));
    }
    let end = ranges.first().map_or(0, |r| r[1]);
    Ok((slice.sources.into_iter().map(|s| (s.model, s.parameters)).collect(), end))
}
