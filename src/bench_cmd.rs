//! `fusellm bench ...`: benchmarks whose ratios are measured within one run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Subcommand;
use fusellm_core::model::Transformer;
use fusellm_core::plugins::bench::{time_fusion, PAPER_SHAPE};
use fusellm_core::plugins::conformance::Shape;
use fusellm_core::plugins::{Entry, Registry, Tier};
use fusellm_sdk::{CheckpointFiles, PluginKind};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward passes of a small Llama (f32, CPU): tokens per second.
    Forward {
        #[arg(long, default_value_t = 32000)]
        vocab: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
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

pub fn run(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Forward { vocab, batch, seq, iters } => forward(vocab, batch, seq, iters).map_err(|e| e.message),
        BenchCommand::Plugins { dylib, wasm, iters, positions } => plugins(&dylib, &wasm, iters, positions),
    }
}

/// The small Llama of the benchmarks: 2 layers, d_model 128, 4 heads.
fn small_llama(vocab: usize) -> fusellm_core::error::Result<fusellm_sdk::ModelSpec> {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5
    });
    let registry = Registry::with_builtins()?;
    let adapter = registry.get(PluginKind::Adapter, "llama")?;
    let files = CheckpointFiles { config_json: &config.to_string(), tokenizer_json: None };
    Ok(adapter.adapt(&adapter.resolve_params(&Default::default()).expect("no parameters"), files)?)
}

fn forward(vocab: usize, batch: usize, seq: usize, iters: usize) -> fusellm_core::error::Result<()> {
    let model = Transformer::init(&small_llama(vocab)?, 0, 0.02, &Device::Cpu)?;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7919 % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
    model.forward(&ids, None)?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        std::hint::black_box(model.forward(&ids, None)?);
    }
    let per_pass = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    println!(
        "forward, small Llama (2 layers, d_model 128, 4 heads, vocab {vocab}), batch {batch} x {seq}, f32 CPU: \
         {:.1} ms per pass, {:.0} tokens/s",
        per_pass * 1e3,
        (batch * seq) as f64 / per_pass
    );
    Ok(())
}

fn plugins(dylib: &Path, wasm: &Path, iters: usize, positions: usize) -> Result<(), String> {
    let shape = Shape { positions, ..PAPER_SHAPE };
    let builtin = Registry::with_builtins().map_err(|e| e.message)?;
    let from_file = |tier, path: &Path| {
        let mut r = Registry::empty();
        r.load_file(tier, path).map_err(|e| e.message)?;
        Ok::<_, String>(r)
    };
    let tiers = [builtin, from_file(Tier::Dylib, dylib)?, from_file(Tier::Wasm, wasm)?];
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
    Ok(())
}
