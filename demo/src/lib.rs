//! `fusellm demo`: the FuseLLM experiment in miniature, built from code alone (no file, no
//! network). Three procedural text domains; three tokenizer families trained on them; three
//! source models of the paper's architectures, each pretrained mainly on one domain (with
//! the real tokenizers of a fixtures folder: four domains, five sources and families);
//! a target pretrained briefly on the mixture and then continued three ways (CLM only,
//! FuseLLM with MinCE, FuseLLM with AvgCE), plus MinED vs EM, knowledge distillation from
//! one teacher, and the paper's second comparison (its Table 7): domain experts combined as
//! an ensemble, as a weight merge, and by FuseLLM. Every training, fusion and evaluation
//! goes through the real pipeline (`fusellm run` configs written to `<out>/configs`).

mod corpora;
pub mod domains;
pub mod models;
mod report;
mod seeds;
pub mod transfer;
pub mod vocab;

use std::path::{Path, PathBuf};

use fusellm_core::config::Config;
use fusellm_core::error::{Context, Error, Result};
use fusellm_core::eval::{mixture, score, Scorer};
use fusellm_core::pipeline::{Event, Run, RunRecord};
use fusellm_core::plugins::Registry;
use fusellm_sdk::rng::Rng;

use models::{Arch, Shape};
pub use report::{Results, Row};
pub use seeds::{SeedResults, SeedRow, VsClm};
use vocab::Family;

/// How big the experiment is.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Documents per domain for pretraining, for continual training, for evaluation.
    pub pretrain_docs: usize,
    pub continual_docs: usize,
    pub eval_docs: usize,
    /// Vocabulary sizes of the three tokenizer families.
    pub vocab: [usize; 3],
    pub source: Shape,
    pub target: Shape,
    pub seq_len: usize,
    pub batch: usize,
    pub source_steps: u64,
    pub base_steps: u64,
    pub continual_steps: u64,
    pub expert_steps: u64,
}

impl Sizes {
    /// The demo as documented: about 90 seconds on two cores.
    pub fn full() -> Self {
        Self {
            pretrain_docs: 1200,
            continual_docs: 400,
            eval_docs: 100,
            vocab: [800, 700, 600],
            source: Shape { hidden: 96, layers: 3, heads: 4, max_positions: 256 },
            target: Shape { hidden: 64, layers: 2, heads: 4, max_positions: 256 },
            seq_len: 128,
            batch: 8,
            source_steps: 400,
            base_steps: 120,
            continual_steps: 160,
            expert_steps: 120,
        }
    }

    /// The experiment with the real tokenizers and corpora (examples/real-tokenizers): the
    /// models are small, but their embeddings span 32k-50k tokens; about 12 minutes.
    pub fn real() -> Self {
        Self {
            pretrain_docs: 1500,
            continual_docs: 150,
            eval_docs: 40,
            vocab: [0; 3],
            source: Shape { layers: 2, ..Self::full().source },
            expert_steps: 100,
            ..Self::full()
        }
    }

    /// The reduced size CI runs: every stage, small.
    pub fn quick() -> Self {
        Self {
            pretrain_docs: 160,
            continual_docs: 60,
            eval_docs: 16,
            vocab: [420, 380, 340],
            source: Shape { hidden: 48, layers: 2, heads: 4, max_positions: 128 },
            target: Shape { hidden: 32, layers: 2, heads: 4, max_positions: 128 },
            seq_len: 64,
            batch: 4,
            source_steps: 30,
            base_steps: 10,
            continual_steps: 12,
            expert_steps: 8,
        }
    }
}

/// A source model of the experiment.
#[derive(Clone, Copy)]
struct Source {
    name: &'static str,
    arch: Arch,
    /// Index into the setup's tokenizers.
    tokenizer: usize,
    /// Index into the setup's domains: the domain it is pretrained mainly on.
    home: usize,
}

const fn source(name: &'static str, arch: Arch, tokenizer: usize, home: usize) -> Source {
    Source { name, arch, tokenizer, home }
}

/// Where the demo's text and tokenizers come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Setup {
    /// Procedural domains and tokenizers trained on them: the embedded default.
    Procedural,
    /// The real tokenizers (Llama-2, GPT-NeoX, OpenLLaMA, Llama 3, Qwen2.5) and corpora
    /// (prose, math, code, technical prose) of a fixtures folder: examples/real-tokenizers.
    Fixtures(PathBuf),
}

