//! The experiment sections of a config: what `fusellm run` reads besides the plugin
//! choices, built from the serde types of `raw.rs`. Every value is checked for its range
//! here (negative counts, NaN, a decay rate of 1 are errors at their line, never wrapped or
//! clamped); what needs the files (models exist, shapes fit) is checked by `fusellm
//! validate` before any compute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fusellm_sdk::PluginKind;
use toml::Spanned;

use super::located::Doc;
use super::raw::{self, RawModel};
use super::{ConfigError, PluginChoice};
use crate::merge::{MergePlan, Method, ModelSpec, Setting};
use crate::model::lora::LoraSpec;
use crate::model::loss::Divergence;
use crate::split::OnBadInput;
use crate::store::Options;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::{LambdaSchedule, LrSchedule};
use crate::train::{Batching, LoraTraining, Precision, TrainConfig};

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

/// `[merge]`: FuseChat's recipe. The target is fused with each source alone (one trained
/// target per source), and those targets are merged against the untrained target by a
/// mergekit method.
#[derive(Clone, Debug)]
pub struct MergeSection {
    pub method: Method,
    /// Global parameters, mergekit's names.
    pub params: BTreeMap<String, Setting>,
    /// Per-model parameters, by source name.
    pub models: BTreeMap<String, BTreeMap<String, Setting>>,
    /// The merged weights' dtype (the target's when none).
    pub dtype: Option<candle_core::DType>,
    /// Whether FuseLLM's fusion of all sources is trained too, and evaluated beside.
    pub all_sources: bool,
}

impl MergeSection {
    /// The merge of the pairwise targets (`(source name, checkpoint)`, in the sources'
    /// order) against `base`.
    pub fn plan(&self, base: &Path, pairwise: &[(String, PathBuf)]) -> MergePlan {
        let models = pairwise
            .iter()
            .map(|(name, dir)| ModelSpec {
                dir: dir.clone(),
                params: self.models.get(name).cloned().unwrap_or_default(),
            })
            .collect();
        MergePlan {
            method: self.method,
            models,
            base: Some(base.to_owned()),
            params: self.params.clone(),
            dtype: self.dtype,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EvalSection {
    /// Named evaluation sets (JSONL with a `text` field, or plain text).
    pub sets: Vec<(String, PathAt)>,
    pub window: usize,
    pub batch_tokens: usize,
}

/// Where the sections' values are checked: the document (for locations) and the folder
/// relative paths are resolved against.
pub struct Reader<'s> {
    pub doc: &'s Doc<'s>,
    pub base: &'s Path,
}

/// One section being read: its dotted key and span, for errors at a key it lacks.
#[derive(Clone, Copy)]
struct At<'s> {
    doc: &'s Doc<'s>,
    section: &'s str,
    span: (usize, usize),
}

impl At<'_> {
    fn key(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn error<T>(&self, key: &str, value: Option<&Spanned<T>>, message: impl Into<String>) -> ConfigError {
        let span = value.map_or(self.span.0..self.span.1, Spanned::span);
        self.doc.error(span, &self.key(key), message)
    }

    fn missing(&self, key: &str, what: &str) -> ConfigError {
        self.error::<()>(key, None, format!("missing required key: {what}"))
    }

    /// A number that `ok` accepts (NaN never is), else an error saying `what` it must be.
    fn float(
        &self,
        key: &str,
        value: &Option<Spanned<f64>>,
        default: f64,
        ok: impl Fn(f64) -> bool,
        what: &str,
    ) -> Result<f64, ConfigError> {
        match value {
            None => Ok(default),
            Some(x) if x.get_ref().is_finite() && ok(*x.get_ref()) => Ok(*x.get_ref()),
            Some(x) => Err(self.error(key, Some(x), format!("must be {what}, not {}", x.get_ref()))),
        }
    }

    fn fraction(&self, key: &str, value: &Option<Spanned<f64>>, default: f64) -> Result<f64, ConfigError> {
        self.float(key, value, default, |x| (0.0..=1.0).contains(&x), "between 0 and 1")
    }

    /// An exponential decay rate of Adam: 1 would never forget, and divide by zero in the
    /// bias correction.
    fn decay_rate(&self, key: &str, value: &Option<Spanned<f64>>, default: f64) -> Result<f64, ConfigError> {
        self.float(key, value, default, |x| (0.0..1.0).contains(&x), "at least 0 and below 1")
    }

    fn positive(&self, key: &str, value: &Option<Spanned<i64>>, default: usize) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if *n.get_ref() > 0 => Ok(*n.get_ref() as usize),
            Some(n) => Err(self.error(key, Some(n), format!("must be a positive integer, not {}", n.get_ref()))),
        }
    }

    fn non_negative(&self, key: &str, value: &Option<Spanned<i64>>, default: u64) -> Result<u64, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if *n.get_ref() >= 0 => Ok(*n.get_ref() as u64),
            Some(n) => {
                Err(self.error(key, Some(n), format!("must be zero or a positive integer, not {}", n.get_ref())))
            }
        }
    }
}

