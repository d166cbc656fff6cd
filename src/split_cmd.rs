//! `fusellm split`: the corpus cut into pieces that fit every model's context.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use fusellm_core::error::{Context, Result};
use fusellm_core::split::{for_each_document, open_tokenizer, OnBadInput, Piece, Splitter};

#[derive(Args)]
pub struct SplitArgs {
    /// Corpus files: JSONL (one document per line) or plain text (one document per file).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// The JSONL field(s) holding the text; several are joined with newlines.
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
}

pub fn run(args: SplitArgs) -> Result<()> {
    let tokenizers = args.tokenizers.iter().map(|p| open_tokenizer(p)).collect::<Result<Vec<_>>>()?;
    let splitter = Splitter { tokenizers: &tokenizers, max_len: args.max_len, margin: args.margin };
    // Written next to the output and renamed at the end: a failed run leaves no half file.
    let partial = args.out.with_extension("partial");
    let file = std::fs::File::create(&partial).context(|| format!("creating {}", partial.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut pieces = 0;
    let on_bad = if args.skip_bad { OnBadInput::Skip } else { OnBadInput::Stop };
    let count = for_each_document(&args.inputs, &args.text_field, on_bad, |doc| {
        for (k, (start, end)) in splitter.split(&doc.text)?.into_iter().enumerate() {
            let piece = Piece {
                id: format!("{}.{k}", doc.index),
                doc: doc.index,
                piece: k,
                source: &doc.source,
                text: &doc.text[start..end],
            };
            serde_json::to_writer(&mut out, &piece).context(|| "writing a piece".into())?;
            out.write_all(b"\n").context(|| format!("writing {}", partial.display()))?;
            pieces += 1;
        }
        Ok(())
    })?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.out)
        .context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    eprintln!(
        "{} documents ({} bad lines skipped) -> {pieces} pieces of at most {} tokens in {}",
        count.documents,
        count.skipped,
        args.max_len,
        args.out.display()
    );
    Ok(())
}