/// The fixtures' tokenizers, by folder: the target's (Llama-2's) first.
const REAL_TOKENIZERS: [&str; 5] = ["llama2", "gpt-neox-20b", "openllama-v1", "llama3", "qwen2.5"];

impl Setup {
    pub fn domains(&self) -> Vec<&'static str> {
        match self {
            Setup::Procedural => domains::DOMAINS.to_vec(),
            Setup::Fixtures(_) => corpora::DOMAINS.iter().map(|d| d.0).collect(),
        }
    }

    /// The sources: the paper's three (Llama-2, MPT, OpenLLaMA) each on a domain of its
    /// own; with the real tokenizers also a Llama 3 and a Qwen2.5, five tokenizer families.
    fn sources(&self) -> Vec<Source> {
        match self {
            Setup::Procedural => {
                vec![
                    source("llama", Arch::Llama, 0, 0),
                    source("mpt", Arch::Mpt, 1, 1),
                    source("openllama", Arch::Llama, 2, 2),
                ]
            }
            // Llama-2 on prose, MPT (GPT-NeoX tokenizer) on code, OpenLLaMA and Qwen2.5 on
            // math, Llama 3 on technical prose.
            Setup::Fixtures(_) => vec![
                source("llama", Arch::Llama, 0, 0),
                source("mpt", Arch::Mpt, 1, 2),
                source("openllama", Arch::Llama, 2, 1),
                source("llama3", Arch::Llama3, 3, 3),
                source("qwen2", Arch::Qwen2, 4, 1),
            ],
        }
    }
}

/// The documents of every domain: generated, or drawn from real corpora.
struct Texts {
    domains: Vec<&'static str>,
    /// For real corpora: per domain the shuffled training documents and the evaluation ones.
    real: Option<Vec<(Vec<String>, Vec<String>)>>,
    seed: u64,
}

/// Which part of the data a document set is: pretraining draws differ by `Pretrain(k)`.
#[derive(Clone, Copy)]
enum Split {
    Pretrain(u64),
    Continual,
    Eval,
}

