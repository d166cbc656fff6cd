//! `fusellm run`, `fusellm validate`, and the stages it chains that have no command of
//! their own yet: `fusellm fuse` and `fusellm train`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use fusellm_core::checkpoint::{Checkpoint, Stored};
use fusellm_core::config::{variants, Config, Variant};
use fusellm_core::pipeline::stage::Stage;
use fusellm_core::pipeline::stages::{Fuse, Train};
use fusellm_core::pipeline::{open_model, validate, Checked, Event, Run, RunRecord};
use fusellm_core::plugins::Registry;
use fusellm_core::train::data::fused_documents;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct RunArgs {
    /// The experiment config (TOML).
    config: PathBuf,
    /// Override a config key, as `train.lambda=0.8` or `fusion.plugin=avg_ce` (repeatable).
    #[arg(long = "set")]
    set: Vec<String>,
}

/// The config's text with the overrides applied, and its variants (one without `[sweep]`).
fn load(args: &RunArgs) -> Result<Vec<(Variant, Config)>> {
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let variants = variants(&args.config, &text, &args.set)?.into_iter();
    Ok(variants.map(|v| Config::of_variant(&args.config, &v).map(|c| (v, c))).collect::<Result<_, _>>()?)
}

/// Draws a run's events on stderr: a line as each stage starts, and a bar of the running
/// stage's progress with its rate and time left (drawn only on a terminal).
#[derive(Default)]
pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn event(&mut self, event: Event) {
        match event {
            Event::Stage { name, reused } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                eprintln!("== {name}{}", if reused { " (unchanged: reused)" } else { "" });
            }
            Event::Progress { done, total, message } => {
                let bar = self.bar.get_or_insert_with(|| {
                    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}  ({elapsed}, ETA {eta})")
                        .expect("a valid template");
                    ProgressBar::new(total).with_style(style)
                });
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(message);
            }
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let launch = fusellm_dist::Launch::from_env()?;
    if launch.world > 1 {
        anyhow::bail!(
            "`fusellm run` runs in one process, and {} started {} ranks; run it once, or its stages up to `fusellm fuse`, then train with `{} fusellm train --config ... --fused ...`",
            launch.launcher.name(),
            launch.world,
            launch.launcher.name()
        );
    }
    let variants = load(&args)?;
    let sweep = variants.len() > 1 || !variants[0].0.name.is_empty();
    let mut registry = Registry::with_builtins()?;
    let (registry, checked) = check_all(&variants, &mut registry)?;
    let mut results = Vec::new();
    for ((variant, config), checked) in variants.iter().zip(&checked) {
        if sweep {
            eprintln!("\n#### variant {}", variant.name);
        }
        let out = if sweep { config.run.dir.join(&variant.slug) } else { config.run.dir.clone() };
        let run = Run {
            config,
            text: variant.text.clone(),
            cache: config.run.dir.join("cache"),
            out: out.clone(),
            git_revision: env!("FUSELLM_GIT_REVISION").into(),
        };
        let mut reporter = Reporter::default();
        let record = run.execute_checked(registry, checked, &mut |e| reporter.event(e))?;
        println!("{}", eval_table(&record));
        println!("run record: {}", out.join("run.json").display());
        results.push((variant.name.clone(), record));
    }
    if sweep {
        let dir = &variants[0].1.run.dir;
        write_sweep(dir, &results)?;
        println!("sweep table: {}", dir.join("sweep.md").display());
    }
    Ok(())
}

/// The evaluation rows as a Markdown table: bits per byte per set, and the average.
fn eval_table(record: &RunRecord) -> String {
    let sets = unique(record.eval.iter().map(|r| r.set.as_str()));
    let models = unique(record.eval.iter().map(|r| r.model.as_str()));
    let header: Vec<&str> = std::iter::once("model").chain(sets.iter().copied()).chain(["average"]).collect();
    let rows = models.into_iter().map(|model| {
        let bpb: Vec<f64> = sets
            .iter()
            .map(|s| record.eval.iter().find(|r| r.model == model && r.set == *s).map_or(f64::NAN, |r| r.bits_per_byte))
            .collect();
        let average = bpb.iter().sum::<f64>() / bpb.len().max(1) as f64;
        std::iter::once(model.to_string()).chain(bpb.iter().chain([&average]).map(|b| format!("{b:.4}"))).collect()
    });
    fusellm_core::table::markdown(&header, rows)
}

