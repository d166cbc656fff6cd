//! `fusellm demo`: the FuseLLM experiment in miniature, built from code alone (no file, no
//! network). Three procedural text domains; three tokenizer families trained on them; three
//! source models of the three built-in architectures, each pretrained mainly on one domain;
//! a target pretrained briefly on the mixture and then continued three ways (CLM only,
//! FuseLLM with MinCE, FuseLLM with AvgCE), plus MinED vs EM, knowledge distillation from
//! one teacher, and the paper's second comparison (its Table 7): domain experts combined as
//! an ensemble, as a weight merge, and by FuseLLM. Every training, fusion and evaluation
//! goes through the real pipeline (`fusellm run` configs written to `<out>/configs`).

pub mod domains;
pub mod models;
mod report;
pub mod vocab;

use std::path::{Path, PathBuf};

use fusellm_core::config::Config;
use fusellm_core::error::{Context, Error, Result};
use fusellm_core::eval::{mixture, score, Scorer};
use fusellm_core::pipeline::{Event, Run, RunRecord};
use fusellm_core::plugins::Registry;
use fusellm_core::rng::Rng;

use domains::DOMAINS;
use models::{Arch, Shape};
pub use report::{Results, Row};
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
    /// The demo as documented: about ten minutes on two cores.
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

/// The three sources: architecture, tokenizer family, home domain.
const SOURCES: [(&str, Arch, usize, &str); 3] =
    [("llama", Arch::Llama, 0, "arithmetic"), ("mpt", Arch::Mpt, 1, "code"), ("openllama", Arch::Llama, 2, "grammar")];

/// The fusion sections of the FuseLLM rows.
const MIN_CE: &str = "plugin = \"min_ce\"\n[fusion.params]\nce_norm = \"byte\"";
const AVG_CE: &str = "plugin = \"avg_ce\"\n[fusion.params]\nce_norm = \"byte\"";

const FAMILIES: [(&str, bool); 3] = [("spm-bpe", false), ("byte-bpe", true), ("spm-bpe-small", false)];

