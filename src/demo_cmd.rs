//! `fusellm demo`: the embedded default experiment (see fusellm-demo).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use fusellm_core::pipeline::Event;
use fusellm_core::plugins::Registry;
use fusellm_demo::{transfer, Demo, SeedResults, Setup, Sizes};

#[derive(Args)]
pub struct DemoArgs {
    /// Where everything goes: data, tokenizers, models, runs, results.json.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// The reduced size (seconds in a release build; what CI runs).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 0, conflicts_with = "seeds")]
    seed: u64,
    /// Run once per seed (each into `<out>/seed-N`) and report every row's mean and spread
    /// and each method's paired difference to CLM: `--seeds 0,1,2`.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// The real tokenizers and corpora of this fixtures folder instead of the procedural
    /// ones (examples/real-tokenizers; about 12 minutes).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Instead of the table: sweep the controls of transfer (lambda, continual steps, the
    /// target's size, top-k) one at a time, CLM and MinCE at each point, over `--seeds`
    /// (0,1,2 when none are given); writes `<out>/transfer.json` and `transfer.md`.
    #[arg(long, conflicts_with = "seed")]
    transfer: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let start = Instant::now();
    let mut registry = Registry::with_builtins()?;
    let (setup, sizes) = match (&args.fixtures, args.quick) {
        (Some(dir), _) => (Setup::Fixtures(dir.clone()), Sizes::real()),
        (None, true) => (Setup::Procedural, Sizes::quick()),
        (None, false) => (Setup::Procedural, Sizes::full()),
    };
    let mut reporter = crate::run_cmd::Reporter::default();
    let mut events = |e: Event| reporter.event(e);
    if args.transfer {
        let seeds = if args.seeds.is_empty() { vec![0, 1, 2] } else { args.seeds.clone() };
        let mut runs = Vec::new();
        for &seed in &seeds {
            let out = args.out.join(format!("seed-{seed}"));
            let setup = setup.clone();
            runs.push(Demo { out, setup, sizes, seed, events: &mut events }.transfer(&mut registry)?);
        }
        let rows = transfer::gather(&seeds, &runs, &sizes)?;
        transfer::write(&args.out, &rows, seeds.len())?;
        println!("{}", transfer::markdown(&rows, seeds.len()));
        println!("{:.0} s; {}", start.elapsed().as_secs_f64(), args.out.join("transfer.json").display());
        return Ok(());
    }
    if args.seeds.is_empty() {
        let results =
            Demo { out: args.out.clone(), setup, sizes, seed: args.seed, events: &mut events }.run(&mut registry)?;
        println!("{}", results.markdown());
    } else {
        let mut runs = Vec::new();
        for &seed in &args.seeds {
            let out = args.out.join(format!("seed-{seed}"));
            let setup = setup.clone();
            runs.push(Demo { out, setup, sizes, seed, events: &mut events }.run(&mut registry)?);
        }
        let results = SeedResults::new(&args.seeds, &runs)?;
        results.write(&args.out)?;
        println!("{}", results.markdown());
    }
    println!(
        "{:.0} s; {} (also results.md, results.png, loss.png)",
        start.elapsed().as_secs_f64(),
        args.out.join("results.json").display()
    );
    Ok(())
}