/// The distinct items, in order of first appearance.
pub fn unique<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// sweep.json and sweep.md: every variant's trained model, bits per byte per set.
fn write_sweep(dir: &Path, results: &[(String, RunRecord)]) -> Result<()> {
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|(name, r)| {
            let trained: Vec<_> = r.eval.iter().filter(|e| e.model == "trained").collect();
            serde_json::json!({
                "variant": name,
                "checkpoint": r.checkpoint,
                "bits_per_byte": trained.iter().map(|e| (e.set.clone(), serde_json::json!(e.bits_per_byte))).collect::<serde_json::Map<_, _>>(),
                "avg_bits_per_byte": trained.iter().map(|e| e.bits_per_byte).sum::<f64>() / trained.len().max(1) as f64,
            })
        })
        .collect();
    let md = fusellm_core::table::markdown(
        &["variant", "average bits per byte"],
        rows.iter().map(|row| {
            let average = row["avg_bits_per_byte"].as_f64().unwrap_or(f64::NAN);
            vec![row["variant"].as_str().unwrap_or("").to_string(), format!("{average:.4}")]
        }),
    );
    let write = |name: &str, bytes: &[u8]| fusellm_core::files::write_atomically(&dir.join(name), bytes);
    write("sweep.json", &serde_json::to_vec_pretty(&rows).expect("JSON"))?;
    let md = match over_seeds(&rows) {
        Some((groups, table)) => {
            write("sweep-seeds.json", &serde_json::to_vec_pretty(&groups).expect("JSON"))?;
            format!("{md}\nOver `run.seed`:\n\n{table}")
        }
        None => md,
    };
    Ok(write("sweep.md", md.as_bytes())?)
}

/// A sweep over `run.seed`: the variants that differ only in the seed, as one group each
/// with its seeds' average bits per byte, their mean, sample sd and 95% interval; and the
/// table of them. `None` when the sweep does not vary the seed.
fn over_seeds(rows: &[serde_json::Value]) -> Option<(Vec<serde_json::Value>, String)> {
    use fusellm_core::stats::{ci95, mean_sd};
    let mut groups: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for row in rows {
        let name = row["variant"].as_str().unwrap_or_default();
        let (seed, rest): (Vec<&str>, Vec<&str>) = name.split(',').partition(|part| part.starts_with("run.seed="));
        let seed = seed.first()?.trim_start_matches("run.seed=").to_string();
        let (key, value) = (rest.join(","), row["avg_bits_per_byte"].as_f64().unwrap_or(f64::NAN));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, seeds)) => seeds.push((seed, value)),
            None => groups.push((key, vec![(seed, value)])),
        }
    }
    let summary: Vec<serde_json::Value> = groups
        .iter()
        .map(|(key, seeds)| {
            let values: Vec<f64> = seeds.iter().map(|s| s.1).collect();
            let (mean, sd) = mean_sd(&values);
            serde_json::json!({
                "variant": key,
                "seeds": seeds.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
                "avg_bits_per_byte_seeds": values,
                "avg_bits_per_byte": mean,
                "sd": sd,
                "ci95": (values.len() > 1).then(|| ci95(&values)),
            })
        })
        .collect();
    let table = fusellm_core::table::markdown(
        &["variant", "seeds", "mean", "sd", "95% interval"],
        summary.iter().map(|g| {
            let number = |key: &str| g[key].as_f64().map_or(String::new(), |v| format!("{v:.4}"));
            let interval = match g["ci95"].as_array() {
                Some(ci) => {
                    format!("[{:.4}, {:.4}]", ci[0].as_f64().unwrap_or(f64::NAN), ci[1].as_f64().unwrap_or(f64::NAN))
                }
                None => String::new(),
            };
            let shown = g["variant"].as_str().filter(|v| !v.is_empty()).unwrap_or("(all)").to_string();
            vec![
                shown,
                g["seeds"].as_array().map_or(0, Vec::len).to_string(),
                number("avg_bits_per_byte"),
                number("sd"),
                interval,
            ]
        }),
    );
    Some((summary, table))
}

