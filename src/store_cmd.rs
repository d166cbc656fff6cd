//! `fusellm precompute` and `fusellm store verify`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use fusellm_core::pipeline::stage::Stage;
use fusellm_core::pipeline::stages::Precompute;
use fusellm_core::store::{merge, verify, Options};
use fusellm_core::train::Precision;

use crate::model_args::ModelArgs;

#[derive(Clone, Copy, ValueEnum)]
enum LogprobDtype {
    F16,
    F32,
}

#[derive(Args)]
pub struct PrecomputeArgs {
    /// The model's checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// The pieces written by `fusellm split` (JSONL with a `text` field).
    #[arg(long)]
    corpus: PathBuf,
    /// The store folder to fill (created, or continued after an interruption).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// The dtype the store keeps log-probabilities in (`[precompute] dtype`).
    #[arg(long, value_enum, default_value = "f16")]
    dtype: LogprobDtype,
    /// The dtype the model computes in (`[run] dtype`; bf16 needs a CUDA device).
    #[arg(long, default_value = "f32")]
    compute_dtype: Precision,
    /// Also keep the probability mass outside the top-k.
    #[arg(long)]
    residual: bool,
    #[arg(long, default_value_t = 256)]
    docs_per_shard: usize,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// This worker's slice, `i/N`: the shards s with s % N == i. Under a launcher (mpirun,
    /// srun, torchrun) of N ranks, rank i takes slice i/N without it.
    #[arg(long)]
    shard: Option<String>,
    #[command(flatten)]
    open: ModelArgs,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Check every shard of a store against the hashes of its manifest.
    Verify { dir: PathBuf },
    /// Gather the shards of stores filled in separate folders into one.
    Merge {
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

pub fn run_precompute(args: PrecomputeArgs) -> Result<()> {
    crate::check_output(&args.out, &[&args.model, &args.corpus])?;
    let launch = fusellm_dist::Launch::from_env()?;
    let worker = match (&args.shard, launch.world) {
        (None, _) => (launch.rank, launch.world),
        (Some(spec), 1) => parse_worker(spec)?,
        (Some(spec), n) => anyhow::bail!(
            "--shard {spec} under {} with {n} ranks: each rank takes its slice from its rank; give --shard or start ranks, not both",
            launch.launcher.name()
        ),
    };
    let registry = args.open.plugins.registry()?;
    let checkpoint = args.open.open(&registry, &args.model)?;
    let device = fusellm_core::device::parse(&fusellm_core::device::for_rank(
        &args.open.device,
        launch.local_rank,
        launch.world,
    ))?;
    let options = Options {
        k: args.k,
        half: matches!(args.dtype, LogprobDtype::F16),
        residual: args.residual,
        docs_per_shard: args.docs_per_shard,
        batch_tokens: args.batch_tokens,
    };
    let start = Instant::now();
    let mut reporter = crate::run_cmd::Reporter::default();
    let (corpus, dtype) = (args.corpus.as_path(), args.compute_dtype);
    let precompute = Precompute { checkpoint: &checkpoint, corpus, options, device: &device, dtype, worker };
    let summary = precompute.run(&args.out, &mut |e| reporter.event(e))?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} shards written ({} already there), {} tokens in {secs:.1} s ({:.0} tokens/s)",
        summary.written,
        summary.skipped,
        summary.tokens,
        summary.tokens as f64 / secs
    );
    if let Ok(v) = verify(&args.out) {
        eprintln!(
            "store complete: {} tokens, {:.1} bytes per token",
            v.tokens,
            v.bytes as f64 / v.tokens.max(1) as f64
        );
    }
    Ok(())
}

fn parse_worker(spec: &str) -> Result<(usize, usize)> {
    let parse = || -> Option<(usize, usize)> {
        let (i, n) = spec.split_once('/')?;
        Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
    };
    parse()
        .filter(|&(i, n)| i < n)
        .ok_or_else(|| anyhow::anyhow!("--shard {spec}: expected i/N with i < N, such as 0/4"))
}

pub fn run_store(cmd: StoreCommand) -> Result<bool> {
    let dir = match cmd {
        StoreCommand::Verify { dir } => dir,
        StoreCommand::Merge { out, inputs } => {
            let shards = merge(&out, &inputs)?;
            eprintln!("{shards} shards in {}", out.display());
            out
        }
    };
    let v = verify(&dir)?;
    for file in &v.missing {
        println!("missing  {file}");
    }
    for file in &v.corrupt {
        println!("corrupt  {file} (its hash differs from the manifest: run precompute again after removing it)");
    }
    let ok = v.missing.is_empty() && v.corrupt.is_empty();
    println!(
        "{}: {} tokens, {:.1} bytes per token",
        if ok { "complete" } else { "INCOMPLETE" },
        v.tokens,
        v.bytes as f64 / v.tokens.max(1) as f64
    );
    Ok(ok)
}
