//! Low-rank adaptation (LoRA, Hu et al. 2021) as PEFT defines it: a targeted projection
//! `W` computes `x W^T + (alpha / r) (dropout(x) A^T) B^T`, with `A: [r, in]` initialised
//! as PEFT's Kaiming-uniform and `B: [out, r]` zero, so that training starts from the
//! base model. Only `A` and `B` train; the adapter is saved under PEFT's key names
//! (`base_model.model.<module>.lora_A.weight`), and merging it gives `W + (alpha / r) B A`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use fusellm_sdk::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::Kernels;

/// Which projections get an adapter, and its shape: PEFT's `r`, `lora_alpha`,
/// `lora_dropout` and `target_modules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// The probability of zeroing an input element of an adapter while training.
    pub dropout: f64,
    /// Module names as PEFT matches them: a projection is targeted when its module path
    /// (its checkpoint name without `.weight`) is a target or ends with `.` and a target.
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// PEFT's `scaling`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether the projection whose weight is `checkpoint_name` gets an adapter.
    pub fn targets_module<'a>(&self, checkpoint_name: &'a str) -> Option<&'a str> {
        let module = checkpoint_name.strip_suffix(".weight")?;
        self.targets.iter().any(|t| matches(module, t)).then_some(module)
    }

    /// The targets that match none of `modules` (PEFT refuses those too).
    pub fn unmatched<'a>(&'a self, modules: &[&str]) -> Vec<&'a str> {
        self.targets.iter().filter(|t| !modules.iter().any(|m| matches(m, t))).map(String::as_str).collect()
    }

    /// PEFT's key of `part` ("lora_A" or "lora_B") of the adapter on `module`.
    pub fn key(module: &str, part: &str) -> String {
        format!("base_model.model.{module}.{part}.weight")
    }

    /// The adapter_config.json PEFT writes for this adapter on `base` (a CAUSAL_LM task).
    pub fn peft_config(&self, base: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
        })
    }

    /// The spec of a PEFT adapter_config.json, refusing what fusellm does not compute the
    /// same way (another PEFT type, rsLoRA, DoRA, trained biases, transposed weights).
    pub fn from_peft(json: &serde_json::Value) -> std::result::Result<(Self, String), String> {
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        if let Some(kind) = field("peft_type").and_then(|v| v.as_str()).filter(|k| *k != "LORA") {
            return Err(format!("`peft_type` is {kind}; fusellm reads LORA adapters"));
        }
        for (key, plain) in [("use_rslora", false), ("use_dora", false), ("fan_in_fan_out", false)] {
            if field(key).and_then(|v| v.as_bool()).unwrap_or(plain) != plain {
                return Err(format!("`{key}` is set; fusellm computes plain LoRA"));
            }
        }
        if field("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
            return Err("`bias` is not \"none\"; fusellm's adapters train no biases".into());
        }
        let rank = field("r").and_then(|v| v.as_u64()).filter(|&r| r > 0).ok_or("`r` must be a positive integer")?;
        let alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
        let targets = match field("target_modules") {
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            Some(serde_json::Value::Array(all)) => all
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or("`target_modules` must be strings")?,
            _ => return Err("`target_modules` must name the adapted modules".into()),
        };
        let base = field("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let dropout = field("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
        Ok((Self { rank: rank as usize, alpha, dropout, targets }, base))
    }
}

fn matches(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|rest| rest.ends_with('.'))
}

/// Where the adapters' tensors come from: a fresh initialisation from a seed, or a saved
/// adapter (adapter_model.safetensors).
pub enum AdapterSource {
    Init(Rng),
    File(MmapedSafetensors),
}

/// One projection's adapter.
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// Mixed into the forward pass's dropout seed, so that each adapter draws its own mask.
    salt: u64,
}

