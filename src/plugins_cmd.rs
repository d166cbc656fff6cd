//! `fusellm plugins ...` and `fusellm bench plugins`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use fusellm_core::config::Config;
use fusellm_core::plugins::bench::{time_fusion, PAPER_SHAPE};
use fusellm_core::plugins::conformance::{check_fusion, Shape};
use fusellm_core::plugins::{Entry, Registry, Tier};
use fusellm_sdk::PluginKind;

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Every plugin the registry knows: built-ins, and those a config names.
    List {
        /// Also load the plugins named by this experiment config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print a JSON array of {name, kind, tier, version, source, params}.
        #[arg(long)]
        json: bool,
    },
    /// Run the conformance check on a plugin: a registered name, or a .wasm / .so file.
    Test {
        spec: String,
        /// Only this plugin of the file.
        #[arg(long)]
        name: Option<String>,
        /// Also load the plugins named by this experiment config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One fusion call (2048 positions x 3 candidates x top-10) in each tier.
    Plugins {
        /// The ce-fusion plugins built as a dylib.
        #[arg(long, default_value = "target/release/libfusellm_ce_fusion.so")]
        dylib: PathBuf,
        /// The ce-fusion plugins built as a WASM component.
        #[arg(long, default_value = "target/wasm32-wasip2/plugin-wasm/fusellm_ce_fusion.wasm")]
        wasm: PathBuf,
        #[arg(long, default_value_t = 200)]
        iters: usize,
        /// Positions per document (the paper: 2048).
        #[arg(long, default_value_t = PAPER_SHAPE.positions)]
        positions: usize,
    },
}

pub fn run(cmd: PluginsCommand) -> Result<ExitCode, String> {
    match cmd {
        PluginsCommand::List { config, json } => {
            let registry = registry(config.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing(&registry)).expect("JSON"));
            } else {
                print_table(&registry);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginsCommand::Test { spec, name, config } => test(&spec, name.as_deref(), config.as_deref()),
    }
}

fn registry(config: Option<&Path>) -> Result<Registry, String> {
    let mut registry = Registry::with_builtins().map_err(|e| e.message)?;
    if let Some(path) = config {
        let config = Config::load(path).map_err(|e| e.to_string())?;
        config.load_plugins(&mut registry).map_err(|e| e.to_string())?;
    }
    Ok(registry)
}

fn listing(registry: &Registry) -> serde_json::Value {
    registry
        .entries()
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.info.name,
                "kind": e.info.kind,
                "tier": e.tier.as_str(),
                "version": e.info.version,
                "source": e.origin,
                "doc": e.info.doc,
                "params": e.info.params,
            })
        })
        .collect()
}

fn print_table(registry: &Registry) {
    println!("{:<20} {:<8} {:<8} {:<8} source", "name", "kind", "tier", "version");
    for e in registry.entries() {
        println!(
            "{:<20} {:<8} {:<8} {:<8} {}",
            e.info.name,
            e.info.kind.as_str(),
            e.tier.as_str(),
            e.info.version,
            e.origin
        );
        println!("    {}", e.info.doc);
        for p in &e.info.params {
            println!("    {} ({}, default {}): {}", p.name, p.type_label(), p.default, p.doc);
        }
    }
}

fn test(spec: &str, name: Option<&str>, config: Option<&Path>) -> Result<ExitCode, String> {
    let mut registry = registry(config)?;
    let names = if Path::new(spec).extension().is_some() {
        let path = Path::new(spec);
        let tier = Tier::of_file(path).map_err(|e| e.message)?;
        let held = registry.load_file(tier, path).map_err(|e| e.message)?;
        match name {
            Some(n) if held.iter().any(|h| h == n) => vec![n.to_string()],
            Some(n) => return Err(format!("{spec} holds no plugin `{n}`; it holds: {}", held.join(", "))),
            None => held,
        }
    } else {
        vec![spec.to_string()]
    };
    let mut failed = 0;
    for name in names {
        let entry = registry.get(PluginKind::Fusion, &name).map_err(|e| e.message)?;
        println!("{}", entry.label());
        for check in check_fusion(entry) {
            match check.outcome {
                Ok(()) => println!("  ok    {}", check.name),
                Err(e) => {
                    failed += 1;
                    println!("  FAIL  {}: {e}", check.name);
                }
            }
        }
    }
    if failed > 0 {
        println!("{failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    println!("all checks passed");
    Ok(ExitCode::SUCCESS)
}

pub fn bench(cmd: BenchCommand) -> Result<ExitCode, String> {
    let BenchCommand::Plugins { dylib, wasm, iters, positions } = cmd;
    let shape = Shape { positions, ..PAPER_SHAPE };
    let builtin = Registry::with_builtins().map_err(|e| e.message)?;
    let from_file = |tier, path: &Path| {
        let mut r = Registry::empty();
        r.load_file(tier, path).map_err(|e| e.message)?;
        Ok::<_, String>(r)
    };
    let tiers = [builtin, from_file(Tier::Dylib, &dylib)?, from_file(Tier::Wasm, &wasm)?];
    println!(
        "one fusion call: {} positions x {} candidates x top-{}, median of {iters} (release build recommended)",
        shape.positions, shape.candidates, shape.top_k
    );
    println!("{:<10} {:>12} {:>12} {:>8} {:>12} {:>8}", "plugin", "builtin", "dylib", "ratio", "wasm", "ratio");
    for name in ["min_ce", "avg_ce"] {
        let mut micros = Vec::new();
        for registry in &tiers {
            let entry: &Entry = registry.get(PluginKind::Fusion, name).map_err(|e| e.message)?;
            let params = entry.resolve_params(&Default::default()).map_err(|e| e.message)?;
            let t = time_fusion(entry, &params, shape, iters).map_err(|e| e.message)?;
            micros.push(t.as_secs_f64() * 1e6);
        }
        println!(
            "{name:<10} {:>10.1}us {:>10.1}us {:>7.2}x {:>10.1}us {:>7.2}x",
            micros[0],
            micros[1],
            micros[1] / micros[0],
            micros[2],
            micros[2] / micros[0]
        );
    }
    Ok(ExitCode::SUCCESS)
}
