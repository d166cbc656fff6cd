//! `fusellm generate`: greedy decoding from a checkpoint, for smoke checks.

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;
use fusellm_core::model::generate::greedy;
use fusellm_core::model::LoadMode;

use crate::model_args::ModelArgs;

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
    #[command(flatten)]
    open: ModelArgs,
}

pub fn run(args: GenerateArgs) -> Result<(), String> {
    let registry = args.open.plugins.registry().map_err(|e| e.message)?;
    let checkpoint = args.open.open(&registry, &args.model).map_err(|e| e.message)?;
    let device = args.open.device().map_err(|e| e.message)?;
    let model = checkpoint.load_model(LoadMode::Frozen, DType::F32, &device).map_err(|e| e.message)?;
    let prompt = checkpoint.tokenizer.encode(&args.prompt).map_err(|e| e.message)?;
    let new = greedy(&model, &prompt, args.max_new_tokens).map_err(|e| e.message)?;
    if args.ids {
        println!("{}", new.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    } else {
        println!("{}", checkpoint.tokenizer.decode(&new).map_err(|e| e.message)?);
    }
    Ok(())
}
