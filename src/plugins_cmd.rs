//! `fusellm plugins ...` and `fusellm bench plugins`.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use fusellm_core::config::Config;
use fusellm_core::plugins::conformance::check;
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
        /// Only plugins of this kind: adapter, sequence-aligner, vocab-mapper, fusion, or
        /// aligner for both kinds of aligner.
        #[arg(long)]
        kind: Option<String>,
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

pub fn run(cmd: PluginsCommand) -> Result<ExitCode> {
    match cmd {
        PluginsCommand::List { config, json, kind } => {
            let registry = registry(config.as_deref())?;
            let kinds = kinds(kind.as_deref())?;
            let entries: Vec<&Entry> = registry.entries().iter().filter(|e| kinds.contains(&e.info.kind)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&listing(&entries)).expect("JSON"));
            } else {
                print_table(&entries);
            }
            Ok(ExitCode::SUCCESS)
        }
        PluginsCommand::Test { spec, name, config } => test(&spec, name.as_deref(), config.as_deref()),
    }
}

fn registry(config: Option<&Path>) -> Result<Registry> {
    let mut registry = Registry::with_builtins()?;
    if let Some(path) = config {
        let config = Config::load(path)?;
        config.load_plugins(&mut registry)?;
    }
    Ok(registry)
}

/// The kinds a `--kind` filter names; all without one.
fn kinds(filter: Option<&str>) -> Result<Vec<PluginKind>> {
    match filter {
        None => Ok(PluginKind::ALL.to_vec()),
        Some("aligner") => Ok(vec![PluginKind::SequenceAligner, PluginKind::VocabMapper]),
        Some(name) => PluginKind::ALL.into_iter().find(|k| k.as_str() == name).map(|k| vec![k]).ok_or_else(|| {
            let names = PluginKind::ALL.map(PluginKind::as_str);
            anyhow::anyhow!(
                "--kind {name}: not a plugin kind{}; kinds: {}, aligner (both aligners)",
                fusellm_sdk::suggest::did_you_mean(name, names.into_iter().chain(["aligner"])),
                names.join(", ")
            )
        }),
    }
}

fn listing(entries: &[&Entry]) -> serde_json::Value {
    entries
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

/// One row per plugin; its doc and parameters (with type and default) under its name.
fn print_table(entries: &[&Entry]) {
    let mut table = crate::table::terminal(["name", "kind", "tier", "version", "about"]);
    for e in entries {
        let params = e
            .info
            .params
            .iter()
            .map(|p| format!("\n- {} ({}, default {}): {}", p.name, p.type_label(), p.default, p.doc));
        let about = format!("{}\nfrom {}{}", e.info.doc, e.origin, params.collect::<String>());
        table.add_row([e.info.name.as_str(), e.info.kind.as_str(), e.tier.as_str(), &e.info.version, &about]);
    }
    println!("{table}");
}

fn test(spec: &str, name: Option<&str>, config: Option<&Path>) -> Result<ExitCode> {
    let mut registry = registry(config)?;
    let is_file = Path::new(spec).extension().is_some();
    let names = if is_file {
        let path = Path::new(spec);
        let tier = Tier::of_file(path)?;
        let held = registry.load_file(tier, path)?;
        match name {
            Some(n) if held.iter().any(|h| h == n) => vec![n.to_string()],
            Some(n) => anyhow::bail!("{spec} holds no plugin `{n}`; it holds: {}", held.join(", ")),
            None => held,
        }
    } else {
        vec![spec.to_string()]
    };
    let mut failed = 0;
    for name in names {
        let entry = registry.find(&name)?;
        println!("{} ({})", entry.label(), entry.info.kind);
        for check in check(entry) {
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