impl<'s> Reader<'s> {
    fn at<'x, T>(&'x self, section: &'x str, value: Option<&Spanned<T>>) -> At<'x> {
        let span = value.map_or(0..0, Spanned::span);
        At { doc: self.doc, section, span: (span.start, span.end) }
    }

    fn path(&self, at: &At<'_>, key: &str, value: &str, span: std::ops::Range<usize>) -> PathAt {
        PathAt { path: crate::files::lexical(&self.base.join(value)), at: self.doc.error(span, &at.key(key), "") }
    }

    pub fn run(&self, config_path: &Path, raw: Option<Spanned<raw::RawRun>>) -> Result<RunSection, ConfigError> {
        let stem = config_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        let at = self.at("run", raw.as_ref());
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let device = raw.device.as_ref().map_or("cpu", |d| d.get_ref().as_str());
        if !(device == "cpu"
            || device == "cuda"
            || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(at.error("device", raw.device.as_ref(), format!("`{device}`: expected cpu, cuda or cuda:N")));
        }
        Ok(RunSection {
            dir: crate::files::lexical(&match &raw.dir {
                Some(d) => self.base.join(d),
                None => self.base.join("runs").join(stem),
            }),
            seed: at.non_negative("seed", &raw.seed, 0)?,
            device: device.into(),
            dtype: raw.dtype.unwrap_or_default(),
        })
    }