impl Lora {
    /// A and B of `module` (`[rank, inp]`, `[out, rank]`), from `source`.
    pub fn make(
        spec: &LoraSpec,
        source: &mut AdapterSource,
        module: &str,
        (out, inp): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, [(String, Tensor); 2])> {
        let r = spec.rank;
        let (ka, kb) = (LoraSpec::key(module, "lora_A"), LoraSpec::key(module, "lora_B"));
        let (a, b) = match source {
            AdapterSource::Init(rng) => {
                // kaiming_uniform_(a = sqrt(5)): bound sqrt(6 / ((1 + 5) fan_in)).
                let bound = 1.0 / (inp as f64).sqrt();
                let values = (0..r * inp).map(|_| ((2.0 * rng.unit() - 1.0) * bound) as f32).collect();
                (Tensor::from_vec(values, (r, inp), device)?, Tensor::zeros((out, r), DType::F32, device)?)
            }
            AdapterSource::File(files) => {
                (saved(files, &ka, &[r, inp], device)?, saved(files, &kb, &[out, r], device)?)
            }
        };
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let salt = module.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ c as u64).wrapping_mul(0x100_0000_01b3));
        let lora = Self { a: a.clone(), b: b.clone(), scale: spec.scale(), dropout: spec.dropout, salt };
        Ok((lora, [(ka, a), (kb, b)]))
    }

    /// Replaces A and B by the tensors given (the trainable `Var`s made of them).
    pub fn with(self, a: Tensor, b: Tensor) -> Self {
        Self { a, b, ..self }
    }

    /// The adapter's term for input `x`; `dropout_seed` is set in training only.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>, k: Kernels) -> candle_core::Result<Tensor> {
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => (x * self.dropout_mask(x, seed)?)?,
            _ => x.clone(),
        };
        k.linear(&k.linear(&x, &self.a, None)?, &self.b, None)? * self.scale
    }

    /// Inverted dropout: each element kept with probability `1 - p` and scaled by
    /// `1 / (1 - p)`, drawn from the seed (the same mask when a checkpointed block is
    /// recomputed).
    fn dropout_mask(&self, x: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        let mut rng = Rng::new(seed ^ self.salt);
        let keep = (1.0 / (1.0 - self.dropout)) as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.unit() < self.dropout { 0.0 } else { keep }).collect();
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
    }
}

fn saved(files: &MmapedSafetensors, key: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
    let tensor = files.load(key, device).map_err(|_| Error::msg(format!("the adapter has no tensor `{key}`")))?;
    if tensor.dims() != shape {
        return Err(Error::msg(format!(
            "the adapter's `{key}` has shape {:?}; the adapter config and the model imply {shape:?}",
            tensor.dims()
        )));
    }
    Ok(tensor)
}

/// Writes the base checkpoint `base` with every adapted weight replaced by
/// `W + (alpha / r) B A` into `out`: the same safetensors files (one at a time in memory),
/// each tensor in its stored dtype, and the shard index when there is one.
pub fn merge(base: &Path, adapter: &HashMap<String, Tensor>, spec: &LoraSpec, out: &Path) -> Result<()> {
    let mut used = 0;
    for file in crate::weights::safetensors_files(base)? {
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::context(format!("reading {}", file.display()), e))?;
        let mut merged = HashMap::with_capacity(tensors.len());
        for (name, w) in tensors {
            let w = match spec.targets_module(&name) {
                Some(module) if adapter.contains_key(&LoraSpec::key(module, "lora_A")) => {
                    used += 1;
                    let part =
                        |p: &str| adapter[&LoraSpec::key(module, p)].to_device(&Device::Cpu)?.to_dtype(DType::F32);
                    let delta = (part("lora_B")?.matmul(&part("lora_A")?)? * spec.scale())?;
                    (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?
                }
                _ => w,
            };
            merged.insert(name, w);
        }
        let name = file.file_name().expect("a safetensors file has a name");
        candle_core::safetensors::save(&merged, out.join(name))
            .map_err(|e| Error::context(format!("writing the merged {}", out.join(name).display()), e))?;
    }
    if used * 2 != adapter.len() {
        return Err(Error::msg(format!(
            "{} of the adapter's {} matrices have no weight in {} to merge into: is it this adapter's base?",
            adapter.len() - used * 2,
            adapter.len(),
            base.display()
        )));
    }
    let index = base.join("model.safetensors.index.json");
    if index.exists() {
        std::fs::copy(&index, out.join("model.safetensors.index.json"))
            .map_err(|e| Error::context(format!("copying {}", index.display()), e))?;
    }
    Ok(())
}