impl Texts {
    fn new(setup: &Setup, seed: u64) -> Result<Self> {
        let real = match setup {
            Setup::Procedural => None,
            Setup::Fixtures(dir) => Some(
                corpora::DOMAINS
                    .iter()
                    .enumerate()
                    .map(|(i, (_, train, valid, fields))| {
                        let mut pool = corpora::documents(&dir.join("corpora"), train, fields)?;
                        Rng::new(seed ^ i as u64).shuffle(&mut pool);
                        Ok((pool, corpora::documents(&dir.join("corpora"), valid, fields)?))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        Ok(Self { domains: setup.domains(), real, seed })
    }

    /// `n` documents of domain `d` (fewer when a real corpus has fewer). Real continual
    /// documents are the first of the shuffled training pool, pretraining ones the rest.
    fn docs(&self, d: usize, split: Split, n: usize, continual: usize) -> Vec<String> {
        let code = match split {
            Split::Pretrain(k) => 1 + k,
            Split::Continual => 10,
            Split::Eval => 20,
        };
        match &self.real {
            None => {
                let mut rng = Rng::new(self.seed.wrapping_mul(1_000_003) ^ (code << 8) ^ d as u64);
                (0..n).map(|_| domains::document(self.domains[d], &mut rng)).collect()
            }
            Some(real) => {
                let (pool, eval) = &real[d];
                let rest = &pool[continual.min(pool.len())..];
                match split {
                    Split::Eval => eval.iter().take(n).cloned().collect(),
                    Split::Continual => pool.iter().take(n.min(continual)).cloned().collect(),
                    // Pretraining draws rotate through the rest of the pool.
                    Split::Pretrain(k) => {
                        (0..n.min(rest.len())).map(|i| rest[(i + k as usize * 97) % rest.len()].clone()).collect()
                    }
                }
            }
        }
    }
}

/// The weight of the CLM loss when fusing (the fusion loss gets the rest): the paper's 0.9,
/// which the transfer sweep (`fusellm demo --transfer`) measured against lower values.
pub const FUSION_LAMBDA: f64 = 0.9;

/// The top-k of the sources' stored distributions (the paper's 10).
pub const TOP_K: usize = 10;

/// A `[fusion]` section: the plugin and the parameters that differ from its defaults.
fn fusion(plugin: &str, params: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "plugin": plugin, "params": params })
}

/// The fusion of most FuseLLM rows: CE per byte.
fn by_byte(plugin: &str) -> serde_json::Value {
    fusion(plugin, serde_json::json!({ "ce_norm": "byte" }))
}

const FAMILIES: [(&str, bool); 3] = [("spm-bpe", false), ("byte-bpe", true), ("spm-bpe-small", false)];

pub struct Demo<'e> {
    pub out: PathBuf,
    pub setup: Setup,
    pub sizes: Sizes,
    pub seed: u64,
    pub events: &'e mut dyn FnMut(Event),
}

impl Demo<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.out.join(rel)
    }

    /// Runs the whole experiment and writes results.json, results.md and the plots.
    pub fn run(&mut self, registry: &mut Registry) -> Result<Results> {
        let (mut results, Prepared { sources, base }) = self.prepare(registry)?;
        let plan = self.setup.sources();
        let continual = |sources, fusion| self.continual(&base, sources, fusion);
        // CE per byte ranks sources whose tokenizers cut text differently fairly (per token, a
        // finer tokenizer looks better than it is); the paper's per-token CE is kept as a row.
        let variants: Vec<(&str, Plan)> = vec![
            ("clm", continual(Vec::new(), None)),
            ("fusellm-mince", continual(sources.clone(), Some(by_byte("min_ce")))),
            ("fusellm-avgce", continual(sources.clone(), Some(by_byte("avg_ce")))),
            ("fusellm-mince-em", Plan { vocab: "em", ..continual(sources.clone(), Some(by_byte("min_ce"))) }),
            ("fusellm-mince-ms", Plan { vocab: "ms", ..continual(sources.clone(), Some(by_byte("min_ce"))) }),
            ("fusellm-mince-per-token", continual(sources.clone(), Some(fusion("min_ce", serde_json::json!({}))))),
        ];
        for (name, plan) in &variants {
            self.stage(&format!("continual training: {name}"));
            let record = self.pipeline(registry, name, plan)?;
            results.push(name, &record);
        }
        // Knowledge distillation: the same loss with one teacher, the best source.
        let names: Vec<String> = plan.iter().map(|s| format!("source-{}", s.name)).collect();
        let teacher = results.best_of(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let teacher_source = sources[teacher].clone();
        self.stage(&format!("knowledge distillation from {}", plan[teacher].name));
        let kd = self.continual(
            &base,
            vec![teacher_source],
            Some(fusion("min_ce", serde_json::json!({ "include_target": false }))),
        );
        let record = self.pipeline(registry, "kd", &kd)?;
        results.push("kd", &record);
        self.fusechat(registry, &base, &sources, &mut results)?;

        self.table7(registry, &base, &mut results)?;
        results.write(&self.out)?;
        Ok(results)
    }

    /// The data, the tokenizers, the sources pretrained each mainly on its domain, and the
    /// target pretrained briefly on the mixture: what every continued row starts from. The
    /// results hold the sources' and the base's rows.
    fn prepare(&mut self, registry: &mut Registry) -> Result<(Results, Prepared)> {
        // The configs written below name files by absolute path.
        self.out = std::path::absolute(&self.out).context(|| format!("resolving {}", self.out.display()))?;
        std::fs::create_dir_all(self.path("data")).context(|| format!("creating {}", self.out.display()))?;
        let domains = self.setup.domains();
        self.stage(&format!("data: {}", domains.join(", ")));
        self.write_corpora(&Texts::new(&self.setup, self.seed)?)?;
        let plan = self.setup.sources();
        let tokenizers = self.tokenizers()?;
        self.stage(&format!("tokenizers: {} families", tokenizers.len()));
        let sizes = self.sizes;

        let mut results = Results::default();
        let mut sources = Vec::new();
        for (i, Source { name, arch, tokenizer, home }) in plan.iter().copied().enumerate() {
            let domain = domains[home];
            let init = self.path(&format!("models/{name}-init"));
            if !init.join("model.safetensors").exists() {
                models::create(&init, arch, sizes.source, &tokenizers[tokenizer], self.seed + i as u64, registry)?;
            }
            self.stage(&format!("source {name}: pretrained mainly on {domain}"));
            let record = self.pipeline(
                registry,
                &format!("source-{name}"),
                &Plan {
                    corpus: self.path(&format!("data/pretrain-{domain}-heavy.jsonl")),
                    target: init,
                    steps: sizes.source_steps,
                    lr: 3e-3,
                    ..Plan::default()
                },
            )?;
            results.push(&format!("source-{name}"), &record);
            sources.push((name.to_string(), checkpoint(&record)?));
        }
        let base_record = self.base_record(registry, sizes.target)?;
        let base = checkpoint(&base_record)?;
        results.push("target-base", &base_record);
        Ok((results, Prepared { sources, base }))
    }

    /// The target of this shape, pretrained briefly on the mixture (the demo's own shape
    /// keeps the names `target-init` and `target-base`).
    fn base_record(&mut self, registry: &mut Registry, shape: Shape) -> Result<RunRecord> {
        let own = shape == self.sizes.target;
        let suffix = if own { String::new() } else { format!("-{}x{}", shape.hidden, shape.layers) };
        let init = self.path(&format!("models/target-init{suffix}"));
        if !init.join("model.safetensors").exists() {
            let tokenizer = self.tokenizers()?.swap_remove(0);
            models::create(&init, Arch::Llama, shape, &tokenizer, self.seed + 10, registry)?;
        }
        self.stage(&format!("target{suffix}: pretrained briefly on the mixture"));
        let plan = Plan {
            corpus: self.path("data/pretrain-mixture.jsonl"),
            target: init,
            steps: self.sizes.base_steps,
            lr: 3e-3,
            ..Plan::default()
        };
        self.pipeline(registry, &format!("target-base{suffix}"), &plan)
    }

    /// The checkpoint of [`Demo::base_record`].
    fn base(&mut self, registry: &mut Registry, shape: Shape) -> Result<PathBuf> {
        checkpoint(&self.base_record(registry, shape)?)
    }

    /// Continual training of `base` on the mixture: CLM alone, or fused from `sources`.
    fn continual(&self, base: &Path, sources: Vec<(String, PathBuf)>, fusion: Option<serde_json::Value>) -> Plan {
        Plan {
            corpus: self.path("data/continual-mixture.jsonl"),
            target: base.to_owned(),
            sources,
            fusion,
            steps: self.sizes.continual_steps,
            lr: 1e-3,
            ..Plan::default()
        }
    }

    /// FuseChat's recipe, one pipeline run with `[merge]`: the base fused with each source
    /// alone (pairwise, MinCE over the target and that source), then the pairwise targets
    /// merged by SCE against the base.
    fn fusechat(
        &mut self,
        registry: &mut Registry,
        base: &Path,
        sources: &[(String, PathBuf)],
        results: &mut Results,
    ) -> Result<()> {
        self.stage("FuseChat: pairwise fusion with each source, SCE merge of the pairwise targets");
        let plan = Plan {
            merge: Some(serde_json::json!({ "method": "sce", "all_sources": false })),
            ..self.continual(base, sources.to_vec(), Some(by_byte("min_ce")))
        };
        let record = self.pipeline(registry, "fusechat", &plan)?;
        results.push_model("fusechat", &record, "merged");
        Ok(())
    }

    /// The paper's Table 7: experts continued from one base on one domain each, combined as
    /// an ensemble, as a weight merge, and by FuseLLM into the base.
    fn table7(&mut self, registry: &mut Registry, base: &Path, results: &mut Results) -> Result<()> {
        let mut experts = Vec::new();
        for domain in self.setup.domains() {
            self.stage(&format!("expert: the base continued on {domain}"));
            let record = self.pipeline(
                registry,
                &format!("expert-{domain}"),
                &Plan {
                    corpus: self.path(&format!("data/continual-{domain}.jsonl")),
                    target: base.to_owned(),
                    steps: self.sizes.expert_steps,
                    lr: 1e-3,
                    ..Plan::default()
                },
            )?;
            results.push(&format!("expert-{domain}"), &record);
            experts.push((domain.to_string(), checkpoint(&record)?));
        }
        self.stage("ensemble and weight merge of the experts");
        let merged = self.path("models/weight-merge");
        let expert_dirs: Vec<PathBuf> = experts.iter().map(|(_, d)| d.clone()).collect();
        fusellm_core::merge::Merge { models: &expert_dirs, weights: &[], base: None }.write(&merged)?;
        results.rows.push(self.evaluate("weight-merge", std::slice::from_ref(&merged), registry)?);
        results.rows.push(self.evaluate("ensemble", &expert_dirs, registry)?);
        self.stage("FuseLLM of the experts into the base");
        let record = self.pipeline(
            registry,
            "fusellm-experts",
            &Plan {
                corpus: self.path("data/continual-mixture.jsonl"),
                target: base.to_owned(),
                sources: experts,
                fusion: Some(fusion("min_ce", serde_json::json!({}))),
                steps: self.sizes.continual_steps,
                lr: 1e-3,
                ..Plan::default()
            },
        )?;
        results.push("fusellm-experts", &record);
        Ok(())
    }

    /// Bits per byte per domain of one model, or of an ensemble of several (the average of
    /// their next-token distributions).
    fn evaluate(&self, name: &str, members: &[PathBuf], registry: &Registry) -> Result<Row> {
        let mut bpb = std::collections::BTreeMap::new();
        let opened = members
            .iter()
            .map(|m| {
                let c = fusellm_core::checkpoint::Checkpoint::open(m, registry, None)?;
                let model = c.load_model(
                    fusellm_core::model::LoadMode::Frozen,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?;
                Ok((c, model))
            })
            .collect::<Result<Vec<_>>>()?;
        for domain in self.setup.domains() {
            let texts = fusellm_core::split::read_texts(&self.path(&format!("data/eval-{domain}.jsonl")))?;
            let nlls = opened
                .iter()
                .map(|(c, model)| {
                    Scorer {
                        model,
                        tokenizer: &c.tokenizer,
                        window: self.sizes.source.max_positions,
                        batch_tokens: 4096,
                    }
                    .text_nlls(&texts)
                })
                .collect::<Result<Vec<_>>>()?;
            let bytes = texts.iter().map(|t| t.len() as u64).sum();
            bpb.insert(domain.to_string(), score(&mixture(&nlls)?, bytes)?.bits_per_byte());
        }
        Ok(Row::new(name, bpb))
    }

    fn stage(&mut self, what: &str) {
        (self.events)(Event::Stage { name: what, reused: false });
    }

    /// The corpora as JSONL pieces (a `text` field): per domain pretraining, continual and
    /// evaluation sets; each source's pretraining mix (its domain, and an eighth as much of
    /// each other); the mixtures.
    fn write_corpora(&self, texts: &Texts) -> Result<()> {
        let s = self.sizes;
        let docs = |d: usize, split: Split, n: usize| texts.docs(d, split, n, s.continual_docs);
        let write = |name: &str, texts: &[String]| -> Result<()> {
            let lines: String = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
            let file = self.path(&format!("data/{name}.jsonl"));
            std::fs::write(&file, lines).context(|| format!("writing {}", file.display()))
        };
        let interleave = |sets: Vec<Vec<String>>| -> Vec<String> {
            let longest = sets.iter().map(Vec::len).max().unwrap_or(0);
            (0..longest).flat_map(|i| sets.iter().filter_map(move |set| set.get(i).cloned())).collect()
        };
        let all = 0..texts.domains.len();
        for (i, home) in texts.domains.iter().enumerate() {
            let mix = all
                .clone()
                .map(|j| match i == j {
                    true => docs(j, Split::Pretrain(0), s.pretrain_docs),
                    false => docs(j, Split::Pretrain(1 + i as u64), s.pretrain_docs / 8),
                })
                .collect();
            write(&format!("pretrain-{home}-heavy"), &interleave(mix))?;
            write(&format!("continual-{home}"), &docs(i, Split::Continual, s.continual_docs))?;
            write(&format!("eval-{home}"), &docs(i, Split::Eval, s.eval_docs))?;
        }
        write(
            "pretrain-mixture",
            &interleave(all.clone().map(|d| docs(d, Split::Pretrain(29), s.pretrain_docs / 4)).collect()),
        )?;
        write("continual-mixture", &interleave(all.map(|d| docs(d, Split::Continual, s.continual_docs)).collect()))
    }

    /// The tokenizers: three trained on the demo's text (the third on another mix, its home
    /// domain's pretraining corpus, as OpenLLaMA's tokenizer was trained on other data than
    /// Llama-2's), or the five real ones of the fixtures.
    fn tokenizers(&self) -> Result<Vec<PathBuf>> {
        if let Setup::Fixtures(dir) = &self.setup {
            return Ok(REAL_TOKENIZERS.iter().map(|t| dir.join("tokenizers").join(t).join("tokenizer.json")).collect());
        }
        let mixture = fusellm_core::split::read_texts(&self.path("data/pretrain-mixture.jsonl"))?;
        let third_home = self.setup.domains()[self.setup.sources()[2].home];
        let other = fusellm_core::split::read_texts(&self.path(&format!("data/pretrain-{third_home}-heavy.jsonl")))?;
        std::fs::create_dir_all(self.path("tokenizers")).context(|| "creating the tokenizer folder".into())?;
        FAMILIES
            .iter()
            .enumerate()
            .map(|(i, (name, byte_level))| {
                let out = self.path(&format!("tokenizers/{name}.json"));
                if !out.exists() {
                    let texts = if i == 2 { &other } else { &mixture };
                    vocab::train(Family { name, byte_level: *byte_level, vocab: self.sizes.vocab[i] }, texts, &out)?;
                }
                Ok(out)
            })
            .collect()
    }

    /// Runs one configuration through the pipeline; stages shared with earlier runs (the
    /// sources' forward passes, alignments) are reused from `<out>/runs/cache`.
    fn pipeline(&mut self, registry: &mut Registry, name: &str, plan: &Plan) -> Result<RunRecord> {
        let text = plan.toml(self, name);
        let file = self.path(&format!("configs/{name}.toml"));
        std::fs::create_dir_all(self.path("configs")).context(|| "creating the config folder".into())?;
        std::fs::write(&file, &text).context(|| format!("writing {}", file.display()))?;
        let config = Config::parse(&file, &text)?;
        let run = Run {
            config: &config,
            text,
            cache: self.path("runs/cache"),
            out: self.path(&format!("runs/{name}")),
            git_revision: String::new(),
        };
        run.execute(registry, self.events)
    }
}

/// One pipeline run of the demo.
struct Plan {
    corpus: PathBuf,
    target: PathBuf,
    /// Named source checkpoints.
    sources: Vec<(String, PathBuf)>,
    /// The [fusion] table; CLM only when None.
    fusion: Option<serde_json::Value>,
    vocab: &'static str,
    steps: u64,
    lr: f64,
    /// The CLM weight when fused (CLM alone gets the whole loss).
    lambda: f64,
    top_k: usize,
    /// The [merge] table (FuseChat's recipe), if any.
    merge: Option<serde_json::Value>,
}

/// What [`Demo::prepare`] makes: the trained sources by name, and the target's base.
struct Prepared {
    sources: Vec<(String, PathBuf)>,
    base: PathBuf,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            corpus: PathBuf::new(),
            target: PathBuf::new(),
            sources: Vec::new(),
            fusion: None,
            vocab: "mined",
            steps: 0,
            lr: 1e-3,
            lambda: FUSION_LAMBDA,
            top_k: TOP_K,
            merge: None,
        }
    }
}

