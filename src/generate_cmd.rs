//! `fusellm generate`: greedy decoding from a checkpoint, for smoke checks.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::Args;
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::model::generate::greedy;
use fusellm_core::model::LoadMode;
use fusellm_core::plugins::Registry;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text; empty: start from BOS where the model's convention has one.
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Print the generated token ids, separated by spaces, instead of text.
    #[arg(long)]
    ids: bool,
    /// The adapter to read the checkpoint with (default: by config.json's model_type).
    #[arg(long)]
    adapter: Option<String>,
    /// A plugin file to load (repeatable; .so/.dylib/.dll or .wasm): a third-party adapter
    /// in it reads the checkpoints whose model_type it declares, or is named by --adapter.
    #[arg(long = "plugin")]
    plugins: Vec<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<(), String> {
    let mut registry = Registry::with_builtins().map_err(|e| e.message)?;
    registry.load_files(&args.plugins).map_err(|e| e.message)?;
    let checkpoint = Checkpoint::open(&args.model, &registry, args.adapter.as_deref()).map_err(|e| e.message)?;
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &Device::Cpu).map_err(|e| e.message)?;
    let prompt = checkpoint.tokenizer.encode(&args.prompt).map_err(|e| e.message)?;
    let new = greedy(&model, &prompt, args.max_new_tokens).map_err(|e| e.message)?;
    if args.ids {
        println!("{}", new.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    } else {
        println!("{}", checkpoint.tokenizer.decode(&new).map_err(|e| e.message)?);
    }
    Ok(())
}
