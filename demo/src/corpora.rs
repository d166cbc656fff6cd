//! The real corpora of a fixtures folder (../shared/fixtures/corpora) as demo domains:
//! prose (tinyshakespeare), math (GSM8K problems), code (sympy) and technical prose (the
//! Python docs), cut into documents of about `CHUNK` bytes at line breaks.

use std::path::Path;

use fusellm_core::error::Result;
use fusellm_core::split::{for_each_document, OnBadInput};

/// The real domains, each with its train and evaluation files and text fields.
pub const DOMAINS: [(&str, &str, &str, &[&str]); 4] = [
    ("prose", "prose/tinyshakespeare.train.txt", "prose/tinyshakespeare.valid.txt", &["text"]),
    ("math", "math/gsm8k.train.jsonl", "math/gsm8k.valid.jsonl", &["question", "answer"]),
    ("code", "code/sympy.train.jsonl", "code/sympy.valid.jsonl", &["text"]),
    ("techprose", "techprose/python311_docs.train.jsonl", "techprose/python311_docs.valid.jsonl", &["text"]),
];

/// Bytes per document, about: a few hundred tokens, which the split stage cuts to fit.
const CHUNK: usize = 1200;

/// Documents of a corpus file, long texts cut at line breaks into pieces of about CHUNK bytes.
pub fn documents(corpora: &Path, file: &str, fields: &[&str]) -> Result<Vec<String>> {
    let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    let mut out = Vec::new();
    for_each_document(&[corpora.join(file)], &fields, OnBadInput::Stop(""), |d| {
        let mut piece = String::new();
        for line in d.text.split_inclusive('\n') {
            piece.push_str(line);
            if piece.len() >= CHUNK {
                out.push(std::mem::take(&mut piece));
            }
        }
        if !piece.trim().is_empty() {
            out.push(piece);
        }
        Ok(())
    })?;
    Ok(out)
}