impl Plan {
    /// The run's config, built as a value and written as TOML.
    fn toml(&self, demo: &Demo, name: &str) -> String {
        let path = |p: &Path| p.display().to_string();
        let s = demo.sizes;
        let sources: Vec<_> =
            self.sources.iter().map(|(name, dir)| serde_json::json!({ "name": name, "model": path(dir) })).collect();
        let sets: serde_json::Map<_, _> = demo
            .setup
            .domains()
            .into_iter()
            .map(|d| (d.to_string(), path(&demo.path(&format!("data/eval-{d}.jsonl"))).into()))
            .collect();
        let mut config = serde_json::json!({
            "run": { "dir": path(&demo.path("runs")), "seed": demo.seed },
            "data": {
                "corpus": [path(&self.corpus)],
                "max_len": s.target.max_positions.min(s.source.max_positions),
                "margin": 4,
            },
            "target": { "model": path(&self.target) },
            "sources": sources,
            "precompute": { "k": self.top_k, "docs_per_shard": 256 },
            "align": { "vocab": { "plugin": self.vocab } },
            "train": {
                "steps": self.steps,
                "batch_size": s.batch,
                "seq_len": s.seq_len,
                "lr": self.lr,
                "warmup_steps": (self.steps / 10).max(1),
                "min_lr_ratio": 0.1,
                "lambda": if self.fusion.is_some() { self.lambda } else { 1.0 },
                "checkpoint_every": self.steps,
            },
            "eval": { "window": s.seq_len * 2, "sets": sets },
        });
        if let Some(fusion) = &self.fusion {
            config["fusion"] = fusion.clone();
        }
        if let Some(merge) = &self.merge {
            config["merge"] = merge.clone();
        }
        let text = toml::to_string(&config).expect("a demo config serialises as TOML");
        format!("# demo run `{name}`, written by `fusellm demo`\n{text}")
    }
}

fn checkpoint(record: &RunRecord) -> Result<PathBuf> {
    record.checkpoint.as_ref().map(PathBuf::from).ok_or_else(|| Error::msg("a demo run ended without a checkpoint"))
}
