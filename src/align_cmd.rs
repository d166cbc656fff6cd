//! `fusellm vocab-map` (a vocabulary map between two tokenizers, as JSON) and
//! `fusellm align` (a source's store aligned to the target's).

use anyhow::{Context, Result};
use std::path::PathBuf;

use clap::Args;
use fusellm_core::align::vocab::{map_vocab, Vocabulary};
use fusellm_core::checkpoint::{Checkpoint, Stored};
use fusellm_core::pipeline::stage::Stage;
use fusellm_core::pipeline::stages::Align;
use fusellm_core::plugins::{default_cache_dir, Configured};
use fusellm_sdk::PluginKind;

use crate::model_args::PluginArgs;

#[derive(Args)]
pub struct VocabMapArgs {
    /// The source model's tokenizer.json.
    #[arg(long)]
    source: PathBuf,
    /// The target model's tokenizer.json.
    #[arg(long)]
    target: PathBuf,
    /// The vocabulary mapper: em, mined, or one a --plugin file holds (ms maps by corpus
    /// statistics: `fusellm align` or `run`).
    #[arg(long)]
    method: String,
    /// Reproduce the paper's mapping exactly: only the space marker swapped, no byte or
    /// special-token normalisation.
    #[arg(long)]
    compat: bool,
    /// Where to write the JSON object: source token string -> target token string (null
    /// where there is none).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
}

pub fn vocab_map(args: VocabMapArgs) -> Result<()> {
    let source = Vocabulary::from_tokenizer_json(&args.source)?;
    let target = Vocabulary::from_tokenizer_json(&args.target)?;
    let registry = args.plugins.registry()?;
    let mapper = &Configured::named(&registry, PluginKind::VocabMapper, &args.method)?;
    let start = std::time::Instant::now();
    let map = map_vocab(mapper, &source, &target, args.compat, default_cache_dir().as_deref(), None)?;
    let json: serde_json::Map<String, serde_json::Value> = source
        .tokens
        .iter()
        .zip(&map.target)
        .map(|(s, t)| (s.clone(), t.map_or(serde_json::Value::Null, |t| target.tokens[t as usize].clone().into())))
        .collect();
    let text = serde_json::to_string_pretty(&json).expect("JSON");
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    let exact = map.distance.iter().zip(&map.target).filter(|(d, t)| **d == 0 && t.is_some()).count();
    eprintln!(
        "{} source tokens: {exact} exact, {} by edit distance, {} unmapped ({:.2} s) -> {}",
        source.tokens.len(),
        map.target.iter().flatten().count() - exact,
        map.target.iter().filter(|t| t.is_none()).count(),
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct AlignArgs {
    /// The source model's store (`fusellm precompute`).
    #[arg(long)]
    source: PathBuf,
    /// The target model's store, over the same split corpus.
    #[arg(long)]
    target: PathBuf,
    /// Where to write the aligned store and report.json.
    #[arg(long)]
    out: PathBuf,
    /// The sequence aligner: dtw, offsets, or one a --plugin file holds.
    #[arg(long, default_value = "dtw")]
    aligner: String,
    /// The vocabulary mapper: mined, em, or one a --plugin file holds.
    #[arg(long, default_value = "mined")]
    vocab: String,
    /// The paper's projection and normalisation, defects included.
    #[arg(long)]
    compat: bool,
    /// The adapter that reads the source's checkpoint (default: by its model_type).
    #[arg(long)]
    source_adapter: Option<String>,
    /// The adapter that reads the target's checkpoint (default: by its model_type).
    #[arg(long)]
    target_adapter: Option<String>,
    #[command(flatten)]
    plugins: PluginArgs,
}

pub fn align(args: AlignArgs) -> Result<()> {
    crate::check_output(&args.out, &[&args.source, &args.target])?;
    let registry = args.plugins.registry()?;
    let aligner = Configured::named(&registry, PluginKind::SequenceAligner, &args.aligner)?;
    let mapper = Configured::named(&registry, PluginKind::VocabMapper, &args.vocab)?;
    let of_store = |store, adapter| Checkpoint::of_store(store, &registry, adapter);
    let source = of_store(&args.source, args.source_adapter.as_deref())?;
    let target = of_store(&args.target, args.target_adapter.as_deref())?;
    let start = std::time::Instant::now();
    let cache = default_cache_dir();
    let report = Align {
        source: Stored { dir: &args.source, checkpoint: &source },
        target: Stored { dir: &args.target, checkpoint: &target },
        sequence: &aligner,
        vocab: &mapper,
        compat: args.compat,
        cache: cache.as_deref(),
    }
    .complete(&args.out, &mut |_| ())?;
    println!(
        "{} documents, {} target positions in {:.1} s",
        report.documents,
        report.target_positions,
        start.elapsed().as_secs_f64()
    );
    let [positions, mass] = report.summary();
    println!("{positions}\n{mass}");
    println!("mapping distances (0..10, more): {:?}", report.distance_histogram);
    println!("report: {}", args.out.join("report.json").display());
    Ok(())
}
