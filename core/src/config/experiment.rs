//! The experiment sections of a config: what `fusellm run` reads besides the plugin
//! choices. Every value is checked for its type and range here; what needs the files
//! (models exist, shapes fit) is checked by `fusellm validate` before any compute.

use std::path::{Path, PathBuf};

use fusellm_sdk::PluginKind;

use super::located::Section;
use super::{plugin_choice, ConfigError, PluginChoice, PluginSpec};
use crate::model::loss::Divergence;
use crate::split::OnBadInput;
use crate::store::Options;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::{Decay, LambdaSchedule, LrSchedule};
use crate::train::{Batching, Precision, TrainConfig};

/// A path written in the config, resolved against the config's folder, with where it was
/// written so that a missing file is reported there.
#[derive(Clone, Debug)]
pub struct PathAt {
    pub path: PathBuf,
    pub at: ConfigError,
}

impl PathAt {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError { message: message.into(), ..self.at.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct RunSection {
    /// The run folder: stage caches, the record of the run, evaluation results.
    pub dir: PathBuf,
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`: where the models run.
    pub device: String,
    /// The dtype the frozen models (precompute, eval) compute in; training has its own.
    pub dtype: Precision,
}

#[derive(Clone, Debug)]
pub struct DataSection {
    pub corpus: Vec<PathAt>,
    pub text_fields: Vec<String>,
    pub max_len: usize,
    pub margin: usize,
    pub on_bad: OnBadInput,
}

/// A model of the experiment: the target or a source.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub name: String,
    pub dir: PathAt,
    /// The adapter that reads the checkpoint (a registered name, or a dylib or WASM file);
    /// without one, the adapter that declares its config.json's `model_type`.
    pub adapter: Option<PluginChoice>,
}

#[derive(Clone, Debug)]
pub struct AlignSection {
    pub sequence: PluginChoice,
    pub vocab: PluginChoice,
    /// The paper's projection, defects included.
    pub compat: bool,
}

#[derive(Clone, Debug)]
pub struct EvalSection {
    /// Named evaluation sets (JSONL with a `text` field, or plain text).
    pub sets: Vec<(String, PathAt)>,
    pub window: usize,
    pub batch_tokens: usize,
}

/// Where the experiment sections of a config are read; `base` resolves relative paths.
pub struct Reader<'s, 'd, 'a> {
    pub root: &'s Section<'d, 'a>,
    pub base: &'s Path,
}

fn positive(section: &Section<'_, '_>, key: &str, default: usize) -> Result<usize, ConfigError> {
    match section.int(key)? {
        None => Ok(default),
        Some(n) if n > 0 => Ok(n as usize),
        Some(n) => Err(section.error_at(key, format!("must be a positive integer, not {n}"))),
    }
}

fn non_negative(section: &Section<'_, '_>, key: &str, default: u64) -> Result<u64, ConfigError> {
    match section.int(key)? {
        None => Ok(default),
        Some(n) if n >= 0 => Ok(n as u64),
        Some(n) => Err(section.error_at(key, format!("must be zero or a positive integer, not {n}"))),
    }
}

/// A number that `ok` accepts (NaN never is), else an error saying `what` it must be.
fn float_where(
    section: &Section<'_, '_>,
    key: &str,
    default: f64,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<f64, ConfigError> {
    match section.float(key)? {
        None => Ok(default),
        Some(x) if x.is_finite() && ok(x) => Ok(x),
        Some(x) => Err(section.error_at(key, format!("must be {what}, not {x}"))),
    }
}

fn fraction(section: &Section<'_, '_>, key: &str, default: f64) -> Result<f64, ConfigError> {
    float_where(section, key, default, |x| (0.0..=1.0).contains(&x), "between 0 and 1")
}

/// An exponential decay rate of Adam: 1 would never forget, and divide by zero in the bias
/// correction.
fn decay_rate(section: &Section<'_, '_>, key: &str, default: f64) -> Result<f64, ConfigError> {
    float_where(section, key, default, |x| (0.0..1.0).contains(&x), "at least 0 and below 1")
}

fn choice<'c>(
    section: &Section<'_, '_>,
    key: &str,
    options: &[&'c str],
    default: &'c str,
) -> Result<&'c str, ConfigError> {
    match section.string(key)? {
        None => Ok(default),
        Some(v) => options.iter().find(|o| **o == v).copied().ok_or_else(|| {
            section.error_at(
                key,
                format!(
                    "`{v}` is not one of {}{}",
                    options.join(", "),
                    fusellm_sdk::suggest::did_you_mean(v, options.iter().copied())
                ),
            )
        }),
    }
}

/// A section's `dtype`: f32 (the default), bf16 or f16.
fn precision(section: &Section<'_, '_>) -> Result<Precision, ConfigError> {
    Ok(choice(section, "dtype", &Precision::NAMES, "f32")?.parse().expect("one of the names"))
}

impl Reader<'_, '_, '_> {
    fn path(&self, section: &Section<'_, '_>, key: &str, value: &str) -> PathAt {
        PathAt { path: crate::files::lexical(&self.base.join(value)), at: section.error_at(key, "") }
    }

    pub fn run(&self, config_path: &Path) -> Result<RunSection, ConfigError> {
        let stem = config_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        let default =
            RunSection { dir: self.base.join("runs").join(stem), seed: 0, device: "cpu".into(), dtype: Precision::F32 };
        let Some(s) = self.root.subsection("run")? else { return Ok(default) };
        s.allow_only(&["dir", "seed", "device", "dtype"])?;
        let device = s.string("device")?.unwrap_or("cpu");
        if !(device == "cpu"
            || device == "cuda"
            || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(s.error_at("device", format!("`{device}`: expected cpu, cuda or cuda:N")));
        }
        Ok(RunSection {
            dir: s.string("dir")?.map(|d| crate::files::lexical(&self.base.join(d))).unwrap_or(default.dir),
            seed: non_negative(&s, "seed", 0)?,
            device: device.into(),
            dtype: precision(&s)?,
        })
    }

    pub fn data(&self) -> Result<Option<DataSection>, ConfigError> {
        let Some(s) = self.root.subsection("data")? else { return Ok(None) };
        s.allow_only(&["corpus", "text_fields", "max_len", "margin", "skip_bad"])?;
        let corpus =
            s.strings("corpus")?.ok_or_else(|| s.error_at("corpus", "missing required key: the corpus files"))?;
        let max_len = positive(&s, "max_len", 2048)?;
        let margin = non_negative(&s, "margin", 48.min(max_len as u64 / 8))? as usize;
        if margin >= max_len {
            return Err(s.error_at(
                "margin",
                format!("a margin of {margin} tokens leaves nothing of pieces of {max_len}; use less than max_len"),
            ));
        }
        Ok(Some(DataSection {
            corpus: corpus.iter().map(|c| self.path(&s, "corpus", c)).collect(),
            text_fields: s.strings("text_fields")?.unwrap_or_else(|| vec!["text".into()]),
            max_len,
            margin,
            on_bad: if s.bool("skip_bad")? == Some(true) { OnBadInput::Skip } else { OnBadInput::Stop },
        }))
    }

    fn model(&self, s: &Section<'_, '_>, default_name: &str) -> Result<ModelRef, ConfigError> {
        s.allow_only(&["model", "name", "adapter"])?;
        let dir =
            s.string("model")?.ok_or_else(|| s.error_at("model", "missing required key: the checkpoint folder"))?;
        let name = s.string("name")?.map(str::to_string).unwrap_or_else(|| {
            Path::new(dir).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| default_name.into())
        });
        let adapter = match s.table.contains_key("adapter") {
            true => Some(super::named_plugin(s, "adapter", PluginKind::Adapter, self.base)?),
            false => None,
        };
        Ok(ModelRef { name, dir: self.path(s, "model", dir), adapter })
    }

    pub fn target(&self) -> Result<Option<ModelRef>, ConfigError> {
        self.root.subsection("target")?.map(|s| self.model(&s, "target")).transpose()
    }

    pub fn sources(&self) -> Result<Vec<ModelRef>, ConfigError> {
        let sources: Vec<ModelRef> = self
            .root
            .tables("sources")?
            .iter()
            .enumerate()
            .map(|(i, s)| self.model(s, &format!("source{i}")))
            .collect::<Result<_, _>>()?;
        if let Some(twin) =
            sources.iter().enumerate().find_map(|(i, a)| sources[..i].iter().find(|b| b.name == a.name).map(|_| a))
        {
            return Err(twin.dir.error(format!("two sources are named `{}`; give one a `name`", twin.name)));
        }
        Ok(sources)
    }

    pub fn precompute(&self) -> Result<Options, ConfigError> {
        let default = Options::default();
        let Some(s) = self.root.subsection("precompute")? else { return Ok(default) };
        s.allow_only(&["k", "dtype", "residual", "docs_per_shard", "batch_tokens"])?;
        Ok(Options {
            k: positive(&s, "k", default.k)?,
            half: choice(&s, "dtype", &["f16", "f32"], "f16")? == "f16",
            residual: s.bool("residual")?.unwrap_or(false),
            docs_per_shard: positive(&s, "docs_per_shard", default.docs_per_shard)?,
            batch_tokens: positive(&s, "batch_tokens", default.batch_tokens)?,
        })
    }

    pub fn align(&self) -> Result<AlignSection, ConfigError> {
        let s = self.root.subsection("align")?;
        if let Some(s) = &s {
            s.allow_only(&["sequence", "vocab", "compat"])?;
        }
        let pick = |key: &str, kind: PluginKind, default: &str| -> Result<PluginChoice, ConfigError> {
            match s.as_ref().map(|s| s.subsection(key)).transpose()?.flatten() {
                Some(sub) => plugin_choice(&sub, kind, self.base),
                None => Ok(PluginChoice::named(kind, default, self.root.error_at("align", ""))),
            }
        };
        Ok(AlignSection {
            sequence: pick("sequence", PluginKind::SequenceAligner, "dtw")?,
            vocab: pick("vocab", PluginKind::VocabMapper, "mined")?,
            compat: s.as_ref().map(|s| s.bool("compat")).transpose()?.flatten().unwrap_or(false),
        })
    }

    pub fn train(&self, seed: u64) -> Result<Option<TrainConfig>, ConfigError> {
        let Some(s) = self.root.subsection("train")? else { return Ok(None) };
        s.allow_only(&[
            "steps",
            "batch_size",
            "seq_len",
            "packing",
            "accumulation",
            "lr",
            "warmup_steps",
            "decay",
            "min_lr_ratio",
            "lambda",
            "lambda_end",
            "divergence",
            "temperature",
            "weight_decay",
            "beta1",
            "beta2",
            "eps",
            "clip",
            "checkpoint_every",
            "keep_checkpoints",
            "dtype",
        ])?;
        let steps = positive(&s, "steps", 100)? as u64;
        let lr = s.float("lr")?.unwrap_or(1e-5);
        if !(lr > 0.0 && lr < 1.0) {
            return Err(s.error_at("lr", format!("a learning rate of {lr}: use a positive value below 1")));
        }
        let lambda = fraction(&s, "lambda", 0.9)?;
        let positive_float = |key: &str, default: f64| float_where(&s, key, default, |x| x > 0.0, "a positive number");
        let temperature = positive_float("temperature", 1.0)?;
        let clip = float_where(&s, "clip", 1.0, |x| x >= 0.0, "a positive gradient norm, or 0 for no clipping")?;
        let adamw = AdamWConfig {
            beta1: decay_rate(&s, "beta1", 0.9)?,
            beta2: decay_rate(&s, "beta2", 0.95)?,
            eps: positive_float("eps", 1e-8)?,
            weight_decay: float_where(&s, "weight_decay", 0.1, |x| x >= 0.0, "zero or positive")?,
        };
        Ok(Some(TrainConfig {
            steps,
            batching: Batching {
                seq_len: positive(&s, "seq_len", 2048)?,
                batch_size: positive(&s, "batch_size", 8)?,
                packing: s.bool("packing")?.unwrap_or(true),
                seed,
            },
            accumulation: positive(&s, "accumulation", 1)? as u64,
            lr: LrSchedule {
                peak: lr,
                warmup_steps: non_negative(&s, "warmup_steps", 0)?,
                decay: match choice(&s, "decay", &["cosine", "linear", "constant"], "cosine")? {
                    "linear" => Decay::Linear,
                    "constant" => Decay::Constant,
                    _ => Decay::Cosine,
                },
                min_ratio: fraction(&s, "min_lr_ratio", 0.0)?,
            },
            lambda: LambdaSchedule { start: lambda, end: fraction(&s, "lambda_end", lambda)? },
            divergence: if choice(&s, "divergence", &["ce", "kl"], "ce")? == "kl" {
                Divergence::Kl
            } else {
                Divergence::Ce
            },
            temperature,
            adamw,
            precision: precision(&s)?,
            clip: (clip > 0.0).then_some(clip),
            checkpoint_every: positive(&s, "checkpoint_every", steps as usize)? as u64,
            keep_checkpoints: positive(&s, "keep_checkpoints", 2)?,
        }))
    }

    pub fn eval(&self) -> Result<Option<EvalSection>, ConfigError> {
        let Some(s) = self.root.subsection("eval")? else { return Ok(None) };
        s.allow_only(&["sets", "window", "batch_tokens"])?;
        let sets = s
            .subsection("sets")?
            .ok_or_else(|| s.error_at("sets", "missing required key: a table of name = \"file\""))?;
        let sets = sets
            .table
            .iter()
            .map(|(name, value)| {
                let name = name.get_ref().to_string();
                let path =
                    value.get_ref().as_str().ok_or_else(|| sets.error_at(&name, "expected the path of a file"))?;
                Ok((name.clone(), self.path(&sets, &name, path)))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Some(EvalSection {
            sets,
            window: positive(&s, "window", 1024)?,
            batch_tokens: positive(&s, "batch_tokens", 4096)?,
        }))
    }
}

impl PluginChoice {
    /// A choice the config left to its default, located at `at`.
    fn named(kind: PluginKind, name: &str, at: ConfigError) -> Self {
        Self {
            kind,
            plugin: PluginSpec::Named(name.into()),
            params: Default::default(),
            plugin_error: at,
            param_errors: Default::default(),
        }
    }
}
