//! The `fusellm` command line: parses, validates, and calls fusellm-core.

mod align_cmd;
mod bench_cmd;
mod demo_cmd;
mod eval_cmd;
mod generate_cmd;
mod model_args;
mod plugins_cmd;
mod run_cmd;
mod split_cmd;
mod store_cmd;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Built-in plugin crates register through `inventory`; referencing them keeps the linker
// from dropping their registrations.
use fusellm_align as _;
use fusellm_ce_fusion as _;
use fusellm_gemma as _;
use fusellm_gpt_neox as _;
use fusellm_llama as _;
use fusellm_mpt as _;
use fusellm_phi3 as _;

#[derive(Parser)]
#[command(name = "fusellm", version, about = "Knowledge fusion of large language models (FuseLLM)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List, check and benchmark plugins.
    #[command(subcommand)]
    Plugins(plugins_cmd::PluginsCommand),
    /// Greedy decoding from a checkpoint (CPU, f32), for smoke checks.
    Generate(generate_cmd::GenerateArgs),
    /// Cut a corpus into pieces whose tokenization fits every model's context.
    Split(split_cmd::SplitArgs),
    /// Run a model over the split corpus and keep its top-k in a store.
    Precompute(store_cmd::PrecomputeArgs),
    /// Distribution stores.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Align a source's store to the target's: an aligned store and a report.
    Align(align_cmd::AlignArgs),
    /// Map a source tokenizer's vocabulary onto a target's (EM or MinED), as JSON.
    VocabMap(align_cmd::VocabMapArgs),
    /// Fuse the target's store with the sources' aligned stores (the config's `[fusion]`).
    Fuse(run_cmd::FuseArgs),
    /// Train the target (the config's `[target]` and `[train]`) on a fused store.
    Train(run_cmd::TrainArgs),
    /// Run an experiment: split, precompute, align, fuse, train, eval; unchanged stages are reused.
    Run(run_cmd::RunArgs),
    /// Check an experiment config (files, plugins, parameters, shapes) without computing.
    Validate(run_cmd::RunArgs),
    /// The embedded default: the FuseLLM experiment in miniature, built from code alone.
    Demo(demo_cmd::DemoArgs),
    /// Evaluate checkpoints: bits per byte, perplexity, multiple-choice accuracy; ensembles.
    Eval(eval_cmd::EvalArgs),
    /// Merge checkpoints of one architecture: weighted average or task arithmetic.
    Merge(eval_cmd::MergeArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
}

fn main() -> ExitCode {
    keep_freed_memory();
    one_pool_of_threads();
    report_warnings();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plugins(cmd) => plugins_cmd::run(cmd),
        Command::Bench(cmd) => bench_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Split(args) => split_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Precompute(args) => store_cmd::run_precompute(args).map(|()| ExitCode::SUCCESS),
        Command::Store(cmd) => {
            store_cmd::run_store(cmd).map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Align(args) => align_cmd::align(args).map(|()| ExitCode::SUCCESS),
        Command::VocabMap(args) => align_cmd::vocab_map(args).map(|()| ExitCode::SUCCESS),
        Command::Fuse(args) => run_cmd::fuse(args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => run_cmd::train(args).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Validate(args) => run_cmd::validate_cmd(args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Eval(args) => eval_cmd::eval(args).map(|()| ExitCode::SUCCESS),
        Command::Merge(args) => eval_cmd::merge(args).map(|()| ExitCode::SUCCESS),
        Command::Generate(args) => generate_cmd::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The error with its causes, "what: cause: cause".
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Training frees and allocates the same large tensors every step. glibc's defaults give
/// blocks over 128 KB back to the system at once (munmap, heap trim), so each step paid page
/// faults, zeroing and TLB shootdowns for them again: a sixth of a small model's step. Up to
/// glibc's largest mmap threshold (32 MB), freed memory now stays in the heap for reuse; the
/// peak is unchanged, since the same tensors are live at the peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One heap for all threads: a per-thread heap would keep its own freed tensors.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// candle runs its element-wise ops on a thread pool of its own, whose workers spin after
/// each op; the GEMMs and fusellm's kernels run on rayon's pool. On two cores the spinning
/// worker took a sixth of a small model's training step from the threads doing the work.
/// The element-wise ops left to candle are a few percent of the work, so unless the user
/// chose otherwise they run on the calling thread and rayon's pool is the only one.
fn one_pool_of_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet to read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// The library's warnings (a skipped corpus line, a corrupt shard computed again) on
/// stderr, as `WARN ...` lines; `RUST_LOG` chooses other levels and modules.
fn report_warnings() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .without_time()
        .with_target(false)
        .init();
}

/// Refuses an `--out` that is one of the command's inputs or holds one.
fn check_output(out: &std::path::Path, inputs: &[&std::path::Path]) -> anyhow::Result<()> {
    fusellm_core::files::check_output(out, inputs).map_err(|e| anyhow::anyhow!("--out: {e}"))
}
