//! `fusellm split`: the corpus cut into pieces that fit every model's context.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::pipeline::stages::Split;
use fusellm_core::split::OnBadInput;
use fusellm_core::tokenizer::Tokenizer;

use crate::model_args::PluginArgs;

#[derive(Args)]
pub struct SplitArgs {
    /// Corpus files: JSONL, JSON arrays, Parquet or plain text (one document per file), the
    /// text formats optionally gzip- or zstd-compressed (`.jsonl.gz`, `.json.zst`).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// The JSON field(s) or Parquet column(s) holding the text; several are joined with newlines.
    #[arg(long, default_value = "text", value_delimiter = ',')]
    text_field: Vec<String>,
    /// The tokenizers of every model (tokenizer.json or a checkpoint folder), sources and target.
    #[arg(long = "tokenizer", required = true)]
    tokenizers: Vec<PathBuf>,
    /// The context every tokenization must fit, BOS and EOS included (the paper: 2048).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Tokens left free when cutting (the paper cut at 2000 of 2048).
    #[arg(long, default_value_t = 48)]
    margin: usize,
    /// Skip corpus lines that are not valid JSON or UTF-8 instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Where to write the pieces (JSONL: id, doc, piece, source, text).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    plugins: PluginArgs,
}

pub fn run(args: SplitArgs) -> Result<()> {
    let inputs: Vec<&std::path::Path> = args.inputs.iter().chain(&args.tokenizers).map(|p| p.as_path()).collect();
    crate::check_output(&args.out, &inputs)?;
    let registry = args.plugins.registry()?;
    // A checkpoint's tokenizer as its model uses it (BOS included, as `fusellm run` splits);
    // a bare tokenizer.json as it is.
    let (mut tokenizers, mut tokenizer_files) = (Vec::new(), Vec::new());
    for path in &args.tokenizers {
        match path.is_dir() {
            true => {
                tokenizers.push(Checkpoint::open(path, &registry, None)?.tokenizer);
                tokenizer_files.push(path.join("tokenizer.json"));
            }
            false => {
                tokenizers.push(Tokenizer::open(path)?);
                tokenizer_files.push(path.clone());
            }
        }
    }
    let split = Split {
        corpus: &args.inputs,
        text_fields: &args.text_field,
        max_len: args.max_len,
        margin: args.margin,
        on_bad: if args.skip_bad { OnBadInput::Skip } else { OnBadInput::STOP_SPLIT },
        tokenizers,
        tokenizer_files,
    };
    let summary = split.write(&args.out)?;
    eprintln!(
        "{} documents ({} bad lines skipped) -> {} pieces of at most {} tokens in {}",
        summary.documents,
        summary.skipped,
        summary.pieces,
        args.max_len,
        args.out.display()
    );
    Ok(())
}
