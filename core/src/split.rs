//! `fusellm split` (DESIGN.md step 1): documents cut so that every model's tokenization
//! fits its context, all models seeing identical text. The paper's rule: take the longest
//! tokenization, cut it every `max_len - margin` tokens, and cut the text at those tokens'
//! starts (their byte offsets, so the pieces concatenate back to the document exactly);
//! a piece still too long for some tokenizer is cut again the same way.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::tokenizer::Tokenizer;

/// Special tokens a model may add around a piece (a BOS and an EOS), kept free of text.
pub const RESERVED: usize = 2;

/// One document of the corpus, with where it came from.
pub struct Document {
    /// Position of the document in the corpus (all input files, in order).
    pub index: usize,
    /// `file:line` for JSONL, `file` for a text file.
    pub source: String,
    pub text: String,
}

/// One piece written by `fusellm split`: the id map back to the corpus and the text.
#[derive(Serialize)]
pub struct Piece<'a> {
    pub id: String,
    pub doc: usize,
    pub piece: usize,
    pub source: &'a str,
    pub text: &'a str,
}

/// What to do with a corpus line that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBadInput {
    /// Stop with the file and line, and this hint at how to skip such lines instead (the
    /// option of the command or config that reads the corpus; empty where there is none).
    Stop(&'static str),
    /// Report it on stderr and go on.
    Skip,
}

impl OnBadInput {
    /// `fusellm split`'s way to skip bad lines.
    pub const STOP_SPLIT: OnBadInput = OnBadInput::Stop("or pass --skip-bad to skip such lines");
    /// A config's way (`fusellm run`, `validate`).
    pub const STOP_CONFIG: OnBadInput = OnBadInput::Stop("or set `skip_bad = true` in [data] to skip such lines");
}

/// Cuts documents for a set of tokenizers.
pub struct Splitter<'a> {
    pub tokenizers: &'a [Tokenizer],
    pub max_len: usize,
    pub margin: usize,
}

impl Splitter<'_> {
    /// Byte ranges of `text` whose every tokenization fits `max_len` with room for a BOS
    /// and an EOS; none for a document of only whitespace (nothing to learn from).
    pub fn split(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let chunk = self.max_len.saturating_sub(self.margin.max(RESERVED));
        if chunk == 0 {
            return Err(Error::msg(format!(
                "max_len {} leaves no room beside a margin of {}",
                self.max_len, self.margin
            )));
        }
        let mut pieces = Vec::new();
        self.split_range(text, 0, text.len(), chunk, &mut pieces)?;
        Ok(pieces)
    }

    fn split_range(
        &self,
        text: &str,
        start: usize,
        end: usize,
        chunk: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        let piece = &text[start..end];
        let mut longest: Option<(usize, Vec<u32>)> = None;
        for tokenizer in self.tokenizers {
            let (ids, spans) = tokenizer.encode_with_spans(piece)?;
            if ids.len() + RESERVED > self.max_len && longest.as_ref().is_none_or(|(n, _)| ids.len() > *n) {
                longest = Some((ids.len(), spans));
            }
        }
        let Some((n, spans)) = longest else {
            out.push((start, end));
            return Ok(());
        };
        // Cut before every `chunk`-th token of the longest tokenization.
        let mut cuts: Vec<usize> = (chunk..n).step_by(chunk).map(|k| start + spans[2 * k] as usize).collect();
        cuts.retain(|&c| c > start && c < end && text.is_char_boundary(c));
        cuts.dedup();
        if cuts.is_empty() {
            return Err(Error::msg(format!(
                "a piece of {} bytes cannot be cut below {} tokens (one token is longer than the context?)",
                end - start,
                self.max_len
            )));
        }
        let bounds: Vec<usize> = std::iter::once(start).chain(cuts).chain(std::iter::once(end)).collect();
        for w in bounds.windows(2) {
            self.split_range(text, w[0], w[1], chunk, out)?;
        }
        Ok(())
    }
}

/// Calls `f` on every document of `paths` in order: each file in any format of
/// [`crate::corpus`] (JSONL, JSON arrays, Parquet, text; gzip or zstd compressed), a JSON
/// object's or Parquet row's text in `text_fields` joined by newlines. A bad record (not
/// JSON, no text field, not UTF-8, a null) stops the run with its place, or is skipped
/// with a warning; a file that cannot be read on stops it either way.
pub fn for_each_document(
    paths: &[PathBuf],
    text_fields: &[String],
    on_bad: OnBadInput,
    mut f: impl FnMut(Document) -> Result<()>,
) -> Result<CorpusCount> {
    let (mut index, mut skipped) = (0, 0);
    for path in paths {
        crate::corpus::for_each_record(path, text_fields, &mut |place, record| match record {
            Ok(None) => Ok(()),
            Ok(Some(text)) => {
                f(Document { index, source: place, text })?;
                index += 1;
                Ok(())
            }
            Err(e) => match on_bad {
                OnBadInput::Stop("") => Err(Error::msg(format!("{place}: {e}; fix that line"))),
                OnBadInput::Stop(hint) => Err(Error::msg(format!("{place}: {e}; fix that line, {hint}"))),
                OnBadInput::Skip => {
                    tracing::warn!("skipped {place}: {e}");
                    skipped += 1;
                    Ok(())
                }
            },
        })?;
    }
    Ok(CorpusCount { documents: index, skipped })
}

/// How many documents a pass over the corpus read, and how many bad lines it skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorpusCount {
    pub documents: usize,
    pub skipped: usize,
}

/// The texts of the pieces that `fusellm split` wrote (or any JSONL with a `text` field),
/// in order: what the stages after split index documents by.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    read_documents(path, &["text".into()])
}

/// The texts of one corpus file (JSONL, its `text_fields` joined, or plain text), in order;
/// a bad line stops with its file and line.
pub fn read_documents(path: &Path, text_fields: &[String]) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for_each_document(&[path.to_owned()], text_fields, OnBadInput::Stop(""), |d| {
        texts.push(d.text);
        Ok(())
    })?;
    Ok(texts)
}

/// What [`split_corpus`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SplitSummary {
    pub documents: usize,
    pub skipped: usize,
    pub pieces: usize,
}

/// Cuts the corpus `inputs` for `splitter` into pieces written to `out` as JSONL (id,
/// doc, piece, source, text). The file is written next to `out` and renamed at the end,
/// so a failed run leaves no half file.
pub fn split_corpus(
    inputs: &[PathBuf],
    text_fields: &[String],
    splitter: &Splitter<'_>,
    on_bad: OnBadInput,
    out: &Path,
) -> Result<SplitSummary> {
    use std::io::Write;
    // Named per process: another writer's partial file is never this one's.
    let partial = out.with_extension(format!("partial{}", std::process::id()));
    let file = std::fs::File::create(&partial).context(|| format!("creating {}", partial.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let mut pieces = 0;
    let count = for_each_document(inputs, text_fields, on_bad, |doc| {
        for (k, (start, end)) in splitter.split(&doc.text)?.into_iter().enumerate() {
            let piece = Piece {
                id: format!("{}.{k}", doc.index),
                doc: doc.index,
                piece: k,
                source: &doc.source,
                text: &doc.text[start..end],
            };
            serde_json::to_writer(&mut writer, &piece).context(|| "writing a piece".into())?;
            writer.write_all(b"\n").context(|| format!("writing {}", partial.display()))?;
            pieces += 1;
        }
        Ok(())
    })?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, out).context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(SplitSummary { documents: count.documents, skipped: count.skipped, pieces })
}