pub struct Demo<'e> {
    pub out: PathBuf,
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
        // The configs written below name files by absolute path.
        self.out = std::path::absolute(&self.out).context(|| format!("resolving {}", self.out.display()))?;
        std::fs::create_dir_all(self.path("data")).context(|| format!("creating {}", self.out.display()))?;
        self.stage("data: three procedural domains");
        self.write_corpora()?;
        self.stage("tokenizers: three families trained on the demo's text");
        let tokenizers = self.train_tokenizers()?;
        let sizes = self.sizes;

        let mut results = Results::default();
        let mut sources = Vec::new();
        for (i, (name, arch, family, domain)) in SOURCES.iter().enumerate() {
            let init = self.path(&format!("models/{name}-init"));
            if !init.join("model.safetensors").exists() {
                models::create(&init, *arch, sizes.source, &tokenizers[*family], self.seed + i as u64, registry)?;
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
            results.push(&format!("source-{name}"), &record, "trained");
            sources.push((name.to_string(), checkpoint(&record)?));
        }
        let init = self.path("models/target-init");
        if !init.join("model.safetensors").exists() {
            models::create(&init, Arch::Llama, sizes.target, &tokenizers[0], self.seed + 10, registry)?;
        }
        self.stage("target: pretrained briefly on the mixture");
        let base_record = self.pipeline(
            registry,
            "target-base",
            &Plan {
                corpus: self.path("data/pretrain-mixture.jsonl"),
                target: init,
                steps: sizes.base_steps,
                lr: 3e-3,
                ..Plan::default()
            },
        )?;
        let base = checkpoint(&base_record)?;
        results.push("target-base", &base_record, "trained");

        let mixture = self.path("data/continual-mixture.jsonl");
        let continual = |sources: Vec<(String, PathBuf)>, fusion: Option<&str>| Plan {
            corpus: mixture.clone(),
            target: base.clone(),
            sources,
            fusion: fusion.map(str::to_string),
            steps: sizes.continual_steps,
            lr: 1e-3,
            ..Plan::default()
        };
        // CE per byte ranks sources whose tokenizers cut text differently fairly (per token, a
        // finer tokenizer looks better than it is); the paper's per-token CE is kept as a row.
        let variants: Vec<(&str, Plan)> = vec![
            ("clm", continual(Vec::new(), None)),
            ("fusellm-mince", continual(sources.clone(), Some(MIN_CE))),
            ("fusellm-avgce", continual(sources.clone(), Some(AVG_CE))),
            ("fusellm-mince-em", Plan { vocab: "em", ..continual(sources.clone(), Some(MIN_CE)) }),
            ("fusellm-mince-per-token", continual(sources.clone(), Some("plugin = \"min_ce\""))),
        ];
        for (name, plan) in &variants {
            self.stage(&format!("continual training: {name}"));
            let record = self.pipeline(registry, name, plan)?;
            results.push(name, &record, "trained");
        }
        // Knowledge distillation: the same loss with one teacher, the best source.
        let teacher = results.best_of(&["source-llama", "source-mpt", "source-openllama"]);
        let teacher_source = sources[teacher].clone();
        self.stage(&format!("knowledge distillation from {}", SOURCES[teacher].0));
        let kd = continual(vec![teacher_source], Some("plugin = \"min_ce\"\n[fusion.params]\ninclude_target = false"));
        let record = self.pipeline(registry, "kd", &kd)?;
        results.push("kd", &record, "trained");

        self.table7(registry, &base, &mut results)?;
        results.write(&self.out)?;
        Ok(results)
    }

    /// The paper's Table 7: experts continued from one base on one domain each, combined as
    /// an ensemble, as a weight merge, and by FuseLLM into the base.
    fn table7(&mut self, registry: &mut Registry, base: &Path, results: &mut Results) -> Result<()> {
        let mut experts = Vec::new();
        for domain in DOMAINS {
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
            results.push(&format!("expert-{domain}"), &record, "trained");
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
                fusion: Some("plugin = \"min_ce\"".into()),
                steps: self.sizes.continual_steps,
                lr: 1e-3,
                ..Plan::default()
            },
        )?;
        results.push("fusellm-experts", &record, "trained");
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
        for domain in DOMAINS {
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
            bpb.insert(domain.to_string(), score(&mixture(&nlls)?, bytes).bits_per_byte());
        }
        Ok(Row::new(name, bpb))
    }

    fn stage(&mut self, what: &str) {
        (self.events)(Event::Stage { name: what, reused: false });
    }

    /// The corpora as JSONL pieces (a `text` field): per domain pretraining, continual and
    /// evaluation sets; each source's pretraining mix (its domain, and an eighth as much of
    /// each other); the mixtures.
    fn write_corpora(&self) -> Result<()> {
        let s = self.sizes;
        let docs = |domain: &str, split: u64, n: usize| -> Vec<String> {
            let mut rng = Rng::new(
                self.seed.wrapping_mul(1_000_003)
                    ^ (split << 8)
                    ^ DOMAINS.iter().position(|d| *d == domain).unwrap_or(0) as u64,
            );
            (0..n).map(|_| domains::document(domain, &mut rng)).collect()
        };
        let write = |name: &str, texts: &[String]| -> Result<()> {
            let lines: String = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
            let file = self.path(&format!("data/{name}.jsonl"));
            std::fs::write(&file, lines).context(|| format!("writing {}", file.display()))
        };
        let interleave = |sets: Vec<Vec<String>>| -> Vec<String> {
            let longest = sets.iter().map(Vec::len).max().unwrap_or(0);
            (0..longest).flat_map(|i| sets.iter().filter_map(move |set| set.get(i).cloned())).collect()
        };
        for (i, home) in DOMAINS.iter().enumerate() {
            let mix: Vec<Vec<String>> = DOMAINS
                .iter()
                .enumerate()
                .map(
                    |(j, d)| {
                        if i == j {
                            docs(d, 1, s.pretrain_docs)
                        } else {
                            docs(d, 2 + i as u64, s.pretrain_docs / 8)
                        }
                    },
                )
                .collect();
            write(&format!("pretrain-{home}-heavy"), &interleave(mix))?;
            write(&format!("continual-{home}"), &docs(home, 10, s.continual_docs))?;
            write(&format!("eval-{home}"), &docs(home, 20, s.eval_docs))?;
        }
        write("pretrain-mixture", &interleave(DOMAINS.iter().map(|d| docs(d, 30, s.pretrain_docs / 4)).collect()))?;
        write("continual-mixture", &interleave(DOMAINS.iter().map(|d| docs(d, 10, s.continual_docs)).collect()))
    }

    /// The three tokenizer families; the third trained on another mix (its home domain's
    /// pretraining corpus), as OpenLLaMA's tokenizer was trained on other data than Llama-2's.
    fn train_tokenizers(&self) -> Result<Vec<PathBuf>> {
        let mixture = fusellm_core::split::read_texts(&self.path("data/pretrain-mixture.jsonl"))?;
        let grammar_heavy = fusellm_core::split::read_texts(&self.path("data/pretrain-grammar-heavy.jsonl"))?;
        std::fs::create_dir_all(self.path("tokenizers")).context(|| "creating the tokenizer folder".into())?;
        FAMILIES
            .iter()
            .enumerate()
            .map(|(i, (name, byte_level))| {
                let out = self.path(&format!("tokenizers/{name}.json"));
                if !out.exists() {
                    let texts = if i == 2 { &grammar_heavy } else { &mixture };
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
        let config = Config::parse(&file, &text).map_err(|e| Error::msg(e.to_string()))?;
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
    /// The body of the [fusion] table; CLM only when None.
    fusion: Option<String>,
    vocab: &'static str,
    steps: u64,
    lr: f64,
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
        }
    }
}

impl Plan {
    fn toml(&self, demo: &Demo, name: &str) -> String {
        let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("JSON");
        let s = demo.sizes;
        let mut t = format!(
            "# demo run `{name}`, written by `fusellm demo`\n[run]\ndir = {}\nseed = {}\n",
            q(&demo.path("runs")),
            demo.seed
        );
        t += &format!(
            "[data]\ncorpus = [{}]\nmax_len = {}\nmargin = 4\n",
            q(&self.corpus),
            s.target.max_positions.min(s.source.max_positions)
        );
        t += &format!("[target]\nmodel = {}\n", q(&self.target));
        for (name, dir) in &self.sources {
            t += &format!("[[sources]]\nname = \"{name}\"\nmodel = {}\n", q(dir));
        }
        t += &format!("[precompute]\nk = 10\ndocs_per_shard = 256\n[align.vocab]\nplugin = \"{}\"\n", self.vocab);
        if let Some(fusion) = &self.fusion {
            t += &format!("[fusion]\n{fusion}\n");
        }
        // CLM alone gets the whole loss; with fusion, the paper's lambda = 0.9.
        let lambda = if self.fusion.is_some() { 0.9 } else { 1.0 };
        t += &format!(
            "[train]\nsteps = {}\nbatch_size = {}\nseq_len = {}\nlr = {}\nwarmup_steps = {}\nmin_lr_ratio = 0.1\nlambda = {lambda}\ncheckpoint_every = {}\n",
            self.steps,
            s.batch,
            s.seq_len,
            self.lr,
            (self.steps / 10).max(1),
            self.steps
        );
        t += &format!("[eval]\nwindow = {}\n[eval.sets]\n", s.seq_len * 2);
        for domain in DOMAINS {
            t += &format!("{domain} = {}\n", q(&demo.path(&format!("data/eval-{domain}.jsonl"))));
        }
        t
    }
}

fn checkpoint(record: &RunRecord) -> Result<PathBuf> {
    record.checkpoint.as_ref().map(PathBuf::from).ok_or_else(|| Error::msg("a demo run ended without a checkpoint"))
}