/// Every variant's plugins loaded, then every variant validated: all of a sweep is checked
/// before any of it computes. The registry comes back shared, for the runs.
fn check_all<'r>(
    variants: &[(Variant, Config)],
    registry: &'r mut Registry,
) -> Result<(&'r Registry, Vec<Checked<'r>>)> {
    for (variant, config) in variants {
        config.load_plugins(registry).map_err(|e| anyhow::anyhow!("{e}{}", label(variant)))?;
    }
    let registry = &*registry;
    let check = |(variant, config): &(Variant, Config)| {
        validate(config, registry).map_err(|e| anyhow::anyhow!("{e}{}", label(variant)))
    };
    Ok((registry, variants.iter().map(check).collect::<Result<_>>()?))
}

pub fn validate_cmd(args: RunArgs) -> Result<()> {
    let variants = load(&args)?;
    let mut registry = Registry::with_builtins()?;
    for ((variant, config), checked) in variants.iter().zip(check_all(&variants, &mut registry)?.1) {
        let describe = |c: &fusellm_core::checkpoint::Checkpoint| {
            format!(
                "{} ({}, vocab {}, {} positions)",
                c.dir.display(),
                c.adapter,
                c.spec.vocab_size,
                c.spec.max_positions
            )
        };
        println!("ok{}", label(variant));
        println!("  target  {}", describe(&checked.target));
        for s in &checked.sources {
            println!("  source  {}", describe(s));
        }
        let fusion = checked.fusion.as_ref().map_or("none (CLM only)".to_string(), |f| f.entry.label());
        println!("  align   {} + {}; fusion {fusion}", checked.sequence.entry.label(), checked.vocab.entry.label());
        if let Some(train) = &config.train {
            print_memory(&checked.target.spec, train);
        }
    }
    Ok(())
}

/// The estimated memory per device of training the target: alone, and on 8 ranks with and
/// without ZeRO-1 and activation checkpointing.
fn print_memory(spec: &fusellm_sdk::ModelSpec, train: &fusellm_core::train::TrainConfig) {
    use fusellm_core::train::memory::{estimate, lora_parameters, parameters, Layout};
    let b = &train.batching;
    let trained = match &train.lora {
        Some(lora) => {
            format!("{} LoRA parameters on {}", count(lora_parameters(spec, &lora.adapter)), count(parameters(spec)))
        }
        None => format!("{} parameters", count(parameters(spec))),
    };
    println!(
        "  memory per device, training {trained} in {} at {} x {} tokens per rank (estimated):",
        train.precision, b.batch_size, b.seq_len
    );
    let mut table = crate::table::terminal(["ranks", "weights", "gradients", "optimizer", "activations", "total"]);
    let layouts = [(1, 0, false), (1, 0, true), (8, 0, false), (8, 1, false), (8, 1, true)];
    for (ranks, zero, checkpointing) in layouts {
        let e = estimate(spec, train, Layout { ranks, zero, checkpointing });
        let name = format!(
            "{ranks}{}{}",
            if zero > 0 { ", ZeRO-1" } else { "" },
            if checkpointing { ", checkpointed activations" } else { "" }
        );
        table.add_row([
            name,
            bytes(e.weights),
            bytes(e.gradients),
            bytes(e.optimizer),
            bytes(e.activations),
            bytes(e.total()),
        ]);
    }
    crate::table::align_right(&mut table, 1..6);
    println!("{table}");
}

/// A parameter count in millions or billions.
fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}k", n as f64 / 1e3),
    }
}

/// A byte count in binary units.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n => format!("{:.0} MiB", n as f64 / (1u64 << 20) as f64),
    }
}

