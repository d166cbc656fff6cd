//! `fusellm generate`: greedy decoding from a checkpoint, for smoke checks.

use anyhow::Result;
use std::path::PathBuf;

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
    /// The dtype the model computes in (as `[run] dtype`; bf16 needs a CUDA device).
    #[arg(long, default_value = "f32")]
    dtype: fusellm_core::train::Precision,
    #[command(flatten)]
    open: ModelArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let registry = args.open.plugins.registry()?;
    let checkpoint = args.open.open(&registry, &args.model)?;
    let device = args.open.device()?;
    let model = checkpoint.load_model(LoadMode::Frozen, args.dtype.dtype(), &device)?;
    let prompt = checkpoint.tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() && !args.prompt.is_empty() {
        anyhow::bail!(
            "the prompt {:?} encodes to no token with {}'s tokenizer: its vocabulary has none of the prompt's pieces (is tokenizer.json complete?)",
            args.prompt,
            args.model.display()
        );
    }
    let new = greedy(&model, &prompt, args.max_new_tokens)?;
    if args.ids {
        println!("{}", new.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    } else {
        println!("{}", checkpoint.tokenizer.decode(&new)?);
    }
    Ok(())
}