    pub fn data(&self, raw: Option<Spanned<raw::RawData>>) -> Result<Option<DataSection>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = self.at("data", Some(&raw));
        let raw = raw.into_inner();
        let corpus = raw.corpus.ok_or_else(|| at.missing("corpus", "the corpus files"))?;
        let corpus_span = corpus.span();
        let max_len = at.positive("max_len", &raw.max_len, 2048)?;
        let margin = at.non_negative("margin", &raw.margin, 48.min(max_len as u64 / 8))? as usize;
        if margin >= max_len {
            return Err(at.error(
                "margin",
                raw.margin.as_ref(),
                format!("a margin of {margin} tokens leaves nothing of pieces of {max_len}; use less than max_len"),
            ));
        }
        Ok(Some(DataSection {
            corpus: corpus
                .into_inner()
                .into_vec()
                .iter()
                .map(|c| self.path(&at, "corpus", c, corpus_span.clone()))
                .collect(),
            text_fields: raw.text_fields.map_or_else(|| vec!["text".into()], raw::OneOrMany::into_vec),
            max_len,
            margin,
            on_bad: if raw.skip_bad == Some(true) { OnBadInput::Skip } else { OnBadInput::STOP_CONFIG },
        }))
    }

    fn model(&self, section: &str, raw: Spanned<RawModel>, default_name: &str) -> Result<ModelRef, ConfigError> {
        let at = self.at(section, Some(&raw));
        let raw = raw.into_inner();
        let dir = raw.model.ok_or_else(|| at.missing("model", "the checkpoint folder"))?;
        let name = raw.name.unwrap_or_else(|| {
            Path::new(dir.get_ref())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| default_name.into())
        });
        let adapter = raw
            .adapter
            .map(|a| super::plugin_name(self.doc, &at.key("adapter"), a, PluginKind::Adapter, self.base))
            .transpose()?;
        let mut path = self.path(&at, "model", dir.get_ref(), dir.span());
        // A Hub id: its snapshot in the local cache, when a revision is given or no folder
        // of that name exists beside the config.
        let id = dir.get_ref();
        if raw.revision.is_some() || (!path.path.is_dir() && crate::hub::looks_like_id(id)) {
            let revision = raw.revision.as_ref().map(|r| r.get_ref().as_str());
            path.path = crate::hub::snapshot(id, revision).map_err(|e| path.error(e))?;
        }
        Ok(ModelRef { name, dir: path, adapter })
    }

    pub fn target(&self, raw: Option<Spanned<RawModel>>) -> Result<Option<ModelRef>, ConfigError> {
        raw.map(|m| self.model("target", m, "target")).transpose()
    }

    pub fn sources(&self, raw: Vec<Spanned<RawModel>>) -> Result<Vec<ModelRef>, ConfigError> {
        let sources: Vec<ModelRef> = raw
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.model(&format!("sources.{i}"), s, &format!("source{i}")))
            .collect::<Result<_, _>>()?;
        if let Some(twin) =
            sources.iter().enumerate().find_map(|(i, a)| sources[..i].iter().find(|b| b.name == a.name).map(|_| a))
        {
            return Err(twin.dir.error(format!("two sources are named `{}`; give one a `name`", twin.name)));
        }
        Ok(sources)
    }

    pub fn precompute(&self, raw: Option<Spanned<raw::RawPrecompute>>) -> Result<Options, ConfigError> {
        let default = Options::default();
        let Some(raw) = raw else { return Ok(default) };
        let at = self.at("precompute", Some(&raw));
        let raw = raw.into_inner();
        Ok(Options {
            k: at.positive("k", &raw.k, default.k)?,
            half: raw.dtype.unwrap_or_default() == raw::LogprobDtype::F16,
            residual: raw.residual.unwrap_or(false),
            docs_per_shard: at.positive("docs_per_shard", &raw.docs_per_shard, default.docs_per_shard)?,
            batch_tokens: at.positive("batch_tokens", &raw.batch_tokens, default.batch_tokens)?,
        })
    }

    pub fn align(&self, raw: Option<Spanned<raw::RawAlign>>) -> Result<AlignSection, ConfigError> {
        let at = self.at("align", raw.as_ref());
        let raw = raw.map(Spanned::into_inner).unwrap_or_default();
        let pick = |key: &str, choice: Option<Spanned<raw::RawPlugin>>, kind: PluginKind, default: &str| match choice {
            Some(c) => super::plugin_choice(self.doc, &at.key(key), c, kind, self.base),
            None => Ok(PluginChoice::named(kind, default, at.error::<()>(key, None, ""))),
        };
        Ok(AlignSection {
            sequence: pick("sequence", raw.sequence, PluginKind::SequenceAligner, "dtw")?,
            vocab: pick("vocab", raw.vocab, PluginKind::VocabMapper, "mined")?,
            compat: raw.compat.unwrap_or(false),
        })
    }

    pub fn train(&self, raw: Option<Spanned<raw::RawTrain>>, seed: u64) -> Result<Option<TrainConfig>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = self.at("train", Some(&raw));
        let r = raw.into_inner();
        let steps = at.positive("steps", &r.steps, 100)? as u64;
        let lr = r.lr.as_ref().map_or(1e-5, |lr| *lr.get_ref());
        if !(lr > 0.0 && lr < 1.0) {
            return Err(at.error(
                "lr",
                r.lr.as_ref(),
                format!("a learning rate of {lr}: use a positive value below 1"),
            ));
        }
        let lambda = at.fraction("lambda", &r.lambda, 0.9)?;
        let divergence = self.divergence(&at, &r)?;
        let lora = self.lora(r.lora)?;
        let positive = |key: &str, value: &Option<Spanned<f64>>, default: f64| {
            at.float(key, value, default, |x| x > 0.0, "a positive number")
        };
        let clip = at.float("clip", &r.clip, 1.0, |x| x >= 0.0, "a positive gradient norm, or 0 for no clipping")?;
        let adamw = AdamWConfig {
            beta1: at.decay_rate("beta1", &r.beta1, 0.9)?,
            beta2: at.decay_rate("beta2", &r.beta2, 0.95)?,
            eps: positive("eps", &r.eps, 1e-8)?,
            weight_decay: at.float("weight_decay", &r.weight_decay, 0.1, |x| x >= 0.0, "zero or positive")?,
        };
        Ok(Some(TrainConfig {
            steps,
            batching: Batching {
                seq_len: at.positive("seq_len", &r.seq_len, 2048)?,
                batch_size: at.positive("batch_size", &r.batch_size, 8)?,
                packing: r.packing.unwrap_or(true),
                seed,
            },
            accumulation: at.positive("accumulation", &r.accumulation, 1)? as u64,
            lr: LrSchedule {
                peak: lr,
                warmup_steps: at.non_negative("warmup_steps", &r.warmup_steps, 0)?,
                decay: r.decay.unwrap_or_default(),
                min_ratio: at.fraction("min_lr_ratio", &r.min_lr_ratio, 0.0)?,
            },
            lambda: LambdaSchedule { start: lambda, end: at.fraction("lambda_end", &r.lambda_end, lambda)? },
            divergence,
            tail: r.tail.unwrap_or_default(),
            temperature: positive("temperature", &r.temperature, 1.0)?,
            adamw,
            precision: r.dtype.unwrap_or_default(),
            clip: (clip > 0.0).then_some(clip),
            checkpoint_every: at.positive("checkpoint_every", &r.checkpoint_every, steps as usize)? as u64,
            keep_checkpoints: at.positive("keep_checkpoints", &r.keep_checkpoints, 2)?,
            checkpoint_activations: r.checkpoint_activations.unwrap_or(false),
            zero: match r.zero.as_ref().map(|z| *z.get_ref()) {
                None => 0,
                Some(stage @ (0 | 1)) => stage as u8,
                Some(stage) => {
                    let message = format!("ZeRO stage {stage}: fusellm shards the optimizer state (1) or nothing (0)");
                    return Err(at.error("zero", r.zero.as_ref(), message));
                }
            },
            lora,
        }))
    }

    /// `[train] divergence` with its parameter (`beta` of the generalised JSD, TRL's default
    /// 0.5; `alpha` of the skew KLs, DistiLLM's 0.1), checked against `tail`.
    fn divergence(&self, at: &At<'_>, r: &raw::RawTrain) -> Result<Divergence, ConfigError> {
        use raw::DivergenceName as N;
        let name = r.divergence.as_ref().map_or(N::Ce, |d| *d.get_ref());
        let stray = |key: &str, value: &Option<Spanned<f64>>, owner: &str| match value {
            Some(v) => {
                Err(at.error(key, Some(v), format!("`{key}` is a parameter of {owner}; set `divergence` to it")))
            }
            None => Ok(()),
        };
        if !matches!(name, N::Jsd) {
            stray("beta", &r.beta, "divergence = \"jsd\"")?;
        }
        if !matches!(name, N::SkewKl | N::SkewReverseKl) {
            stray("alpha", &r.alpha, "divergence = \"skew_kl\" or \"skew_reverse_kl\"")?;
        }
        let beta = at.fraction("beta", &r.beta, 0.5)?;
        let alpha = at.fraction("alpha", &r.alpha, 0.1)?;
        let divergence = match name {
            N::Ce => Divergence::Ce,
            N::Kl => Divergence::Kl,
            N::ReverseKl => Divergence::ReverseKl,
            N::Jsd => Divergence::Jsd { beta },
            N::SkewKl => Divergence::SkewKl { alpha },
            N::SkewReverseKl => Divergence::SkewReverseKl { alpha },
            N::Tv => Divergence::Tv,
        };
        divergence.check(r.tail.unwrap_or_default()).map_err(|e| at.error("divergence", r.divergence.as_ref(), e))?;
        Ok(divergence)
    }

    /// `[train.lora]`, with PEFT's defaults (rank 8, alpha 8, no dropout) and the
    /// attention's query and value projections as targets (PEFT's for Llama, Mistral, Qwen).
    fn lora(&self, raw: Option<Spanned<raw::RawLora>>) -> Result<Option<LoraTraining>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = self.at("train.lora", Some(&raw));
        let r = raw.into_inner();
        let targets = match r.targets {
            Some(t) if t.get_ref().is_empty() => {
                return Err(at.error(
                    "targets",
                    Some(&t),
                    "names no module; list projections, e.g. [\"q_proj\", \"v_proj\"]",
                ))
            }
            Some(t) => t.into_inner(),
            None => vec!["q_proj".into(), "v_proj".into()],
        };
        let adapter = LoraSpec {
            rank: at.positive("rank", &r.rank, 8)?,
            alpha: at.float("alpha", &r.alpha, 8.0, |x| x > 0.0, "a positive number")?,
            dropout: at.float("dropout", &r.dropout, 0.0, |x| (0.0..1.0).contains(&x), "at least 0 and below 1")?,
            targets,
        };
        Ok(Some(LoraTraining { adapter, merge: r.merge.unwrap_or(false) }))
    }

    /// `[merge]`, its parameters checked against the method's with the sources' names
    /// standing for their pairwise targets.
    pub fn merge(
        &self,
        raw: Option<Spanned<raw::RawMerge>>,
        sources: &[ModelRef],
    ) -> Result<Option<MergeSection>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = self.at("merge", Some(&raw));
        let r = raw.into_inner();
        let method = match &r.method {
            Some(m) => crate::merge::method_named(m.get_ref()).map_err(|e| at.error("method", Some(m), e))?,
            None => Method::Sce,
        };
        let dtype = match &r.dtype {
            Some(d) => Some(crate::merge::dtype_named(d.get_ref()).map_err(|e| at.error("dtype", Some(d), e))?),
            None => None,
        };
        let mut models = BTreeMap::new();
        for (name, params) in r.models {
            if !sources.iter().any(|s| s.name == *name.get_ref()) {
                let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                let message = format!(
                    "`{}` is not a source (the sources: {}); per-model parameters go under a source's name",
                    name.get_ref(),
                    names.join(", ")
                );
                return Err(at.error("models", Some(&name), message));
            }
            models.insert(name.into_inner(), params);
        }
        let section =
            MergeSection { method, params: r.parameters, models, dtype, all_sources: r.all_sources.unwrap_or(true) };
        let named: Vec<(String, PathBuf)> = sources.iter().map(|s| (s.name.clone(), PathBuf::from(&s.name))).collect();
        section
            .plan(Path::new("target"), &named)
            .check()
            .map_err(|e| at.error::<()>("parameters", None, e.to_string()))?;
        Ok(Some(section))
    }

    pub fn eval(&self, raw: Option<Spanned<raw::RawEval>>) -> Result<Option<EvalSection>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let at = self.at("eval", Some(&raw));
        let raw = raw.into_inner();
        let sets = raw.sets.ok_or_else(|| at.missing("sets", "a table of name = \"file\""))?.into_inner();
        let sets_at = At { section: "eval.sets", ..at };
        Ok(Some(EvalSection {
            sets: sets
                .into_iter()
                .map(|(name, file)| {
                    let name = name.into_inner();
                    let path = self.path(&sets_at, &name, file.get_ref(), file.span());
                    (name, path)
                })
                .collect(),
            window: at.positive("window", &raw.window, 1024)?,
            batch_tokens: at.positive("batch_tokens", &raw.batch_tokens, 4096)?,
        }))
    }

    pub fn sandbox(&self, raw: Option<Spanned<raw::RawSandbox>>) -> Result<crate::plugins::WasmLimits, ConfigError> {
        let mut limits = crate::plugins::WasmLimits::default();
        let Some(raw) = raw else { return Ok(limits) };
        let at = self.at("sandbox", Some(&raw));
        let raw = raw.into_inner();
        if let Some(secs) = &raw.deadline_secs {
            if !(*secs.get_ref() > 0.0 && *secs.get_ref() < 1e6) {
                return Err(at.error("deadline_secs", Some(secs), "must be a positive number of seconds"));
            }
            limits.deadline = std::time::Duration::from_secs_f64(*secs.get_ref());
        }
        if let Some(mib) = &raw.memory_mib {
            if !(1..=1 << 20).contains(mib.get_ref()) {
                return Err(at.error("memory_mib", Some(mib), "must be between 1 and 1048576 MiB"));
            }
            limits.memory_bytes = (*mib.get_ref() as usize) << 20;
        }
        if raw.cache == Some(false) {
            limits.cache_dir = None;
        }
        Ok(limits)
    }
}