fn label(variant: &Variant) -> String {
    if variant.name.is_empty() {
        String::new()
    } else {
        format!(" (variant {})", variant.name)
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// The config whose `[target]` and `[train]` to use.
    #[arg(long)]
    config: PathBuf,
    /// A fused store (`fusellm fuse`).
    #[arg(long)]
    fused: PathBuf,
    /// The run folder (checkpoints, metrics.jsonl, loss.png).
    #[arg(long)]
    out: PathBuf,
    /// Continue from the run folder's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after this step.
    #[arg(long)]
    stop_at: Option<u64>,
    #[arg(long = "set")]
    set: Vec<String>,
}

/// The train stage of `fusellm run` on a fused store: the same config resolution (its
/// plugins, the target's adapter, `[train] dtype`, `[run] device`), the same wiring. Under
/// a launcher (`mpirun -np N`, `srun`), one rank of data-parallel training; an error on any
/// rank stops them all with that rank's error.
pub fn train(args: TrainArgs) -> Result<()> {
    crate::check_output(&args.out, &[&args.fused, &args.config])?;
    let launch = fusellm_dist::Launch::from_env()?;
    let run_args = RunArgs { config: args.config.clone(), set: args.set.clone() };
    let config = match load(&run_args) {
        Ok(variants) => variants.into_iter().next().expect("one variant at least").1,
        // Before the ranks have joined: this rank says which it is and ends, and the
        // launcher stops the others.
        Err(e) if launch.world > 1 => {
            eprintln!("error: rank {} of {}: {e:#}", launch.rank, launch.world);
            std::process::exit(2)
        }
        Err(e) => return Err(e),
    };
    // GPU ranks meet over NCCL, CPU ranks over MPI.
    let devices = match config.run.device.starts_with("cuda") {
        true => fusellm_dist::Devices::Gpu,
        false => fusellm_dist::Devices::Cpu,
    };
    let comm = fusellm_dist::join(&launch, devices)?;
    if comm.world() == 1 {
        return train_on(&*comm, config, args);
    }
    // A panic too stops every rank at once (unwinding would finalise MPI and leave the
    // others waiting for the timeout); the panic message is already on stderr.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| train_on(&*comm, config, args))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            eprintln!("error: rank {} of {}: {e:#}", comm.rank(), comm.world());
            comm.abort(2)
        }
        Err(_) => {
            eprintln!("error: rank {} of {} panicked", comm.rank(), comm.world());
            comm.abort(2)
        }
    }
}

fn train_on(comm: &dyn fusellm_dist::Communicator, config: Config, args: TrainArgs) -> Result<()> {
    let mut registry = Registry::with_builtins()?;
    config.load_plugins(&mut registry)?;
    let target = config.target.as_ref().ok_or_else(|| config.error_at("target", "needs a [target] model"))?;
    let checkpoint = open_model(target, &registry)?;
    let docs = fused_documents(&args.fused)?.1;
    let mut reporter = Reporter::default();
    let (resume, stop_at) = (Some(args.resume), args.stop_at);
    let train = Train { config: &config, target: &checkpoint, docs, resume, stop_at, comm };
    let summary = train.run(&args.out, &mut |e| reporter.event(e))?;
    if comm.rank() > 0 {
        return Ok(());
    }
    eprintln!(
        "\nstep {}: {} ({} tokens in {:.1} s)",
        summary.step,
        summary.checkpoint.display(),
        summary.tokens,
        summary.seconds
    );
    Ok(())
}

#[derive(Args)]
pub struct FuseArgs {
    /// The target model's store.
    #[arg(long)]
    target: PathBuf,
    /// Each source's aligned store (`fusellm align` against the same target store).
    #[arg(long = "aligned", required = true)]
    aligned: Vec<PathBuf>,
    /// The config whose `[fusion]` plugin and parameters to use (and whose `[target]`, if it
    /// has one, reads the target store's checkpoint with its adapter).
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

pub fn fuse(args: FuseArgs) -> Result<()> {
    let inputs: Vec<&Path> =
        std::iter::once(args.target.as_path()).chain(args.aligned.iter().map(|p| p.as_path())).collect();
    crate::check_output(&args.out, &inputs)?;
    let config = Config::load(&args.config)?;
    let mut registry = Registry::with_builtins()?;
    config.load_plugins(&mut registry)?;
    let choice = config.fusion.as_ref().ok_or_else(|| config.error_at("fusion", "needs a [fusion] section"))?;
    let fusion = choice.find(&registry)?;
    // The config's target, read by the adapter it names; else the store's model by its model_type.
    let target = match &config.target {
        Some(target) => open_model(target, &registry)?,
        None => Checkpoint::of_store(&args.target, &registry, None)?,
    };
    let target = Stored { dir: &args.target, checkpoint: &target };
    let manifest = Fuse { target, aligned: &args.aligned, fusion: &fusion }.complete(&args.out, &mut |_| ())?;
    eprintln!(
        "{} documents, {} positions, {:.2} entries per position -> {}",
        manifest.documents,
        manifest.positions,
        manifest.entries as f64 / manifest.positions.max(1) as f64,
        args.out.display()
    );
    Ok(())
}
